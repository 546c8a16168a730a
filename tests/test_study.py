"""The pre-registered study (benchmarks/study.py): its statistics against scipy and hand-worked values, its selection
rule, and its quick mode end to end (real train_icd.py runs, teacher caches, the test split only after tuning)."""
import csv
import json
import sys

import numpy as np
import pytest
from scipy import stats

from helpers import REPO, run_cli

sys.path.insert(0, str(REPO / 'benchmarks'))
import study  # noqa: E402
from study_stats import analyse, decide, holm, paired, selected_val_means  # noqa: E402


def test_holm_matches_a_hand_worked_example_and_never_lowers_a_p_value():
    # sorted 0.01, 0.02, 0.03, 0.04 -> 4 * 0.01, 3 * 0.02, max(2 * 0.03, 0.06), max(0.04, 0.06)
    assert holm([0.03, 0.01, 0.04, 0.02]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    assert holm([0.9, 0.8, 0.7]) == pytest.approx([1.0, 1.0, 1.0])  # 3 x 0.7 caps at 1
    rng = np.random.default_rng(0)
    for _ in range(20):
        p = rng.uniform(0, 1, 4).tolist()
        adjusted = holm(p)
        assert all(a >= raw for a, raw in zip(adjusted, p)) and max(adjusted) <= 1.0


def test_paired_difference_is_scipys_paired_t_test_and_sign_test():
    rng = np.random.default_rng(1)
    a = {s: 70 + rng.normal() for s in range(10)}
    b = {s: a[s] - 0.5 + rng.normal() * 0.4 for s in range(10)}
    b[11] = 0.0  # a seed only one arm has is left out
    r = paired(a, b)
    xs, ys = [a[s] for s in range(10)], [b[s] for s in range(10)]
    assert r['n'] == 10 and r['mean'] == pytest.approx(np.mean(np.subtract(xs, ys)))
    assert r['p'] == pytest.approx(stats.ttest_rel(xs, ys).pvalue)
    ci = stats.ttest_rel(xs, ys).confidence_interval(0.95)
    assert (r['low'], r['high']) == pytest.approx((ci.low, ci.high))
    assert r['sign_p'] == pytest.approx(stats.binomtest(r['positive'], 10).pvalue)


def _tune_rows(scores):
    return [{'stage': 'tune', 'family': family, 'config': config, 'val_top1': str(v)}
            for (family, config), values in scores.items() for v in values]


def test_selection_rule_needs_more_than_the_margin_to_replace_a_default():
    base = {('kd', 'default'): [80.0, 80.0], ('kd', 'T2'): [80.4, 80.5], ('kd', 'w1'): [79.0, 79.0],
            ('dkd', 'default'): [80.0, 80.0], ('dkd', 'beta2'): [81.0, 81.2], ('dkd', 'beta0.5'): [80.0, 80.0],
            ('dist', 'default'): [82.0, 82.0], ('dist', 'T2'): [81.0, 81.0], ('dist', 'T1'): [80.0, 80.0],
            ('icd', 'default'): [80.0, 80.0], ('icd', 'noclamp'): [80.6, 80.6], ('icd', 'w0.5'): [80.0, 80.0]}
    choice = study.selected(_tune_rows(base), seeds=2)
    assert choice == {'kd': 'default', 'dkd': 'beta2', 'dist': 'default', 'icd': 'noclamp', 'X': 'dist'}
    base[('icd', 'w0.5')] = [80.0]  # one of two seeds: the rule does not select on part of the budget
    with pytest.raises(SystemExit, match=r'tuning of icd is not complete: w0.5 \(1 of 2 seeds\)'):
        study.selected(_tune_rows(base), seeds=2)
    del base[('dkd', 'default')]
    with pytest.raises(SystemExit, match=r'tuning of dkd is not complete: default \(0 of 2 seeds\)'):
        study.selected(_tune_rows(base), seeds=2)


def _contrasts(**given):
    """Primary contrasts as ``analyse`` gives them, from name=(mean, established); the rest +0.5, not established."""
    out = {}
    for name in ('P1', 'P2', 'P3', 'P4'):
        mean, established = given.get(name, (0.5, False))
        out[name] = {'mean': mean, 'established': established, 'holm_p': 0.01 if established else 0.3}
    return out


def test_decision_follows_the_protocols_rule():
    """protocol.md, "What the results decide": icd+X before icd+kd before the best tuned logit term; icd across label
    spaces only when P3 is established positive. A contrast established in the negative direction adds nothing."""
    choice, val = {'X': 'dist'}, {'kd': 82.45, 'dkd': 84.6, 'dist': 84.95}
    both = decide(_contrasts(P1=(1.0, True), P2=(0.8, True), P3=(2.0, True)), choice, val)
    assert (both['same_label_space'], both['across_label_spaces']) == ('icd+dist', 'icd')
    assert decide(_contrasts(P1=(1.0, True)), choice, val)['same_label_space'] == 'icd+kd'
    assert decide(_contrasts(P2=(-1.0, True)), {'X': 'dkd'}, val)['same_label_space'] == 'dist'  # highest validation
    none = decide(_contrasts(P3=(-2.0, True), P4=(1.0, True)), choice, {'kd': 85.0, 'dkd': 84.6, 'dist': 84.95})
    assert (none['same_label_space'], none['across_label_spaces']) == ('kd', 'vanilla')
    assert 'no feature method is established' in none['across_label_spaces_why']
    assert none['established_positive'] == {'P1': False, 'P2': False, 'P3': False, 'P4': True}


def test_auto_is_what_the_committed_study_decided():
    """The committed runs give the committed decision by protocol.md's rule, and ``--method auto`` follows it."""
    from timm_icd.distill.methods import AUTO_ACROSS_SPACES, AUTO_SAME_SPACE, resolve_method
    results = REPO / 'benchmarks' / 'results'
    rows = study.read_rows(results / 'study_runs.csv')
    assert len([r for r in rows if r['stage'] == 'confirm' and r['test_top1']]) == 70  # every primary run
    choice = study.selected(rows, seeds=2)
    analysed = analyse(rows, choice)
    decision = decide(analysed, choice, selected_val_means(rows, choice))
    assert decision == json.loads((results / 'study_decision.json').read_text())
    assert (AUTO_SAME_SPACE, AUTO_ACROSS_SPACES) == (decision['same_label_space'], decision['across_label_spaces'])
    same = resolve_method('auto', 10, teacher_classes=10)
    assert same.name == decision['same_label_space'] and 'study.md' in same.reason
    p1, p3 = analysed['P1'], analysed['P3']  # the numbers auto's log line quotes are the runs'
    assert f"icd+kd - kd {p1['mean']:+.2f} points, Holm p {p1['holm_p']:.3f}" in same.reason
    assert f"icd - vanilla was {p3['mean']:+.2f} points (Holm p {p3['holm_p']:.1f})" in \
        resolve_method('auto', 4, teacher_classes=6).reason
    for other in (resolve_method('auto', 4, teacher_classes=6),
                  resolve_method('auto', 2, teacher_classes=2, teacher_label_names=['a', 'b'], label_names=['c', 'd'])):
        assert other.name == decision['across_label_spaces'] and 'study.md' in other.reason
    text = (results / 'study.md').read_text()
    assert f"teacher of the dataset's classes: **{decision['same_label_space']}**" in text


@pytest.mark.long
def test_quick_study_runs_the_protocol_end_to_end(tmp_path):
    out, data = tmp_path / 'results', tmp_path / 'data'
    result = run_cli('all', '--quick', '--out', out, '--data-dir', data, script='benchmarks/study.py', timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out / 'study_quick_runs.csv') as f:
        rows = list(csv.DictReader(f))
    tune = [r for r in rows if r['stage'] == 'tune']
    assert len(tune) == 12 and all(r['val_top1'] and not r['test_top1'] for r in tune)  # never the test split
    confirm = [r for r in rows if r['stage'] == 'confirm']
    assert all(r['test_top1'] and int(r['test_images']) == (160 if r['pair'] == 'cnn' else 64) for r in confirm)
    cnn = [r for r in confirm if r['pair'] == 'cnn']
    assert all('--teacher-cache' in r['flags'] for r in cnn) and len(cnn) == 8
    assert {r['teacher'] for r in cnn if r['seed'] == '1'} == {'cnn-teacher1'}  # seed s uses teacher s mod teachers
    transfer = {(r['method'], r['teacher'].split('(')[0], r['seed']) for r in confirm if r['pair'] == 'transfer'}
    assert transfer == {(m, t, s) for s in '01' for m, t in (('icd', f'transfer-teacher{s}'), ('vanilla', ''),
                                                             ('icd', 'random'))}
    logs = (data / 'study_quick' / 'runs' / 'confirm').glob('confirm-cnn-*.log')
    assert all('the teacher never runs' in log.read_text() for log in logs)  # every cnn run read its seed's cache
    kd_ls = [r for r in rows if r['family'] == 'kd+ls']
    assert kd_ls and all('--kd-standardize' in r['flags'] and '--kd-temperature' in r['flags'] for r in kd_ls)
    text = (out / 'study_quick.md').read_text()
    for name in ('P1', 'P2', 'P3', 'P4'):
        line = next(line for line in text.splitlines() if line.startswith(f'| {name} |'))
        assert line.count('|') == 10 and line.rstrip('| ').endswith(('yes**', 'no'))
    assert 'Holm' in text and 'quick mode: a pipeline check, not evidence' in text
    assert 'None: all 16 primary runs (the teacher caches included) and 6 exploratory runs' in text


def test_report_names_the_runs_that_have_no_result(tmp_path):
    from types import SimpleNamespace
    cfg = SimpleNamespace(quick=True, preset='cpu', data_dir=str(tmp_path), out=str(tmp_path), name='study_quick')
    s = study.settings(cfg)
    choice = {'kd': 'default', 'dkd': 'beta2', 'dist': 'T1', 'icd': 'default', 'X': 'dist'}
    jobs = study.confirm_jobs(cfg, s, {'cnn': 'c', 'clothing': 'cl', 'footwear': 'f'}, choice)
    assert len(jobs) == 2 + 2 * 4 + 2 * 3 + 2 * 3 and [j['stage'] for j in jobs[-6:]] == ['explore'] * 6
    gone = {'confirm-cnn-icd+kd-icd+kd-trained-s1', 'explore-cnn-kd+ls-kd-trained-s0'}
    assert gone <= {j['key'] for j in jobs}
    rng = np.random.default_rng(0)
    rows = [{**{k: str(j.get(k, '')) for k in study.FIELDS}, 'test_top1': f'{rng.uniform(60, 80):.2f}', 'seconds': '1'}
            for j in jobs if j['key'] not in gone]
    text = study.write_report(cfg, s, rows, choice, study.GRID, study.MARGIN, expected=jobs).read_text()
    unfinished = text.split('## Runs not finished')[1]
    assert '* 1 of 16 primary runs have no result' in unfinished and '* 1 of 6 exploratory runs' in unfinished
    assert all(f'`{key}`' in unfinished for key in gone)
    assert 'Nothing yet: 1 primary runs have no result' in text
    assert not (tmp_path / 'study_quick_decision.json').exists()
    p1 = next(line for line in text.splitlines() if line.startswith('| P1 |'))
    assert p1.split('|')[3].strip() == '1'  # icd+kd - kd: only seed 0 has both arms
    done = study.write_report(cfg, s, rows + [{**rows[0], 'key': k} for k in gone], choice, study.GRID, study.MARGIN,
                              expected=jobs).read_text()
    assert 'None: all 16 primary runs (the teacher caches included) and 6 exploratory runs' in done
    decision = json.loads((tmp_path / 'study_quick_decision.json').read_text())
    assert f"teacher of the dataset's classes: **{decision['same_label_space']}**" in done
    assert decision['across_label_spaces'] in ('icd', 'vanilla') and set(decision['holm_p']) == {'P1', 'P2', 'P3', 'P4'}
