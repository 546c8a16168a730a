"""The second pre-registered study (benchmarks/study2.py on top of the sweep): its decision rule, and its quick mode
end to end: the test numbers withheld until every primary run of every pair is in, Holm over C1-C4 recomputed from
the runs CSV, the runs restored from the committed CSVs and never run again, a retrained teacher with other weights
setting its block's runs aside to run again."""
import csv
import json
import re
import shutil
import sys

import numpy as np
import pytest
from scipy import stats

from helpers import REPO, run_cli
from timm_icd.publish.stats import holm

sys.path.insert(0, str(REPO / 'benchmarks'))
import study2  # noqa: E402
from study2_report import decide  # noqa: E402


def _c(**given):
    """C1-C4 as the report analyses them, from name=(mean, Holm p); the rest +0.3 at Holm p 0.4."""
    return {name: dict(zip(('mean', 'holm_p'), given.get(name, (0.3, 0.4)))) for name in ('C1', 'C2', 'C3', 'C4')}


def test_decision_rule_prefers_fewer_loss_terms_unless_a_richer_arm_is_established_better():
    """protocol2.md, "What the results decide", branch by branch."""
    assert decide(_c(), 'dist')['same_label_space'] == 'dist'  # nothing established: the fewer terms
    assert decide(_c(C1=(-0.8, 0.01)), 'dist')['same_label_space'] == 'icd+kd'  # icd+kd better on A, B open
    assert decide(_c(C4=(-0.8, 0.01)), 'dist')['same_label_space'] == 'icd+kd'  # better on B, A open
    assert decide(_c(C1=(-0.8, 0.01), C4=(0.9, 0.02)), 'dist')['same_label_space'] == 'dist'  # worse on the other
    assert decide(_c(C4=(-0.8, 0.01), C1=(0.9, 0.02)), 'dist')['same_label_space'] == 'dist'
    assert decide(_c(C1=(0.8, 0.01), C4=(0.5, 0.03)), 'dist')['same_label_space'] == 'dist'  # dist established
    assert decide(_c(C1=(-0.8, 0.06)), 'dist')['same_label_space'] == 'dist'  # Holm p 0.06: not established
    assert decide(_c(C1=(-0.8, float('nan'))), 'dist')['same_label_space'] == 'dist'
    up = decide(_c(C3=(2.0, 0.01)), 'dist')
    assert (up['across_label_spaces'], up['across_label_spaces_teacher_adapt']) == ('dist', 'auto')
    assert decide(_c(C3=(2.0, 0.01)), 'dkd')['across_label_spaces'] == 'dkd'  # TRANSFER_X, whatever the lead sets
    down = decide(_c(C3=(-2.0, 0.01)), 'dist')
    assert (down['across_label_spaces'], down['across_label_spaces_teacher_adapt']) == ('vanilla', None)
    assert down['established'] == {'C1': None, 'C2': None, 'C3': 'negative', 'C4': None}
    assert decide(_c(C3=(2.0, 0.2)), 'dist')['across_label_spaces'] == 'vanilla'


def test_the_study_is_the_protocols():
    pairs = study2.pairs()
    assert [(p['label'], p['teacher'], p['student'], p['px']) for p in pairs.values()] == [
        ('A', 'resnet18', 'mobilenetv3_small_050', 28), ('T', 'resnet18', 'mobilenetv3_small_050', 28),
        ('B', 'convnext_atto', 'mobilevit_xxs', 32)]
    assert [c for p in pairs.values() for c in p['contrasts']] == [
        ('C1', 'dist', 'icd+kd'), ('C2', 'icd+kd', 'kd1'), ('C3', 'adaptX', 'vanilla'), ('C4', 'dist', 'icd+kd')]
    assert pairs['transfer']['arms']['adaptX'] == study2.TRANSFER_X == 'dist'
    assert study2.SEEDS == list(range(200, 220))


def _rows(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


@pytest.mark.long
def test_quick_study2_withholds_decides_restores_and_checks_its_teachers(tmp_path):
    out, data = tmp_path / 'results', tmp_path / 'data'
    result = run_cli('all', '--quick', '--out', out, '--data-dir', data, script='benchmarks/study2.py', timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not [line for line in result.stdout.splitlines() if line.startswith('test ')]  # the sweeps' test lines
    mirror = out / 'study2_quick'
    runs = [r for r in _rows(out / 'study2_quick_runs.csv') if r['kind'] == 'run']
    assert sorted((r['pair'], r['key']) for r in runs) == sorted(
        (pair, f'{arm}-s{seed}') for pair, p in study2.pairs().items() for arm in p['arms'] for seed in (200, 201))
    assert all(r['test_top1'] and not re.search(r'(?<![\w.~-])/(work|tmp|root|home)/', ','.join(r.values()))
               for r in runs)
    assert {r['teacher'] for r in runs if r['pair'] == 'cnn' and r['seed'] == '201'} == {
        'local-dir:../../teachers/cnn/runs/vanilla-s2001/student'}  # round-robin over the pair's teachers
    assert all('--teacher-cache' in r['flags'] for r in runs if r['pair'] != 'transfer' and r['arm'] != 'vanilla')
    assert all('--input-size 3 32 32' in r['flags'] for r in runs if r['pair'] == 'second')

    # Holm over C1-C4 recomputed from the runs CSV: the one-sample t-test of each contrast's paired differences
    value = {(r['pair'], r['arm'], r['seed']): float(r['test_top1']) for r in runs}
    raw = []
    for pair, p in study2.pairs().items():
        for name, a, b in p['contrasts']:
            d = [value[pair, a, s] - value[pair, b, s] for s in ('200', '201')]
            raw.append(stats.ttest_1samp(d, 0.0).pvalue if np.std(d) > 0 else 1.0)
    adjusted = holm(raw)
    decision = json.loads((out / 'study2_quick_decision.json').read_text())
    assert [decision['holm_p'][c] for c in ('C1', 'C2', 'C3', 'C4')] == pytest.approx(adjusted)
    text = (out / 'study2_quick.md').read_text()
    for c, p in zip(('C1', 'C2', 'C3', 'C4'), adjusted):
        line = next(line for line in text.splitlines() if line.startswith(f'| {c} |'))
        assert line.split('|')[9].strip() == (f'{p:.4f}' if p >= 1e-4 else f'{p:.1e}')
    assert decision == decide({c: {'mean': decision['mean'][c], 'holm_p': decision['holm_p'][c]} for c in
                               decision['mean']}, study2.TRANSFER_X)
    assert f"teacher of the dataset's classes: **{decision['same_label_space']}**" in text
    adapted = json.loads((mirror / 'transfer' / 'adapted_teachers.json').read_text())
    assert sorted(adapted) == ['transfer-teacher2010', 'transfer-teacher2011']
    assert all(t['test_images'] == 64 and 0 <= t['test_top1'] <= 100 for t in adapted.values())

    # one primary run missing (pair B's last; no sweep folder to sync from): the report withholds every test number
    partial = tmp_path / 'partial'
    shutil.copytree(mirror, partial / 'study2_quick')
    csv_path = partial / 'study2_quick' / 'second' / 'sweep_runs.csv'
    rows = _rows(csv_path)
    with open(csv_path, 'w', newline='') as f:
        writer = csv.DictWriter(f, list(rows[0]), lineterminator='\n')
        writer.writeheader()
        writer.writerows(r for r in rows if r['key'] != 'icd+kd-s201')
    result = run_cli('report', '--quick', '--out', partial, '--data-dir', partial / 'data',
                     script='benchmarks/study2.py')
    assert result.returncode == 0, result.stderr[-3000:]
    withheld = (partial / 'study2_quick.md').read_text()
    assert 'Withheld: the test numbers appear when every one of the 14 primary runs' in withheld
    assert '| B (second) | icd+kd | 1 | 2 |' in withheld and '| A (cnn) | kd1 | 2 | 2 |' in withheld
    assert 'No result yet (1): second/icd+kd-s201.' in withheld  # the protocol: say which runs are missing
    assert not re.findall(r'\d\.\d', withheld) and '## Primary contrasts' not in withheld  # no number but counts
    assert not (partial / 'study2_quick_decision.json').exists()
    assert not any(r['test_top1'] for r in _rows(partial / 'study2_quick_runs.csv'))

    # a new work tree: the sweep folders gone, the runs are restored from the committed CSVs, none is run again
    shutil.rmtree(data / 'study2_quick' / 'sweeps')
    result = run_cli('runs', '--quick', '--out', out, '--data-dir', data, script='benchmarks/study2.py')
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count('runs are in') == 3 and 'jobs to do' not in result.stdout
    assert [r for r in _rows(out / 'study2_quick_runs.csv') if r['kind'] == 'run'] == runs

    # a teacher retrained on this machine has the recorded weights
    recorded = json.loads((mirror / 'teachers.json').read_text())
    assert len(recorded) == 6 and all(len(t['sha256']) == 64 for t in recorded.values())
    shutil.rmtree(data / 'study2_quick' / 'teachers' / 'second' / 'runs' / 'vanilla-s2021')
    result = run_cli('teachers', '--quick', '--out', out, '--data-dir', data, script='benchmarks/study2.py')
    assert result.returncode == 0 and '1 jobs to do' in result.stdout, result.stderr[-3000:]
    assert json.loads((mirror / 'teachers.json').read_text()) == recorded

    # a session ended in the block of seed 200 of pair A (kd1-s200 unfinished), and its teacher, retrained in a new
    # work tree, has other weights (as on another CPU; here: another recorded sha256): the record is replaced, and the
    # runs the recorded weights taught and its cache are set aside, their test rows unread, and run again
    (mirror / 'teachers.json').write_text(json.dumps({**recorded, 'cnn-teacher2000': {
        **recorded['cnn-teacher2000'], 'sha256': '0' * 64}}))
    before = {r['key']: r for r in _rows(mirror / 'cnn' / 'sweep_runs.csv')}
    for name in ('sweep_runs.csv', 'sweep_test_withheld.csv'):
        rows = _rows(mirror / 'cnn' / name)
        with open(mirror / 'cnn' / name, 'w', newline='') as f:
            writer = csv.DictWriter(f, list(rows[0]), lineterminator='\n')
            writer.writeheader()
            writer.writerows(r for r in rows if r['key'] != 'kd1-s200')
    shutil.rmtree(data / 'study2_quick' / 'sweeps')
    result = run_cli('runs', '--quick', '--max-blocks', '1', '--out', out, '--data-dir', data,
                     script='benchmarks/study2.py')
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'teacher cnn-teacher2000 retrained with other weights' in result.stdout
    assert '2 finished run(s) it taught set aside' in result.stdout and result.stdout.count('runs are in') == 3
    assert not [line for line in result.stdout.splitlines() if line.startswith('test ')]
    taught = ['dist-s200', 'icd+kd-s200', 'kd1-s200']
    aside = _rows(mirror / 'cnn' / 'set_aside_runs.csv')
    assert sorted(r['key'] for r in aside) == ['cache-t0', *taught[:2]]
    assert {r['set_aside'] for r in aside} == {'taught by cnn-teacher2000 sha256 000000000000'}
    assert sorted(r['key'] for r in _rows(mirror / 'cnn' / 'set_aside_test_withheld.csv')) == taught[:2]
    after = {r['key']: r for r in _rows(mirror / 'cnn' / 'sweep_runs.csv')}
    assert after.keys() == before.keys() and all(after[k] == before[k] for k in after if k.endswith('s201'))
    assert all(after[k]['started'] >= before[k]['ended'] for k in [*taught, 'cache-t0'])  # run again
    assert {r['key'] for r in _rows(mirror / 'cnn' / 'sweep_test_withheld.csv')} >= set(taught)
    record = json.loads((mirror / 'teachers.json').read_text())['cnn-teacher2000']
    assert record['sha256'] == recorded['cnn-teacher2000']['sha256']
    assert [(r['sha256'], r['runs_set_aside']) for r in record['replaced']] == [('0' * 64, 2)]
    result = run_cli('report', '--quick', '--out', out, '--data-dir', data, script='benchmarks/study2.py')
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'Set aside and run again, never analysed: 2 run(s) of pair A' in (out / 'study2_quick.md').read_text()
