"""The README and the guide in docs/ stay true: the Python API example runs as written, every command in a code block
names flags its program has, every relative link resolves to a file (and heading), and every measured number quoted
next to a result file is in that file."""
import contextlib
import csv
import functools
import importlib
import io
import itertools
import math
import re
import shlex
import statistics
from pathlib import Path
from typing import Dict, List, Set, Tuple

from accelerate.commands.launch import launch_command_parser

from helpers import REPO

# timm train.py flags the docs name as left out, with why (docs/distill.md): they must stay unknown here
LEFT_OUT = ('--aug-repeats', '--bce-loss', '--lr-base')
PAGES = [REPO / 'README.md', *sorted((REPO / 'docs').glob('*.md'))]
GUIDE = ['methods', 'data', 'teacher-cache', 'scale', 'hub', 'benchmarks', 'teacher-adaptation', 'distill',
         'own-dataset']
FENCE = re.compile(r'^```[^\n]*\n.*?^```[ \t]*$', flags=re.S | re.M)
LINK = re.compile(r'!?\[[^\]]*\]\(([^)\s]+)[^)]*\)')
FLAG = re.compile(r'(?<![\w-])--[a-z][\w-]*')
NUMBER = re.compile(r'(?<![\w./])(\d+\.\d+)(?!\.?\d)')
RESULTS = REPO / 'benchmarks' / 'results'
# the console scripts of setup.cfg, and train_icd.py -> the timm_icd.cli module that implements each
PROGRAMS = {'train_icd.py': 'train', **dict(re.findall(r'^\s+([\w-]+) = timm_icd\.cli\.(\w+):main$',
                                                       (REPO / 'setup.cfg').read_text(), flags=re.M))}


def _text(page: Path) -> str:
    return page.read_text()


def _prose(text: str) -> str:
    """The page without its fenced code blocks (a '#' there is a comment, a '[' no link)."""
    return FENCE.sub('', text)


def _code_blocks(text: str, languages=('bash', 'sh', '')) -> List[str]:
    return [m.group(2) for m in re.finditer(r'^```(\w*)[^\n]*\n(.*?)^```', text, flags=re.S | re.M)
            if m.group(1) in languages]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


@functools.lru_cache(maxsize=None)
def anchors(page: Path) -> Set[str]:
    found, seen = set(), {}
    for heading in re.findall(r'^#{1,6} +(.+)$', _prose(_text(page)), flags=re.M):
        base = slug(heading)
        found.add(base if base not in seen else f'{base}-{seen[base]}')
        seen[base] = seen.get(base, 0) + 1
    return found


def relative_links(page: Path) -> List[Tuple[Path, str]]:
    """(target file, anchor) of every relative link and image of ``page``, outside code blocks."""
    out = []
    for target in LINK.findall(_prose(_text(page))):
        if re.match(r'[a-z]+:', target):
            continue
        path, _, anchor = target.partition('#')
        out.append(((page.parent / path).resolve() if path else page, anchor))
    return out


@functools.lru_cache(maxsize=None)
def help_text(program: str) -> str:
    """What ``program --help`` prints: accelerate's launcher, or a timm_icd command (run in this process)."""
    if program == 'accelerate':  # its help hides options by what sys.argv selects: all of them, listed
        return ' '.join(launch_command_parser()._option_string_actions)
    texts = []
    for argv in (['--help'], ['search', '--help']) if program == 'hub' else (['--help'],):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            try:
                importlib.import_module(f'timm_icd.cli.{program}').main(argv)
            except SystemExit as e:
                assert e.code == 0, (program, argv)
        texts.append(out.getvalue())
    return '\n'.join(texts)


def _words(line: str) -> List[str]:
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        words = line.split()
    # a quoted command (srun bash -c '...') is split again
    return [w for word in words for w in (_words(word) if ' ' in word and word != line else [word])]


def commands(page: Path) -> List[Tuple[str, str, List[str]]]:
    """(program, its source line, the flags given to it) for each command of the page's shell blocks; program is a
    timm_icd command, 'accelerate', 'benchmarks/NAME.py' or 'make'."""
    found = []
    for block in _code_blocks(_text(page)):
        for line in block.replace('\\\n', ' ').splitlines():
            if line.lstrip().startswith('#'):
                continue
            program = None
            for word in _words(line):
                word = word.strip('[]')
                name = Path(word).name
                if word == '--' and program == 'sweep':  # the sweep passes what follows to train_icd.py
                    program = 'train'
                elif word in ('accelerate', 'python', 'make') or re.fullmatch(r'benchmarks/\w+\.(py|sh)', word):
                    program = word
                elif name in PROGRAMS:
                    program = PROGRAMS[name]
                elif re.fullmatch(r'timm_icd(\.cli)?\.\w+', word) and program in ('python', 'accelerate'):
                    program = word.rsplit('.', 1)[1]
                else:
                    if program == 'make' and re.fullmatch(r'[\w-]+', word):
                        found[-1][2].append(word)
                    elif FLAG.fullmatch(word.split('=')[0]) and program not in (None, 'python', 'make'):
                        found[-1][2].append(word.split('=')[0])
                    continue
                found.append((program, line, []))
    return found


def known_flags(program: str) -> str:
    if program.startswith('benchmarks/'):
        return (REPO / program).read_text()
    return help_text(program)


def test_python_api_example_runs():
    blocks = [b for page in PAGES for b in _code_blocks(_text(page), ('python',)) if 'create_distiller' in b]
    assert len(blocks) == 1
    namespace = {}
    exec(compile(blocks[0], 'docs/python-api.md', 'exec'), namespace)
    out, task = namespace['out'], namespace['task']
    assert set(out) == {'loss', 'output', 'loss_ce', 'loss_kd', 'loss_icd', 'tau'}
    assert out['loss_icd'].item() > 0 and out['loss_kd'].item() >= 0
    assert not any(m._forward_pre_hooks for m in task.student.modules())


def test_top_commands_are_make_targets():
    readme = _text(REPO / 'README.md')
    makefile = (REPO / 'Makefile').read_text()
    assert {'demo', 'test'} <= set(re.findall(r'^make ([\w-]+)', readme, flags=re.M))
    targets = [t for page in PAGES for program, _, args in commands(page) if program == 'make' for t in args]
    targets += [t for page in PAGES for t in re.findall(r'`make ([\w-]+)', _prose(_text(page)))]
    assert {'demo', 'test', 'study2'} <= set(targets)
    for target in targets:
        assert re.search(rf'^{re.escape(target)}:', makefile, flags=re.M), target
    assert 'make test' in (REPO / '.ci' / 'run').read_text()


def test_readme_is_a_front_page_linking_the_guide():
    readme = _text(REPO / 'README.md')
    assert len(readme.splitlines()) < 250
    linked = {t for t, _ in relative_links(REPO / 'README.md')}
    assert {(REPO / 'docs' / f'{name}.md').resolve() for name in GUIDE} <= linked
    assert 'accelerate launch train_icd.py --teacher' in readme
    assert [name for name in PROGRAMS if f'`{name}`' not in readme] == []  # train_icd.py and every console script
    assert not re.search(r'python -m timm_icd\.(push|validate|hub|cache|shards|report|demo|sweep)\b',
                         '\n'.join(_text(p) for p in PAGES)), 'write the console script (setup.cfg) instead'


def test_relative_links_images_and_anchors_exist():
    targets = [link for page in PAGES for link in relative_links(page)]
    assert (RESULTS / 'quality.png', '') in targets and (REPO / 'docs' / 'demo_curves.png', '') in targets
    missing = [f'{path.relative_to(REPO)}#{anchor}' for path, anchor in targets
               if not path.exists() or (anchor and path.suffix == '.md' and anchor not in anchors(path))]
    assert not missing, missing


def test_slug_follows_github():
    assert slug("Train-loader throughput against timm's `create_loader`") == \
        'train-loader-throughput-against-timms-create_loader'
    assert slug('Any teacher, any dataset: the teacher\'s classes') == 'any-teacher-any-dataset-the-teachers-classes'


def test_commands_in_code_blocks_give_only_flags_their_program_has():
    checked, unknown = 0, []
    for page in PAGES:
        for program, line, flags in commands(page):
            if program in ('python', 'make'):
                continue
            text = known_flags(program)
            for flag in flags:
                checked += 1
                if not re.search(rf'(?<![\w-]){re.escape(flag)}(?![\w-])', text):
                    unknown.append(f'{page.name}: {program} {flag}: {line.strip()[:80]}')
    assert not unknown, unknown
    assert checked > 90  # the parser finds the commands (99 flags on 2026-12-07)


def test_commands_parsed_as_meant():
    page = REPO / 'docs' / 'methods.md'
    sweep = [(p, f) for p, _, f in commands(page) if p in ('sweep', 'train')]
    assert sweep[0][0] == 'sweep' and '--contrast' in sweep[0][1] and '--epochs' not in sweep[0][1]
    assert ('train', ['--epochs']) in sweep
    slurm = [(p, f) for p, _, f in commands(REPO / 'docs' / 'scale.md') if p in ('accelerate', 'train')]
    assert ('accelerate', ['--multi_gpu', '--num_machines', '--machine_rank', '--main_process_ip',
                           '--main_process_port', '--num_processes', '--max_restarts']) in slurm
    assert ('train', ['--config', '--output', '--resume']) in slurm


# the commands whose flags each page's prose names (any other page: every command, accelerate and the benchmarks)
PROSE_PROGRAMS = {'README.md': ('train', 'push'), 'distill.md': ('train', 'report', 'accelerate'),
                  'methods.md': ('train', 'sweep'), 'teacher-adaptation.md': ('train', 'cache'),
                  'data.md': ('train', 'shards'), 'teacher-cache.md': ('train', 'cache'),
                  'scale.md': ('train', 'accelerate'),
                  'resume.md': ('train', 'cache', 'accelerate'), 'hub.md': ('train', 'push', 'hub', 'validate')}


def test_every_flag_named_in_prose_exists_in_its_commands():
    every = ('accelerate', *sorted(set(PROGRAMS.values())))
    unknown = []
    for page in PAGES:
        known = '\n'.join(help_text(p) for p in PROSE_PROGRAMS.get(page.name, every))
        if page.name not in PROSE_PROGRAMS:
            known += '\n'.join(p.read_text() for p in (REPO / 'benchmarks').glob('*.py'))
        unknown += sorted({f'{page.name}: {flag}' for flag in FLAG.findall(_prose(_text(page)))
                           if not re.search(rf'(?<![\w-]){re.escape(flag)}(?![\w-])', known)})
    assert unknown == [f'distill.md: {flag}' for flag in LEFT_OUT]


def blocks_with_citations(page: Path) -> List[Tuple[str, List[Path]]]:
    """(block, the result files it cites) for each paragraph, list or table of the page outside code blocks: those it
    links and those its section links."""
    out = []
    for section in re.split(r'^(?=#{1,6} )', _prose(_text(page)), flags=re.M):
        cited = lambda text: sorted({p for p in ((page.parent / t.partition('#')[0]).resolve()  # noqa: E731
                                                 for t in LINK.findall(text)) if p.parent == RESULTS.resolve()})
        in_section = cited(section)
        for block in re.split(r'\n\s*\n', section):
            out.append((block, sorted(set(cited(block)) | set(in_section))))
    return out


@functools.lru_cache(maxsize=None)
def numbers_in(path: Path) -> Tuple[float, ...]:
    """The numbers of a result file; for a runs CSV with a 'seconds' column also the run times the docs quote: the
    median, least and most minutes per run of each stage, pair and (stage, pair), and of each (pair, epochs)."""
    if path.suffix not in ('.md', '.csv', '.json'):
        return ()
    numbers = [float(n) for n in re.findall(r'\d+\.\d+|\d+', path.read_text().replace(',', ''))]
    if path.suffix == '.csv':
        rows = list(csv.DictReader(path.open()))
        if rows and 'seconds' in rows[0]:
            groups: Dict[tuple, List[float]] = {}
            for row in rows:
                for key in (('stage',), ('pair',), ('stage', 'pair'), ('pair', 'epochs')):
                    groups.setdefault(tuple((k, row.get(k)) for k in key), []).append(float(row['seconds']) / 60)
            numbers += [f(m) for m in groups.values() for f in (statistics.median, min, max)]
    return tuple(numbers)


def quoted(number: str, files: List[Path], derived: Tuple[float, ...] = ()) -> bool:
    """Whether ``number`` is, to its decimals, a number of one of ``files`` (or of ``derived`` from them)."""
    value, tolerance = float(number), 0.5 * 10 ** -len(number.split('.')[1]) + 1e-9
    candidates = (*derived, *(v for f in files for v in numbers_in(f)))
    return any(math.isclose(v, value, abs_tol=tolerance) for v in candidates)


def holm(p: Dict[str, float]) -> Dict[str, float]:
    adjusted, running = {}, 0.0
    for i, key in enumerate(sorted(p, key=p.get)):
        running = max(running, min(1.0, (len(p) - i) * p[key]))
        adjusted[key] = running
    return adjusted


def exact_paired_p(d: List[float], statistic) -> float:
    """Two-sided exact p of ``statistic`` (of the signed differences ``d``) over all 2^n sign flips."""
    observed = abs(statistic(d))
    flips = list(itertools.product((1, -1), repeat=len(d)))
    return sum(abs(statistic([s * x for s, x in zip(signs, d)])) >= observed - 1e-9 for signs in flips) / len(flips)


@functools.lru_cache(maxsize=None)
def study_sensitivity() -> Tuple[float, ...]:
    """The Holm-adjusted p of the first study's sensitivity tests that docs/benchmarks.md quotes, recomputed: the
    exact sign test and the t-test over the teachers' means adjusted from study.md's unadjusted table, the exact
    Wilcoxon signed-rank and sign-flip tests from the per-seed runs of study_runs.csv."""
    table = (RESULTS / 'study.md').read_text()
    rows = re.findall(r'^\| (P[1-4]) \| [^|]*teacher0[^|]* \| ([\d.]+) \| ([\d.]+) \|$', table, flags=re.M)
    assert len(rows) == 4
    runs = [r for r in csv.DictReader((RESULTS / 'study_runs.csv').open()) if r['stage'] == 'confirm']
    arms = {'P1': ('cnn-icd+kd-icd+kd-trained', 'cnn-kd-kd-trained'),
            'P2': ('cnn-icd+dist-icd+dist-trained', 'cnn-dist-dist-trained'),
            'P3': ('transfer-icd-icd-trained', 'transfer-vanilla-vanilla-trained'),
            'P4': ('transfer-icd-icd-trained', 'transfer-icd-icd-random')}
    ranked = lambda d: [math.copysign(sorted(abs(y) for y in d).index(abs(x)) + 1, x) for x in d]  # noqa: E731
    wilcoxon, sign_flip = {}, {}
    for contrast, (a, b) in arms.items():
        top1 = {arm: {r['seed']: float(r['test_top1']) for r in runs if r['key'].startswith(f'confirm-{arm}-')}
                for arm in (a, b)}
        d = [top1[a][seed] - top1[b][seed] for seed in sorted(top1[a])]
        assert len(d) == 10 and len(set(map(abs, d))) == 10  # no ties: plain ranks
        wilcoxon[contrast] = exact_paired_p(ranked(d), lambda x: sum(x))
        sign_flip[contrast] = exact_paired_p(d, lambda x: sum(x) / len(x))
    tests = [wilcoxon, sign_flip, {c: float(t) for c, t, _ in rows}, {c: float(s) for c, _, s in rows}]
    return tuple(holm(p)['P1'] for p in tests)


def test_numbers_next_to_a_result_file_are_in_it():
    checked, wrong = 0, []
    for page in PAGES:
        for block, files in blocks_with_citations(page):
            if not files:
                continue
            for number in NUMBER.findall(re.sub(r'`[^`]*`', '', block)):
                checked += 1
                if not quoted(number, files, study_sensitivity() if RESULTS / 'study_runs.csv' in files else ()):
                    wrong.append(f'{page.name}: {number} not in {[f.name for f in files]}: {block.strip()[:60]}')
    assert not wrong, wrong
    assert checked > 150


def test_the_number_check_sees_a_wrong_number():
    study = [RESULTS / 'study.md']
    assert quoted('0.88', study) and quoted('0.046', study) and not quoted('0.885', study)
    assert [round(p, 4) for p in study_sensitivity()] == [0.0781, 0.0625, 0.158, 0.086]
    assert NUMBER.findall('torch 2.14.1, 1.04x, +0.88 [-0.25, 1.5], v0.3') == ['1.04', '0.88', '0.25', '1.5']
