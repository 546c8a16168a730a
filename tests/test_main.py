"""The commands' one front door (``timm_icd/__main__.py``): ``python -m timm_icd COMMAND``, the console scripts, and
no other way in (no one-line shim modules)."""
import configparser
import importlib
import re

from timm_icd.__main__ import COMMANDS
from helpers import REPO, run_cli

NAMES = ['train', 'sweep', 'cache', 'shards', 'report', 'validate', 'push', 'hub', 'demo']
# where commands are written down for users and by the code (benchmarks/results/ keeps the commands that ran then)
DOCUMENTED = ['README.md', 'Makefile', 'hub_cards/*.md', 'docs/**/*.md', 'configs/**/*', 'timm_icd/**/*.py',
              'benchmarks/*.py', 'tests/**/*.py', '.ci/*']


def test_help_lists_every_command_with_its_line_and_a_command_runs_behind_it():
    listing = run_cli('--help', module='timm_icd')
    assert listing.returncode == 0, listing.stderr[-2000:]
    rows = re.findall(r'^  (\w+) +(\S.*)$', listing.stdout, flags=re.M)
    assert [name for name, _ in rows] == NAMES == list(COMMANDS)
    assert dict(rows)['push'] == 'Push a finished run\'s student folder to the Hugging Face Hub (for runs made ' \
                                 'offline, or to push again).'
    push = run_cli('--help', command='push')
    assert push.returncode == 0, push.stderr[-2000:]
    assert push.stdout.startswith('usage: python -m timm_icd push ') and 'repo_id' in push.stdout
    for argv, problem in ((['bogus'], "unknown command 'bogus'"), ([], 'no command given')):
        wrong = run_cli(*argv, module='timm_icd')
        assert wrong.returncode == 2 and wrong.stdout == ''
        assert wrong.stderr.strip().splitlines() == [
            f'error: {problem}: one of {", ".join(NAMES)} (python -m timm_icd --help)']


def test_every_command_is_a_console_script_and_no_shim_module_is_left():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / 'setup.cfg')
    scripts = dict(line.split(' = ') for line in cfg['options.entry_points']['console_scripts'].strip().splitlines())
    expected = {'timm-icd': 'timm_icd.__main__:main', 'train-icd': 'timm_icd.cli.train:main'}
    expected.update({f'timm-icd-{n}': f'timm_icd.cli.{n}:main' for n in NAMES if n != 'train'})
    assert scripts == expected
    for target in scripts.values():
        module, _, func = target.partition(':')
        assert callable(getattr(importlib.import_module(module), func))
    assert sorted(p.name for p in (REPO / 'timm_icd').glob('*.py')) == ['__init__.py', '__main__.py']
    assert not (REPO / 'timm_icd' / 'cli' / '__main__.py').exists()


def test_every_written_command_goes_through_the_front_door():
    """``python -m timm_icd.push``-style forms are gone: each ``-m timm_icd`` names a command (or ``--help``)."""
    files = {p for pattern in DOCUMENTED for p in REPO.glob(pattern) if p.is_file()} - {REPO / 'tests/test_main.py'}
    found, wrong = 0, []
    for path in sorted(files):
        for m in re.finditer(r'-m[\'", ]+timm_icd(\S*?)[\'",]*\s+[\'"]?([\w-]+)', path.read_text()):
            found += 1
            if m.group(1) or m.group(2) not in [*NAMES, '--help', 'COMMAND', 'NAME']:
                wrong.append(f'{path.relative_to(REPO)}: {m.group(0)}')
    assert found > 40 and wrong == [], wrong
