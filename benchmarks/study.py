#!/usr/bin/env python3
"""The pre-registered study (``benchmarks/results/protocol.md``): which method makes the best student, corrected for
multiple comparisons.

Every run is a real ``train_icd.py`` run (``timm_icd.run.run``) in a worker process with one torch thread, two at a
time; the teachers are trained with ``--method vanilla`` by the same tool, and each seed's teacher outputs are paid
for once with ``python -m timm_icd cache`` (``timm_icd.run.write_ahead``) and read by every method of that seed.

    python benchmarks/study.py teachers    # the 3 + 3 teachers
    python benchmarks/study.py tune        # 3 configurations per family x 2 seeds, scored on the VALIDATION split
    python benchmarks/study.py confirm     # the confirmatory runs: primary first, then exploratory
    python benchmarks/study.py report      # study.md from study_runs.csv (Holm-adjusted p for P1-P4)
    python benchmarks/study.py all         # the four in order (~8 h on 2 CPU cores)
    python benchmarks/study.py all --quick # tiny data, 1-2 epochs, for the tests (about a minute)
    python benchmarks/study.py all --preset gpu   # every training image on one GPU: primary runs only, side by side,
                                                  # with the CPU study's tuned settings (results/study_runs.csv)

An interrupted stage resumes: finished runs are kept (one row each in ``study_runs.csv``), a killed run continues
from its last checkpoint (``--resume auto``). Tuning rows never carry a test number: the test split is evaluated
only in the confirm stage, once per run, after training.
"""
import argparse
import csv
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Dict, List

import datasets
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_csv, fashion_mnist, subset  # noqa: E402
from study_stats import write_report  # noqa: E402

HERE = Path(__file__).resolve().parent
CLOTHING, FOOTWEAR = (0, 1, 2, 3, 4, 6), (5, 7, 8, 9)
STUDENT, TEACHER = 'mobilenetv3_small_050', 'resnet18'
FIELDS = ['stage', 'key', 'family', 'config', 'method', 'pair', 'seed', 'teacher', 'epochs', 'train_rows', 'val_top1',
          'test_top1', 'test_top5', 'test_images', 'tau', 'train_loss_ce', 'seconds', 'flags']

# the tuning grid: per family, configurations as extra flags (the first is the authors' default), the method that
# tunes it; the same budget for every family (3 configurations x the tuning seeds)
GRID = {
    'kd': ('kd', {'default': [], 'T2': ['--kd-temperature', '2'],
                  'w1': ['--task-loss-weight', '1', '--kd-loss-weight', '1']}),
    # 'default' is the authors' setting the protocol tuned from, spelled out: the tool's own defaults became the
    # tuning's choices afterwards (--dkd-beta 2, --kd-temperature 1 for dist), as the protocol said they would
    'dkd': ('dkd', {'default': ['--dkd-beta', '8'], 'beta2': ['--dkd-beta', '2'], 'beta0.5': ['--dkd-beta', '0.5']}),
    'dist': ('dist', {'default': ['--kd-temperature', '4'], 'T2': ['--kd-temperature', '2'],
                      'T1': ['--kd-temperature', '1']}),
    'icd': ('icd+kd', {'default': [], 'noclamp': ['--icd-max-tau', '1000'], 'w0.5': ['--icd-loss-weight', '0.5']}),
}
MARGIN = 0.5  # a configuration replaces the default only when its validation mean is higher by more than this


def settings(cfg) -> dict:
    """Sizes and lengths of the preset (cpu, gpu) or of --quick."""
    s = dict(train_per_class=600, val_per_class=100, foot_train_per_class=300, epochs=24, teacher_epochs=10,
             seeds=list(range(10)), tune_seeds=[100, 101], teachers=3, batch=64, lr_scale=1, jobs=2, threads=1,
             test_per_class=0, dkd_warmup=2, explore=True)
    if cfg.preset == 'gpu':  # every training image but the validation ones; runs side by side on the one device
        s.update(train_per_class=0, foot_train_per_class=0, jobs=8, threads=2, batch=256, lr_scale=4, explore=False)
    if cfg.quick:
        s.update(train_per_class=16, val_per_class=8, foot_train_per_class=16, epochs=2, teacher_epochs=1,
                 seeds=[0, 1], tune_seeds=[100], teachers=2, test_per_class=16, dkd_warmup=1, batch=16)
    return s


def data_paths(cfg) -> Dict[str, str]:
    """Where the three datasets are (or will be): the report needs their names only, never the data."""
    return {name: str(Path(cfg.data_dir) / cfg.name / name) for name in ('cnn', 'clothing', 'footwear')}


def build_data(cfg, s) -> Dict[str, str]:
    """The three datasets of the protocol as save_to_disk folders (train, validation, test), built once."""
    specs = {'cnn': (tuple(range(10)), s['train_per_class']), 'clothing': (CLOTHING, s['train_per_class']),
             'footwear': (FOOTWEAR, s['foot_train_per_class'])}
    paths = data_paths(cfg)
    if all((Path(p) / 'dataset_dict.json').exists() for p in paths.values()):
        return paths
    dd = fashion_mnist(Path(cfg.data_dir))
    for name, (classes, per_class) in specs.items():  # validation first: train never holds one of its images
        val, held_out = subset(dd['train'], s['val_per_class'], classes, seed=1)
        train, _ = subset(dd['train'], per_class, classes, seed=0, exclude=held_out)
        test, _ = subset(dd['test'], s['test_per_class'], classes, seed=2)
        datasets.DatasetDict(train=train, validation=val, test=test).save_to_disk(paths[name])
    return paths


def common_flags(s, data: str, epochs: int) -> List[str]:
    return ['--dataset', data, '--input-size', '3', '28', '28', '--scale', '0.6', '1', '--hflip', '0.5',
            '--color-jitter', '0', '--train-interpolation', 'bilinear', '--interpolation', 'bilinear', '--crop-pct',
            '1.0', '-b', str(s['batch']), '-j', '0', '--epochs', str(epochs), '--keep-checkpoints', '1']


def teacher_jobs(cfg, s, data) -> List[dict]:
    jobs = []
    for pair, dataset in (('cnn', data['cnn']), ('transfer', data['clothing'])):
        for k in range(s['teachers']):
            flags = ['--method', 'vanilla', '--student', TEACHER, '--lr', str(0.05 * s['lr_scale']), '--seed',
                     str(1000 + k),
                     *common_flags(s, dataset, s['teacher_epochs'])]
            jobs.append(dict(stage='teachers', key=f'{pair}-teacher{k}', family='teacher', config='', method='vanilla',
                             pair=pair, seed=1000 + k, teacher='', flags=flags))
    return jobs


def teacher_dir(cfg, pair: str, k: int) -> Path:
    return Path(cfg.data_dir) / cfg.name / 'runs' / 'teachers' / f'{pair}-teacher{k}' / 'student'


def cache_dir(cfg, k: int, seed: int) -> Path:
    return Path(cfg.data_dir) / cfg.name / 'cache' / f'cnn-teacher{k}-seed{seed}'


def distill_job(cfg, s, data, stage: str, family: str, config: str, method: str, seed: int, extra: List[str],
                pair: str = 'cnn', teacher: str = 'trained') -> dict:
    k = seed % s['teachers']
    flags = ['--method', method, '--student', STUDENT, '--seed', str(seed), '--lr', str(0.01 * s['lr_scale']),
             *common_flags(s, data['cnn' if pair == 'cnn' else 'footwear'], s['epochs']),
             '--dkd-warmup-epochs', str(s['dkd_warmup']), *extra]
    if method != 'vanilla' and teacher == 'trained':
        flags += ['--teacher', f'local-dir:{teacher_dir(cfg, pair, k)}']
        if pair == 'cnn':
            flags += ['--teacher-cache', str(cache_dir(cfg, k, seed))]
    elif method != 'vanilla':  # the same architecture, randomly initialised (drawn from --seed)
        flags += ['--teacher', TEACHER, '--teacher-pretrained', 'false']
    key = f'{stage}-{pair}-{family}' + (f'-{config}' if stage == 'tune' else '') + f'-{method}-{teacher}-s{seed}'
    return dict(stage=stage, key=key, family=family, config=config, method=method, pair=pair, seed=seed,
                teacher=f'{pair}-teacher{k}' if method != 'vanilla' and teacher == 'trained' else
                (f'random(seed {seed})' if method != 'vanilla' else ''), flags=flags)


def cache_job(cfg, s, data, seed: int) -> dict:
    k = seed % s['teachers']
    flags = ['--teacher', f'local-dir:{teacher_dir(cfg, "cnn", k)}', '--method', 'kd', '--student', STUDENT,
             '--seed', str(seed), '--teacher-cache', str(cache_dir(cfg, k, seed)),
             *common_flags(s, data['cnn'], s['epochs'])]
    return dict(stage='cache', key=f'cache-cnn-teacher{k}-seed{seed}', family='cache', config='', method='cache',
                pair='cnn', seed=seed, teacher=f'cnn-teacher{k}', flags=flags)


def tune_jobs(cfg, s, data) -> List[dict]:
    return [distill_job(cfg, s, data, 'tune', family, config, method, seed, extra)
            for seed in s['tune_seeds'] for family, (method, configs) in GRID.items()
            for config, extra in configs.items()]


def selected(rows: List[dict], seeds: int) -> Dict[str, str]:
    """The protocol's rule: per family, the configuration with the highest mean validation top-1 over the ``seeds``
    tuning seeds, if it beats the default's by more than MARGIN points; else the default. Plus 'X': dkd or dist.
    Refused unless every configuration of every family has a row for each tuning seed."""
    means = {}
    for row in rows:
        if row['stage'] == 'tune':
            means.setdefault((row['family'], row['config']), []).append(float(row['val_top1']))
    choice, best = {}, {}
    for family, (_, configs) in GRID.items():
        done = {c: len(means.get((family, c), [])) for c in configs}
        if any(n < seeds for n in done.values()):
            missing = ', '.join(f'{c} ({n} of {seeds} seeds)' for c, n in done.items() if n < seeds)
            raise SystemExit(f'tuning of {family} is not complete: {missing}; run the tune stage first.')
        scores = {c: float(np.mean(means[(family, c)])) for c in configs}
        top = max(scores, key=scores.get)
        choice[family] = top if scores[top] > scores['default'] + MARGIN else 'default'
        best[family] = scores[choice[family]]
    choice['X'] = 'dkd' if best['dkd'] >= best['dist'] else 'dist'
    return choice


def confirm_jobs(cfg, s, data, choice: Dict[str, str]) -> List[dict]:
    """Primary runs first (the caches, P1 and P2 on the CNN pair, P3 and P4 across label spaces), then exploratory
    (unless the preset leaves them out)."""
    flags = {family: GRID[family][1][choice[family]] for family in GRID}
    x = choice['X']
    icd, kd = flags['icd'], flags['kd']
    jobs = [cache_job(cfg, s, data, seed) for seed in s['seeds']]
    for seed in s['seeds']:
        jobs += [distill_job(cfg, s, data, 'confirm', 'kd', choice['kd'], 'kd', seed, kd),
                 distill_job(cfg, s, data, 'confirm', 'icd+kd', f"{choice['kd']}|{choice['icd']}", 'icd+kd', seed,
                             kd + icd),
                 distill_job(cfg, s, data, 'confirm', x, choice[x], x, seed, flags[x]),
                 distill_job(cfg, s, data, 'confirm', f'icd+{x}', f"{choice[x]}|{choice['icd']}", f'icd+{x}', seed,
                             flags[x] + icd)]
    for seed in s['seeds']:
        jobs += [distill_job(cfg, s, data, 'confirm', 'icd', choice['icd'], 'icd', seed, icd, pair='transfer'),
                 distill_job(cfg, s, data, 'confirm', 'vanilla', '', 'vanilla', seed, [], pair='transfer'),
                 distill_job(cfg, s, data, 'confirm', 'icd', choice['icd'], 'icd', seed, icd, pair='transfer',
                             teacher='random')]
    other = 'dist' if x == 'dkd' else 'dkd'
    for seed in s['seeds']:  # exploratory: no claim rests on these
        jobs += [distill_job(cfg, s, data, 'explore', 'vanilla', '', 'vanilla', seed, []),
                 distill_job(cfg, s, data, 'explore', 'kd+ls', choice['kd'], 'kd', seed, kd + ['--kd-standardize']
                             + ([] if '--kd-temperature' in kd else ['--kd-temperature', '4'])),  # KD's own T
                 distill_job(cfg, s, data, 'explore', other, choice[other], other, seed, flags[other])]
    return jobs if s['explore'] else [j for j in jobs if j['stage'] != 'explore']


def _redirect(log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)


def run_job(job: dict, out_dir: str, threads: int, data: Dict[str, str]) -> dict:
    """One run, in a worker process: train (or write the cache), then, in the confirm stages, the test split."""
    import torch
    torch.set_num_threads(threads)
    from timm_icd.cli.validate import validate
    from timm_icd.run import parse_and_validate, run, write_ahead
    out = Path(out_dir) / job['stage'] / job['key']
    _redirect(out.parent / f'{out.name}.log')
    started = time.time()
    row = {k: job.get(k, '') for k in FIELDS if k != 'flags'}
    row['flags'] = ' '.join(job['flags'])
    if job['stage'] == 'cache':
        write_ahead(parse_and_validate(job['flags']))
        return {**row, 'seconds': round(time.time() - started, 1)}
    argv = [*job['flags'], '--output', str(out), '--resume', 'auto']
    result = run(parse_and_validate(argv), argv)
    summary = list(csv.DictReader(open(out / 'summary.csv')))
    last = summary[-1]
    row.update(epochs=len(summary), train_rows=json.loads((out / 'student' / 'distillation.json').read_text())[
        'dataset']['train_rows'], val_top1=result['top1'], tau=last.get('train_tau'),
        train_loss_ce=last.get('train_loss_ce'))
    if job['stage'] in ('confirm', 'explore'):  # the test split, once, after training; never in tuning
        dataset = data['cnn' if job['pair'] == 'cnn' else 'footwear']
        test = validate(str(out / 'student'), dataset, split='test', batch_size=500, workers=0)
        row.update(test_top1=test['top1'], test_top5=test['top5'], test_images=test['images'])
    row['seconds'] = round(time.time() - started, 1)
    return row


def execute(cfg, s, data, jobs: List[dict]) -> None:
    """Run what ``jobs`` lists and the CSV does not hold yet, ``s['jobs']`` at a time; a row per finished run."""
    runs_csv = Path(cfg.out) / f'{cfg.name}_runs.csv'
    done = {r['key'] for r in read_rows(runs_csv)}
    todo = [j for j in jobs if j['key'] not in done]
    print(f"{len(todo)} runs to do ({len(jobs) - len(todo)} done), {s['jobs']} at a time", flush=True)
    started = time.time()
    out_dir = str(Path(cfg.data_dir) / cfg.name / 'runs')
    with ProcessPoolExecutor(s['jobs'], mp_context=get_context('spawn')) as pool:
        futures = {pool.submit(run_job, j, out_dir, s['threads'], data): j for j in todo}
        for future in as_completed(futures):
            job, row = futures[future], future.result()
            append_csv(runs_csv, FIELDS, row)
            shown = f"test {float(row['test_top1']):.2f}" if row.get('test_top1') not in ('', None) else \
                f"val {float(row['val_top1']):.2f}" if row.get('val_top1') not in ('', None) else 'done'
            print(f"{row['stage']:8s} {job['key']}: {shown} ({row['seconds']:.0f}s; {time.time() - started:.0f}s "
                  f"in all)", flush=True)


def read_rows(path: Path) -> List[dict]:
    if not path.exists():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('stage', choices=('teachers', 'tune', 'confirm', 'report', 'all'))
    parser.add_argument('--quick', action='store_true', help='tiny data and 1-2 epochs (for the tests)')
    parser.add_argument('--preset', choices=('cpu', 'gpu'), default='cpu')
    parser.add_argument('--out', default=str(HERE / 'results'), help='results folder')
    parser.add_argument('--data-dir', default=str(HERE / 'data'), help='datasets, teachers, caches and run folders')
    parser.add_argument('--jobs', type=int, default=None, help='runs at a time (default: the preset\'s)')
    parser.add_argument('--tuned-from', default=None, metavar='CSV',
                        help='take the tuning selection from this runs CSV instead of tuning (default for --preset '
                             'gpu: the CPU study\'s results/study_runs.csv)')
    cfg = parser.parse_args(argv)
    cfg.name = 'study' + ('_gpu' if cfg.preset == 'gpu' else '') + ('_quick' if cfg.quick else '')
    s = settings(cfg)
    if cfg.jobs:
        s['jobs'] = cfg.jobs
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    os.environ.update(HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1')
    data = data_paths(cfg) if cfg.stage == 'report' else build_data(cfg, s)
    runs_csv = Path(cfg.out) / f'{cfg.name}_runs.csv'
    tuned_from = cfg.tuned_from or (str(HERE / 'results' / 'study_runs.csv') if cfg.preset == 'gpu' and not cfg.quick
                                    else None)
    tuning = read_rows(Path(tuned_from)) if tuned_from else None
    stages = ['teachers', 'tune', 'confirm', 'report'] if cfg.stage == 'all' else [cfg.stage]
    if tuning is not None:  # the selection is taken, not tuned again; the device's minutes go to the primary runs
        stages = [stage for stage in stages if stage != 'tune']
    for stage in stages:
        if stage == 'teachers':
            execute(cfg, s, data, teacher_jobs(cfg, s, data))
        elif stage == 'tune':
            execute(cfg, s, data, [cache_job(cfg, s, data, seed) for seed in s['tune_seeds']])
            execute(cfg, s, data, tune_jobs(cfg, s, data))
        elif stage == 'confirm':
            choice = selected(tuning or read_rows(runs_csv), seeds=len(s['tune_seeds']))
            print(f'selected by the tuning rule: {choice}', flush=True)
            execute(cfg, s, data, confirm_jobs(cfg, s, data, choice))
        else:
            choice = selected(tuning or read_rows(runs_csv), seeds=len(s['tune_seeds']))
            write_report(cfg, s, read_rows(runs_csv) + [r for r in tuning or [] if r['stage'] == 'tune'], choice,
                         GRID, MARGIN, expected=confirm_jobs(cfg, s, data, choice))
    return 0


if __name__ == '__main__':
    sys.exit(main())
