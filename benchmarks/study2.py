#!/usr/bin/env python3
"""The second pre-registered study (``benchmarks/results/protocol2.md``): the best student by default, as three
``python -m timm_icd sweep`` sweeps (one per pair of teacher and student) on the first study's Fashion-MNIST splits.

This file only defines the study: the data (``study.build_data``), the teachers (each pair's four trained by a sweep
of ``--method vanilla`` runs), the pairs' arms, seeds and contrasts. Running, resuming, withholding the test split and
the statistics are the sweep's (``timm_icd.cli.sweep``, ``timm_icd.publish.stats``); ``study2_report.py`` combines
the three sweeps' rows for Holm over the four primary contrasts and applies the protocol's decision rule.

    python benchmarks/study2.py runs       # teacher by teacher: its weights, then its seeds' runs (resumes)
    python benchmarks/study2.py runs --max-blocks 3   # at most 3 teachers' blocks in this call (a session's share)
    python benchmarks/study2.py teachers   # only the 3 x 4 teachers (retrained when missing; sha256 recorded)
    python benchmarks/study2.py report     # study2.md, study2_runs.csv, study2_decision.json
    python benchmarks/study2.py all        # runs, then report
    python benchmarks/study2.py sync --every 600 &   # mirror the sweeps' CSVs into results/study2/ (committed)
    python benchmarks/study2.py all --quick          # tiny data, 1-2 epochs, 2 teachers, 2 seeds (the tests)
    python benchmarks/study2.py all --preset gpu     # every training image, batch 256, lr x4, 8 runs side by side

Across sessions the work tree may be laid anew and ``benchmarks/data`` is not committed: each pair's ``sweep_runs.csv``
and ``sweep_test_withheld.csv`` are mirrored into ``results/study2/<pair>/``, and restored from there into an empty
sweep folder, so a finished run is never run again. A teacher's weights are not committed, and retraining one on
another CPU gives other weights (other floating-point kernels), so the runs go by **teacher blocks**
(``protocol2_execution.md``): a pair's teacher, then every run of the seeds it teaches (``sweep --only-teacher K``), a
block at a time. Each teacher's sha256 is recorded in ``results/study2/teachers.json`` when first trained; a teacher
retrained with other weights replaces the record (kept under ``replaced``), and the finished runs the old weights
taught are set aside (``set_aside_runs.csv``, ``set_aside_test_withheld.csv``; never analysed) and run again, so no
seed is ever taught by two teachers. No test number is printed or reported before every primary run of every pair is
in (the sweep prints a pair's own once that pair is complete: those lines are dropped here).
"""
import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import study  # noqa: E402
from study2_report import ADAPTED, SET_ASIDE, SET_ASIDE_TEST, adapted_teachers, load, write_report  # noqa: E402
from timm_icd.base import UserError, write_text_atomic  # noqa: E402
from timm_icd.cli.common import run_command  # noqa: E402
from timm_icd.run import PREEMPTED_EXIT_CODE  # noqa: E402
from timm_icd.cli.sweep import sweep  # noqa: E402
from timm_icd.cli.sweep_runs import FIELDS, RUNS_CSV, TEST_CSV, TEST_FIELDS, read_csv, write_csv  # noqa: E402

HERE = Path(__file__).resolve().parent
TRANSFER_X = 'dist'  # the logit term of C3's adapted-teacher arm (protocol2.md, "How X was fixed")
SEEDS = list(range(200, 220))
TEACHER_LR, STUDENT_LR = 0.05, 0.01


def pairs() -> Dict[str, dict]:
    """The three pairs: data, models, input size, teacher seeds, arms (name -> 'METHOD FLAGS') and contrasts
    (name, arm A, arm B: the mean of A - B). ``cache``: whether the sweep writes teacher caches (not across label
    spaces, where every run adapts its teacher in its own folder, as the protocol's run order says)."""
    return {
        'cnn': dict(label='A', data='cnn', teacher_data='cnn', teacher='resnet18', student='mobilenetv3_small_050',
                    px=28, teacher_seeds=2000, cache=True,
                    arms={'dist': 'dist', 'icd+kd': 'icd+kd', 'kd1': 'kd --task-loss-weight 1 --kd-loss-weight 1'},
                    contrasts=[('C1', 'dist', 'icd+kd'), ('C2', 'icd+kd', 'kd1')], explore=[('dist', 'kd1')]),
        'transfer': dict(label='T', data='footwear', teacher_data='clothing', teacher='resnet18',
                         student='mobilenetv3_small_050', px=28, teacher_seeds=2010, cache=False,
                         arms={'vanilla': 'vanilla', 'adaptX': TRANSFER_X}, contrasts=[('C3', 'adaptX', 'vanilla')],
                         explore=[]),
        'second': dict(label='B', data='cnn', teacher_data='cnn', teacher='convnext_atto', student='mobilevit_xxs',
                       px=32, teacher_seeds=2020, cache=True, arms={'dist': 'dist', 'icd+kd': 'icd+kd'},
                       contrasts=[('C4', 'dist', 'icd+kd')], explore=[]),
    }


def settings(cfg) -> dict:
    """The first study's sizes and lengths for the preset (or --quick), with this study's seeds and teacher count."""
    s = study.settings(cfg)
    s.update(seeds=SEEDS, teachers=4)
    if cfg.quick:  # a pipeline check on a CPU, whatever the preset
        s.update(seeds=SEEDS[:2], teachers=2, epochs=1, jobs=min(s['jobs'], 2), threads=1)
    if cfg.jobs:
        s['jobs'] = cfg.jobs
    return s


def run_flags(s: dict, px: int, epochs: int) -> List[str]:
    """The first study's flags for every run (``study.common_flags``) at ``px`` pixels, without --dataset (the sweep
    sets it)."""
    flags = study.common_flags(s, '', epochs)[2:]
    i = flags.index('--input-size')
    flags[i + 2:i + 4] = [str(px), str(px)]
    return flags


def folders(cfg) -> Dict[str, Path]:
    data = Path(cfg.data_dir).absolute() / cfg.name
    results = Path(cfg.out).absolute()
    return {'data': data, 'teachers': data / 'teachers', 'sweeps': data / 'sweeps', 'mirror': results / cfg.name,
            'results': results}


def teacher_dirs(cfg, s: dict, pair: str) -> List[Path]:
    p = pairs()[pair]
    root = folders(cfg)['teachers'] / pair
    return [root / 'runs' / f"vanilla-s{p['teacher_seeds'] + k}" / 'student' for k in range(s['teachers'])]


def teacher_argv(cfg, s: dict, data: Dict[str, str], pair: str, ks: List[int]) -> List[str]:
    """The sweep that trains the pair's teachers ``ks``: ``--method vanilla`` runs of the teacher architecture, one per
    teacher seed, as ``study.teacher_jobs`` trains them (lr 0.05, the teacher epochs, the common flags)."""
    p = pairs()[pair]
    return ['--student', p['teacher'], '--dataset', data[p['teacher_data']], '--methods', 'vanilla',
            '--seeds', ','.join(str(p['teacher_seeds'] + k) for k in ks), '--val-split', 'validation',
            '--out', str(folders(cfg)['teachers'] / pair), '--jobs', str(s['jobs']), '--threads', str(s['threads']),
            '--', '--lr', f"{TEACHER_LR * s['lr_scale']:g}", *run_flags(s, p['px'], s['teacher_epochs'])]


def study_argv(cfg, s: dict, data: Dict[str, str], pair: str) -> List[str]:
    """The sweep of a pair's arms x seeds, seeds round-robin over its teachers, test split withheld."""
    p = pairs()[pair]
    argv = ['--student', p['student'], '--dataset', data[p['data']],
            '--teacher', *[f'local-dir:{t}' for t in teacher_dirs(cfg, s, pair)]]
    for name, spec in p['arms'].items():
        argv += ['--arm', f'{name}={spec}']
    for _, a, b in p['contrasts']:
        argv += ['--contrast', f'{a}-{b}']
    argv += ['--seeds', ','.join(map(str, s['seeds'])), '--val-split', 'validation', '--test-split', 'test',
             '--out', str(folders(cfg)['sweeps'] / pair), '--jobs', str(s['jobs']), '--threads', str(s['threads'])]
    if not p['cache']:
        argv += ['--teacher-cache', 'none']
    return argv + ['--', '--lr', f"{STUDENT_LR * s['lr_scale']:g}", *run_flags(s, p['px'], s['epochs'])]


def declared(s: dict, pair: str) -> List[str]:
    """The keys of a pair's primary runs, as the sweep names them."""
    return [f'{arm}-s{seed}' for seed in s['seeds'] for arm in pairs()[pair]['arms']]


def block_seeds(s: dict, k: int) -> List[int]:
    """The seeds the pair's k-th teacher teaches (round-robin, as the sweep assigns them)."""
    return [seed for i, seed in enumerate(s['seeds']) if i % s['teachers'] == k]


def block_todo(cfg, s: dict, pair: str, k: int) -> List[str]:
    done = {r['key'] for r in read_csv(folders(cfg)['sweeps'] / pair / RUNS_CSV) if r['kind'] == 'run'}
    return [f'{arm}-s{seed}' for seed in block_seeds(s, k) for arm in pairs()[pair]['arms']
            if f'{arm}-s{seed}' not in done]


class _Withhold(io.TextIOBase):
    """The sweep's standard output without its summary lines of the test split (``test ARM: ...``)."""

    def __init__(self, target) -> None:
        self.target, self.pending = target, ''

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split('\n')
        for line in lines:
            if not line.startswith('test '):
                self.target.write(line + '\n')
        self.target.flush()
        return len(text)


def run_sweep(argv: List[str]) -> int:
    """``python -m timm_icd sweep ARGV`` in this process, its test-split summary lines dropped."""
    with contextlib.redirect_stdout(_Withhold(sys.stdout)):
        return sweep(argv)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def ensure_teacher(cfg, s: dict, data: Dict[str, str], pair: str, k: int) -> int:
    """Train the pair's k-th teacher if its weights are missing, then record its sha256 in ``teachers.json`` (the
    first time) or check it. A teacher retrained with other weights replaces the record, and the finished runs the
    recorded weights taught are set aside and run again (``set_aside``): a seed is never taught by two teachers."""
    root = folders(cfg)['teachers'] / pair
    rows = read_csv(root / RUNS_CSV)
    kept = [r for r in rows if r['kind'] != 'run' or (root / r['run_dir'] / 'student' / 'model.safetensors').exists()]
    if len(kept) != len(rows):  # a row whose weights are gone (a new work tree): the sweep trains it again
        write_csv(root / RUNS_CSV, list(rows[0]), kept)
    weights = teacher_dirs(cfg, s, pair)[k] / 'model.safetensors'
    seed = pairs()[pair]['teacher_seeds'] + k
    rc = 0
    if not weights.exists():
        print(f'pair {pairs()[pair]["label"]} ({pair}): training its teacher {seed}', flush=True)
        rc = run_sweep(teacher_argv(cfg, s, data, pair, [k]))
        if not weights.exists():
            return rc or 1
    path = folders(cfg)['mirror'] / 'teachers.json'
    try:
        recorded = json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        raise UserError(f'{path} is damaged: it holds the sha256 of every teacher of this study; restore it from git.')
    name, digest = f'{pair}-teacher{seed}', sha256(weights)
    if recorded.get(name, {}).get('sha256') == digest:
        return rc
    row = {r['key']: r for r in read_csv(root / RUNS_CSV)}.get(f'vanilla-s{seed}', {})
    entry = {'pair': pair, 'seed': seed, 'sha256': digest, 'val_top1': row.get('val_top1'),
             'seconds': row.get('seconds'), 'flags': row.get('flags'), 'commit': row.get('commit')}
    if name in recorded:
        old = recorded[name]
        moved = set_aside(cfg, s, pair, k, f"taught by {name} sha256 {old['sha256'][:12]}")
        entry['replaced'] = old.get('replaced', []) + [
            {key: old.get(key) for key in ('sha256', 'val_top1', 'commit')} | {'runs_set_aside': moved}]
        print(f"teacher {name} retrained with other weights (sha256 {digest[:12]}, recorded {old['sha256'][:12]}): "
              f"{moved} finished run(s) it taught set aside, to run again", flush=True)
    recorded[name] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(recorded, indent=1, sort_keys=True) + '\n')
    return rc


def set_aside(cfg, s: dict, pair: str, k: int, why: str) -> int:
    """Move the finished teacher-using runs of the k-th teacher's seeds, and its cache, out of the pair's sweep (their
    rows to ``set_aside_runs.csv``, their test rows unread to ``set_aside_test_withheld.csv``, their folders deleted)
    so that the sweep runs them again; the number of runs moved."""
    root = folders(cfg)['sweeps'] / pair
    seeds = {str(seed) for seed in block_seeds(s, k)}
    rows = read_csv(root / RUNS_CSV)
    gone = [r for r in rows if r['kind'] == 'run' and r['teacher'] and r['seed'] in seeds
            or r['kind'] == 'cache' and r['key'].split('-')[1] == f't{k}']
    if not gone:
        return 0
    keys = {r['key'] for r in gone}
    tests = read_csv(root / TEST_CSV)
    write_csv(root / SET_ASIDE, [*FIELDS, 'set_aside'],
              read_csv(root / SET_ASIDE) + [{**r, 'set_aside': why} for r in gone])
    write_csv(root / SET_ASIDE_TEST, [*TEST_FIELDS, 'set_aside'], read_csv(root / SET_ASIDE_TEST) + [
        {**t, 'set_aside': why} for t in tests if t['key'] in keys])
    write_csv(root / TEST_CSV, TEST_FIELDS, [t for t in tests if t['key'] not in keys])
    write_csv(root / RUNS_CSV, FIELDS, [r for r in rows if r['key'] not in keys])
    for r in gone:
        if r['run_dir']:
            shutil.rmtree(root / r['run_dir'], ignore_errors=True)
    for cache in (root / 'teacher_cache').glob(f't{k}-*'):
        shutil.rmtree(cache, ignore_errors=True)
    adapted = folders(cfg)['mirror'] / pair / ADAPTED  # the replaced teacher's adapted head is measured again
    if adapted.exists():
        known = json.loads(adapted.read_text())
        known.pop(f"{pair}-teacher{pairs()[pair]['teacher_seeds'] + k}", None)
        write_text_atomic(adapted, json.dumps(known, indent=1, sort_keys=True) + '\n')
    sync(cfg)
    return sum(r['kind'] == 'run' for r in gone)


def sync(cfg) -> None:
    """Copy each pair's sweep CSVs into ``results/<name>/<pair>/``: the runs first, then the test rows (the sweep
    writes a run's test row before its run row, so the copy never holds a run without its test row)."""
    for pair in pairs():
        source, target = folders(cfg)['sweeps'] / pair, folders(cfg)['mirror'] / pair
        for name in (RUNS_CSV, TEST_CSV, SET_ASIDE, SET_ASIDE_TEST):
            if (source / name).exists():
                target.mkdir(parents=True, exist_ok=True)
                write_text_atomic(target / name, (source / name).read_text())


def restore(cfg, pair: str) -> None:
    """Into a sweep folder with no CSV, the committed copies: their finished runs are kept, not run again."""
    source, target = folders(cfg)['mirror'] / pair, folders(cfg)['sweeps'] / pair
    if (target / RUNS_CSV).exists() or not (source / RUNS_CSV).exists():
        return
    target.mkdir(parents=True, exist_ok=True)
    for name in (TEST_CSV, RUNS_CSV, SET_ASIDE, SET_ASIDE_TEST):
        if (source / name).exists():
            shutil.copyfile(source / name, target / name)
    print(f'{pair}: restored {RUNS_CSV} and {TEST_CSV} from {os.path.relpath(source)}', flush=True)


def runs(cfg, s: dict, data: Dict[str, str]) -> int:
    """Pair A, T, B in turn, teacher block by teacher block: restore the pair's CSVs, skip a block whose runs are all
    in, else its teacher, then its seeds' runs (``--only-teacher K``); at most ``cfg.max_blocks`` blocks."""
    rc, blocks = 0, 0
    for pair, p in pairs().items():
        restore(cfg, pair)
        for k in range(s['teachers']):
            if not block_todo(cfg, s, pair, k):
                continue
            if cfg.max_blocks and blocks == cfg.max_blocks:
                print(f'stopped after {blocks} teacher block(s) (--max-blocks): run the same command to go on',
                      flush=True)
                return rc
            blocks += 1
            teacher_rc = ensure_teacher(cfg, s, data, pair, k)
            rc = teacher_rc or rc
            if teacher_rc:
                continue
            todo = block_todo(cfg, s, pair, k)
            print(f"pair {p['label']} ({pair}), teacher {p['teacher_seeds'] + k} (seeds "
                  f"{','.join(map(str, block_seeds(s, k)))}): {len(todo)} run(s) to do", flush=True)
            argv = study_argv(cfg, s, data, pair)
            split = argv.index('--')
            block_rc = run_sweep(argv[:split] + ['--only-teacher', str(k)] + argv[split:])
            rc = block_rc or rc
            sync(cfg)
            if block_rc == PREEMPTED_EXIT_CODE:  # a scheduler's signal: the runs saved a checkpoint; stop here
                return rc
            if pair == 'transfer':  # each adapted teacher's test top-1 (exploratory), withheld, while it is here
                adapted_teachers(load(folders(cfg)['mirror'], pairs()), data, folders(cfg)['sweeps'],
                                 folders(cfg)['mirror'])
        if not any(block_todo(cfg, s, pair, k) for k in range(s['teachers'])):
            print(f"pair {p['label']} ({pair}): all {len(declared(s, pair))} runs are in", flush=True)
    return rc


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('stage', choices=('teachers', 'runs', 'report', 'all', 'sync'))
    parser.add_argument('--quick', action='store_true', help='tiny data and 1-2 epochs (for the tests)')
    parser.add_argument('--preset', choices=('cpu', 'gpu'), default='cpu')
    parser.add_argument('--out', default=str(HERE / 'results'), help='results folder')
    parser.add_argument('--data-dir', default=str(HERE / 'data'), help='datasets, teachers and sweep folders')
    parser.add_argument('--jobs', type=int, default=None, help="runs at a time (default: the preset's)")
    parser.add_argument('--max-blocks', type=int, default=0, metavar='N',
                        help="runs: at most N teachers' blocks in this call (default: all)")
    parser.add_argument('--every', type=float, default=0, metavar='SECONDS',
                        help='sync: repeat every SECONDS until killed (default: once)')
    cfg = parser.parse_args(argv)
    cfg.name = 'study2' + ('_gpu' if cfg.preset == 'gpu' else '') + ('_quick' if cfg.quick else '')
    return run_command(lambda: _main(cfg), interrupted='interrupted: run the same command again to continue '
                                                       '(finished runs are kept; the others resume)')


def _main(cfg) -> int:
    s = settings(cfg)
    os.environ.update(HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1')
    if cfg.stage == 'sync':
        while True:
            sync(cfg)
            if not cfg.every:
                return 0
            time.sleep(cfg.every)
    data = study.data_paths(cfg) if cfg.stage == 'report' else study.build_data(cfg, s)
    rc = 0
    if cfg.stage == 'teachers':
        for pair in pairs():
            restore(cfg, pair)
            for k in range(s['teachers']):
                rc = ensure_teacher(cfg, s, data, pair, k) or rc
    if cfg.stage in ('runs', 'all'):
        rc = runs(cfg, s, data) or rc
    if cfg.stage in ('report', 'all'):
        sync(cfg)
        path = write_report(cfg, s, pairs(), {pair: declared(s, pair) for pair in pairs()}, data, TRANSFER_X)
        print(f'report: {os.path.relpath(path)}', flush=True)
    return rc


if __name__ == '__main__':
    sys.exit(main())
