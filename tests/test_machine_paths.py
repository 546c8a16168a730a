"""No committed result or document names a path of the machine it was made on (/work/, /tmp/, /root/, /home/)."""
import re

from helpers import REPO

MACHINE_PATH = re.compile(r'(?<![\w.~-])/(work|tmp|root|home)/')


def _published():
    roots = [REPO / 'benchmarks' / 'results', REPO / 'docs']
    return sorted(p for root in roots for p in root.rglob('*') if p.is_file()) + [REPO / 'README.md']


def test_no_machine_path_in_results_docs_or_readme():
    found = []
    for path in _published():
        text = path.read_bytes().decode('utf-8', errors='replace')
        for number, line in enumerate(text.splitlines(), 1):
            if MACHINE_PATH.search(line):
                found.append(f'{path.relative_to(REPO)}:{number}: {line.strip()[:120]}')
    assert found == []


def test_the_check_sees_machine_paths():
    assert {bool(MACHINE_PATH.search(s)) for s in ('--dataset /work/study/cnn', 'local-dir:/tmp/t', '`/home/u/x`',
                                                   '(/root/.cache)')} == {True}
    assert not any(MACHINE_PATH.search(s) for s in ('benchmarks/data/study/cnn', 'https://x.org/work/y', 'a/tmp/b',
                                                    '~/work/x', 'local-dir:runs/t'))
    assert len(_published()) > 20 and REPO / 'benchmarks' / 'results' / 'study_runs.csv' in _published()
