"""The sweep (``python -m timm_icd sweep``): real runs side by side, killed and resumed, the test split withheld until
every declared run is in, only relative paths, and its statistics against hand-worked numbers."""
import csv
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from helpers import FAST, REPO, offline_env, run_cli
from timm_icd.base import UserError
from timm_icd.cli.sweep import main as sweep_main
from timm_icd.cli.sweep_runs import FIELDS, commit_of, commit_of_package
from timm_icd.publish.stats import holm, paired
from timm_icd.publish.sweep_report import analyse, write_sweep_report


def _rows(path: Path) -> list:
    if not path.exists():
        return []
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def _numbers(rows, column: str) -> set:
    return {f'{float(r[column]):.2f}' for r in rows if r.get(column)}


@pytest.mark.long
def test_sweep_is_killed_resumes_and_withholds_the_test_split(tmp_path, digits_small, teacher_run):
    out = tmp_path / 'sweep'
    args = ['--student', 'test_resnet', '--teacher', f'local-dir:{teacher_run / "student"}', '--dataset',
            digits_small, '--methods', 'vanilla,icd+kd', '--seeds', '0-1', '--contrast', 'icd+kd-vanilla', '--jobs',
            '2', '--out', out, '--test-split', 'test', '--', '--epochs', '1', '-b', '32', '--lr', '0.1', *FAST]
    args = [str(a) for a in args]
    # the first sweep is killed (the sweep's process alone: its workers die with it) once a run has its row and the
    # report (written after each run) exists
    log = open(tmp_path / 'first.out', 'w')
    first = subprocess.Popen([sys.executable, '-m', 'timm_icd', 'sweep', *args], cwd=REPO, env=offline_env(),
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while first.poll() is None and not (out / 'sweep.md').exists():
            time.sleep(0.2)
        first.send_signal(signal.SIGKILL)
        first.wait(60)
    finally:
        try:
            os.killpg(first.pid, signal.SIGKILL)  # anything of the first sweep still there
        except ProcessLookupError:
            pass
        log.close()
    before = {r['key']: r for r in _rows(out / 'sweep_runs.csv') if r['kind'] == 'run'}
    assert 1 <= len(before) < 4, 'the sweep was to be killed between its first and last run'
    withheld = _rows(out / 'sweep_test_withheld.csv')
    # a run's test row is written just before its run row: the kill may fall between the two for the run after
    assert set(before) <= {r['key'] for r in withheld} and len(withheld) <= len(before) + 1
    assert all(int(r['test_images']) == 72 for r in withheld)
    # test top-1 is k/72 of 72 images; a value a validation top-1 (j/26) or a mean of two (j/52) can also take is
    # printed legitimately (0, 25, 50, 75, 100), so only the others must not appear
    attainable = {f'{100 * j / n:.2f}' for n in (26, 52) for j in range(n + 1)}
    hidden = _numbers(withheld, 'test_top1') - attainable
    printed, report = (tmp_path / 'first.out').read_text(), (out / 'sweep.md').read_text()
    assert 'validation top-1' in printed and not any(n in printed or n in report for n in hidden)
    # the report is rewritten after each run's row: the kill can land between a later row and its report
    shown = int(re.search(r'Withheld: (\d+) of 4 declared runs have a test result', report).group(1))
    assert 1 <= shown <= len(before)
    assert 'test_top1' not in (out / 'sweep_runs.csv').read_text()

    result = run_cli(*args, command='sweep', timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _rows(out / 'sweep_runs.csv')
    runs = {r['key']: r for r in rows if r['kind'] == 'run'}
    assert sorted(runs) == ['icd+kd-s0', 'icd+kd-s1', 'vanilla-s0', 'vanilla-s1'] and len(rows) == 5
    assert all(runs[k] == row for k, row in before.items())  # finished runs were not run again
    assert 'teacher cache' not in result.stdout  # nor the teacher: its cache was written by the first call
    assert list(rows[0]) == FIELDS
    commit = commit_of_package()  # git's HEAD (+dirty with uncommitted changes), or the version outside a checkout
    head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert commit.split('+')[0] == head if head else commit.startswith('timm_icd ')
    for key, r in runs.items():
        started, ended = datetime.fromisoformat(r['started']), datetime.fromisoformat(r['ended'])
        assert started.tzinfo == timezone.utc and started <= ended and float(r['seconds']) > 0
        assert (r['arm'], r['seed'], r['data_seed'], r['epochs'], r['train_rows']) == (
            key.rsplit('-s', 1)[0], key[-1], '0', '1', '230')  # 256 rows less a 10% hold-out
        assert r['val_split'] == 'train[holdout 0.1]' and 0 <= float(r['val_top1']) <= 100
        assert r['commit'] == commit and r['run_dir'] == f'runs/{key}' and r['log'] == f'logs/{key}.log'
        assert (out / r['run_dir'] / 'student' / 'model.safetensors').exists()
        assert f"--seed {r['seed']} --data-seed 0" in r['flags'] and '--val-split holdout' in r['flags']
        assert ('--teacher-cache teacher_cache/t0-student' in r['flags']) == (r['arm'] == 'icd+kd')
        assert '--resume auto' in (out / r['log']).read_text().splitlines()[0]  # a killed run continues
        if r['arm'] == 'icd+kd':
            assert 'the teacher never runs' in (out / r['log']).read_text()  # read from the one cache
            assert r['teacher'].startswith('local-dir:../') and \
                (out / r['teacher'][len('local-dir:'):]).resolve() == (teacher_run / 'student').resolve()
    for path in [out / 'sweep_runs.csv', out / 'sweep.md', out / 'sweep.json', out / 'sweep_test_withheld.csv']:
        text = path.read_text()
        assert str(tmp_path) not in text and not re.search(r'(^|[\s,:`(])/\w', text), path.name
    # every declared run is in: the test numbers are printed and reported
    tests = _rows(out / 'sweep_test_withheld.csv')
    report = (out / 'sweep.md').read_text()
    assert 'Every declared run (4) has a result, so the test numbers are shown' in report
    for arm in ('vanilla', 'icd+kd'):
        mean = sum(float(r['test_top1']) for r in tests if r['arm'] == arm) / 2
        assert f'test {arm}: {mean:.2f} [' in result.stdout and f'| {arm} | `{arm}` | 2 | {mean:.2f} |' in report
    assert (out / 'sweep.png').stat().st_size > 1000


@pytest.mark.long
def test_a_schedulers_signal_stops_the_sweep_with_checkpoints_and_exit_75(tmp_path, digits_small):
    """SIGTERM to the sweep's process alone (a batch script's, say): the two running runs get it from the sweep, save
    a checkpoint at a step boundary, the third never starts, the sweep exits 75; the same command continues them."""
    out = tmp_path / 'sweep'
    args = [str(a) for a in ['--student', 'test_resnet', '--dataset', digits_small, '--methods', 'vanilla', '--seeds',
                             '0-2', '--jobs', '2', '--out', out, '--', '--epochs', '6', '-b', '8', *FAST]]
    proc = subprocess.Popen([sys.executable, '-m', 'timm_icd', 'sweep', *args], cwd=REPO, env=offline_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    logs = [out / 'logs' / f'vanilla-s{s}.log' for s in (0, 1)]
    try:
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline and not all(
                log.exists() and 'Epoch 0:' in log.read_text() for log in logs):  # both are in their 2nd epoch
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 75, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == ('stopped (SIGTERM): the running runs saved a checkpoint; 3 run(s) left; '
                                               'run the same command again to continue them (exit code 75).')
    assert not _rows(out / 'sweep_runs.csv') and not (out / 'runs' / 'vanilla-s2').exists()
    for log in logs:
        assert 'stopped, preempted at epoch' in log.read_text() and 'checkpoint saved' in log.read_text()
    result = run_cli(*args, command='sweep', timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = {r['key']: r for r in _rows(out / 'sweep_runs.csv')}
    assert sorted(runs) == ['vanilla-s0', 'vanilla-s1', 'vanilla-s2'] and {r['epochs'] for r in runs.values()} == {'6'}
    for key in ('vanilla-s0', 'vanilla-s1'):  # continued from the stop's checkpoint, not started again
        assert 'Resumed from' in (out / 'logs' / f'{key}.log').read_text()


def test_the_runs_commit_is_dirty_for_changed_code_not_for_results_written_beside_it(tmp_path):
    def git(*args):
        subprocess.run(['git', '-c', 'user.name=t', '-c', 'user.email=t@t', *args], cwd=tmp_path, check=True,
                       capture_output=True)

    assert commit_of(tmp_path) is None  # not a git checkout: the caller falls back to the version
    (tmp_path / 'benchmarks' / 'results').mkdir(parents=True)
    (tmp_path / 'train.py').write_text('a = 1\n')
    (tmp_path / 'benchmarks' / 'results' / 'runs.csv').write_text('key\n')
    git('init', '-q')
    git('add', '.')
    git('commit', '-qm', 'first')
    head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert commit_of(tmp_path) == head
    (tmp_path / 'benchmarks' / 'results' / 'runs.csv').write_text('key\nrun-s0\n')  # a study's mirror grows
    (tmp_path / 'notes.txt').write_text('untracked\n')
    assert commit_of(tmp_path) == head
    (tmp_path / 'train.py').write_text('a = 2\n')
    assert commit_of(tmp_path) == head + '+dirty'


def test_holm_adjusted_p_values_match_a_hand_worked_example():
    """Seeds 0-3, b - a = 1, 2, 3, 4 and c - a = 1, -1, 2, 0.5. t-tests with 3 df, whose two-sided p is
    1 - 2/pi * (t / (sqrt(3) (1 + t^2 / 3)) + atan(t / sqrt(3))): b, t = 2.5 / (sqrt(5/3) / 2) = 3.8730, p = 0.0304663;
    c, t = 0.625 / (1.25 / 2) = 1, p = 1 - 2/pi * (sqrt(3) / 4 + pi / 6) = 0.3910022. Holm: b 2 x 0.0304663, c
    max(that, 0.3910022). Sign flips: b's |sum| 10 is reached by 2 of 16 assignments (0.125), c's 2.5 by 8 (0.5)."""
    a = {0: 70.0, 1: 71.0, 2: 72.0, 3: 73.0}
    rows = [{'kind': 'run', 'key': f'{arm}-s{s}', 'arm': arm, 'seed': str(s), 'val_top1': repr(v)}
            for arm, shift in (('a', [0, 0, 0, 0]), ('b', [1, 2, 3, 4]), ('c', [1, -1, 2, 0.5]))
            for s, v in ((s, a[s] + shift[s]) for s in a)]
    result = analyse(rows, ['a', 'b', 'c'], [('b', 'a'), ('c', 'a')], 'val_top1', {s: 't0' for s in a})
    b, c = result['contrasts']['b-a'], result['contrasts']['c-a']
    p_b, p_c = 0.030466291662170963, 0.3910022189557705
    assert (b['mean'], c['mean'], b['p'], c['p']) == pytest.approx((2.5, 0.625, p_b, p_c), abs=1e-9)
    assert (b['holm_p'], c['holm_p']) == pytest.approx((2 * p_b, p_c), abs=1e-9)
    assert (b['primary_holm_p'], c['primary_holm_p'], b['established']) == (b['holm_p'], c['holm_p'], False)
    assert (b['permutation_p'], c['permutation_p']) == (0.125, 0.5)
    assert (b['holm_permutation_p'], c['holm_permutation_p']) == (0.25, 0.5)
    assert (b['sign_p'], c['sign_p']) == pytest.approx((2 / 16, 10 / 16))  # 4 of 4 positive; 3 of 4
    assert (b['holm_sign_p'], c['holm_sign_p']) == pytest.approx((0.25, 0.625))
    assert result['arms']['b']['mean'] == pytest.approx(74.0) and b['by_group'] == {'t0': 2.5}
    primary = analyse(rows, ['a', 'b', 'c'], [('b', 'a'), ('c', 'a')], 'val_top1', {}, primary='permutation')
    assert primary['contrasts']['b-a']['primary_holm_p'] == 0.25
    assert holm([0.04, float('nan'), 0.01]) == pytest.approx([0.04, float('nan'), 0.02], nan_ok=True)
    assert paired({0: 1.0}, {1: 2.0})['n'] == 0


def test_report_withholds_test_numbers_until_every_declared_run_is_in(tmp_path):
    declared = [f'{arm}-s{s}' for s in (0, 1) for arm in ('x', 'y')]
    rows = [{'kind': 'run', 'key': k, 'arm': k[0], 'seed': k[-1], 'val_top1': str(50 + i), 'seconds': '60'}
            for i, k in enumerate(declared)]
    tests = {k: {'test_top1': f'{81.25 + i:.2f}'} for i, k in enumerate(declared)}
    args = (tmp_path, ['# t'], {'x': ('kd', []), 'y': ('dist', ['--kd-temperature', '1'])}, [0, 1], {}, [('y', 'x')])
    partial = {k: v for k, v in tests.items() if k != 'y-s1'}
    write_sweep_report(*args, rows, declared, partial, 2)
    text = (tmp_path / 'sweep.md').read_text()
    assert 'Withheld: 3 of 4 declared runs' in text and '81.25' not in text and '82.25' not in text
    analysed = write_sweep_report(*args, rows, declared, tests, 2)
    text = (tmp_path / 'sweep.md').read_text()
    assert 'Every declared run (4) has a result' in text and '| x | `kd` | 2 | 82.25 |' in text
    assert analysed['test']['contrasts']['y-x']['mean'] == pytest.approx(1.0)
    assert '4 runs: median 1.0 min per run (range 1.0 to 1.0)' in text and 'runs x 1.0 min / 2' in text


@pytest.mark.parametrize('extra, message', [
    (['--contrast', 'kd-dist'], "--contrast kd-dist: give it as A-B, two different arms of: vanilla, kd"),
    (['--', '--seed', '3'], '--seed after --: the sweep sets these itself'),
    (['--val-split', 'test'], '--val-split test: the sweep never scores on the test split'),
    (['--test-split', 'nope'], "--test-split nope: dataset"),
])
def test_user_errors_end_in_one_line_before_any_run(tmp_path, digits_small, capsys, extra, message):
    code = sweep_main(['--student', 'test_resnet', '--teacher', 'test_resnet', '--dataset', digits_small,
                       '--methods', 'vanilla,kd', '--out', str(tmp_path / 'sw'), *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.count('\n') == 1 and message in err
    assert not (tmp_path / 'sw').exists()  # nothing written before every check has passed


def test_plan_spreads_seeds_over_teachers_and_pays_each_teacher_once(tmp_path, digits_small):
    """Study 1's design: seeds round-robin over three teachers; one cache per teacher (per data seed with
    ``--data-seed seed``), written before the runs that read it; vanilla reads none."""
    from timm_icd.cli.sweep import create_parser, plan
    argv = ['--student', 'test_resnet', '--teachers', 'test_resnet,resnet10t,local-dir:t3', '--dataset', digits_small,
            '--methods', 'vanilla,kd', '--arm', 'kd1=kd --task-loss-weight 1 --kd-loss-weight 1', '--seeds', '0-4']
    jobs, groups, info = plan(create_parser().parse_args(argv), ['--epochs', '1'], tmp_path)
    caches = [j for j in jobs if j['kind'] == 'cache']
    assert [j['key'] for j in caches] == ['cache-t0', 'cache-t1', 'cache-t2'] and jobs[:3] == caches
    runs = {j['key']: j for j in jobs if j['kind'] == 'run'}
    assert list(runs)[:3] == ['vanilla-s0', 'kd-s0', 'kd1-s0'] and len(runs) == 15
    assert [runs[f'kd-s{s}']['needs'] for s in range(5)] == ['cache-t0', 'cache-t1', 'cache-t2', 'cache-t0', 'cache-t1']
    assert runs['vanilla-s1']['needs'] is None and '--teacher' not in runs['vanilla-s1']['argv']
    assert runs['kd1-s4']['record_argv'][-6:] == ['--task-loss-weight', '1', '--kd-loss-weight', '1', '--epochs', '1']
    assert runs['kd1-s4']['argv'][-4:-2] == ['--output', str(tmp_path / 'runs' / 'kd1-s4')]
    assert groups == {0: 't0 (test_resnet)', 1: 't1 (resnet10t)', 2: 't2 (local-dir:t3)', 3: 't0 (test_resnet)',
                      4: 't1 (resnet10t)'} and info['val_split'] == 'holdout'
    per_seed, _, _ = plan(create_parser().parse_args(argv + ['--data-seed', 'seed']), [], tmp_path)
    assert [j['key'] for j in per_seed if j['kind'] == 'cache'] == [f'cache-t{s % 3}-d{s}' for s in range(5)]
    assert ['--seed', '3', '--data-seed', '3'] == next(j for j in per_seed if j['key'] == 'kd-s3')['argv'][8:12]

    # --only-teacher K: the K-th teacher's seeds (every arm, vanilla too) and its cache; the rest stays declared
    from timm_icd.cli.sweep import _of_teacher
    second = [j['key'] for j in jobs if _of_teacher(j, 1, info)]
    assert second == ['cache-t1', 'vanilla-s1', 'kd-s1', 'kd1-s1', 'vanilla-s4', 'kd-s4', 'kd1-s4']
    assert [j['key'] for j in per_seed if _of_teacher(j, 2, info) and j['kind'] == 'cache'] == ['cache-t2-d2']
    with pytest.raises(UserError, match='--only-teacher 3: this sweep has 3 teacher'):
        _of_teacher(jobs[0], 3, info)


def test_val_split_holdout_scores_on_part_of_train_even_where_a_test_split_exists(digits_small):
    import datasets
    from timm_icd.data import HOLDOUT, load_image_data
    data = load_image_data(digits_small, val_split=HOLDOUT, val_fraction=0.25)
    assert data.eval_split == 'train[holdout 0.25]' and (len(data.train), len(data.eval)) == (192, 64)
    default = load_image_data(digits_small)
    assert default.eval_split == 'test' and len(default.eval) == 72  # train_icd.py's own default is unchanged
    named = datasets.DatasetDict(train=datasets.load_from_disk(digits_small)['train'],
                                 holdout=datasets.load_from_disk(digits_small)['test'])
    assert len(load_image_data(named, val_split=HOLDOUT).eval) == 72  # a split of that name is that split
