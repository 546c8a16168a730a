#!/usr/bin/env python3
"""Teacher cache (``--teacher-cache DIR``): epoch time, disk, break-even against a live teacher, and student quality.

Everything runs in ONE process, through real ``train_icd.py`` runs (``timm_icd.run.run``, what the CLI calls) and
the ahead writer (``timm_icd.run.write_ahead``, what ``python -m timm_icd cache`` calls).

1. Timing, per input size (112 and 224 px), resnet50 teacher (random weights, saved once to a file and passed with
   ``--teacher-checkpoint`` so that every run, whatever its ``--seed``, has the same teacher: a cache is keyed on the
   teacher's weights, and ``--teacher-pretrained false`` alone draws them from ``--seed``) -> mobilenetv3_small_100
   student, on ImageNet-sized JPEGs (``common.imagenet_like_jpegs``, the 352 of ``epoch_time.py``), batch 32,
   ``--input-pipeline memory`` for every variant (what ``auto`` picks there), timm's default augmentation without
   Mixup/CutMix/random erasing (a cache refuses them). Variants, each a run of ``--epochs`` (4) epochs:

   * ``vanilla``: ``--method vanilla`` (the student alone);
   * ``live icd+kd``: no cache, the teacher runs every step;
   * ``write-through icd+kd``: ``--teacher-cache`` on an empty folder: the teacher runs and every epoch is recorded
     (its epochs include filling the rows the loader drops, and flushing);
   * ``cached icd+kd``: another ``--seed``, the same ``--data-seed``, on the complete cache: the teacher never runs;
   * vanilla and cached run twice each, in the order vanilla, cached, cached, vanilla, after the other variants (runs
     later in one process were seen to run a few percent slower whatever they train); their medians pool both runs;
   * ``ahead writer``: ``write_ahead`` on another empty folder (teacher only, no student); its epoch is the time of
     ``timm_icd.teacher_cache.finish_epoch``, which computes and stores every row of the epoch.

   Epoch time is what the run logs (train + eval), median over the epochs after the first. Target: cached / vanilla
   <= 1.10 at both sizes. Disk: ``TeacherCache.bytes_per_row() * rows`` and the measured size of one epoch folder,
   for fp16 features + full logits and for ``--cache-features int8`` (written ahead, one epoch, at the first size
   only: bytes do not depend on the input size), and on paper for ImageNet-1k (also with ``--cache-topk 10``). Break-even: students
   after which the cache has paid for itself.
2. Quality, on Fashion-MNIST (Debian's IDX files, ``quality.py``): the resnet18 -> mobilenetv3_small_050 pair of
   ``quality.py`` (its trained resnet18 teacher from ``quality.get_teacher``, passed with ``--teacher-checkpoint``; its
   SGD settings and augmentation), icd+kd on a stratified 5,000-image training subset, the full 10,000-image test
   split (used only to report), ``QUALITY_EPOCHS`` (10) epochs, 8 seeds with one shared ``--data-seed``: live teacher
   against students reading one cache (written once, by the first cached run). Test top-1 at the final epoch per
   seed and the paired difference cached - live with a 95% t-interval (``quality_report.paired``).

Timing needs an otherwise idle machine: with 2 torch threads on 2 cores, another busy process makes small ops wait
for a core and epoch times jump by up to 10x.

    python benchmarks/cache_speed.py           # writes benchmarks/results/teacher_cache.{md,csv} (~25 min, 2 cores)
    python benchmarks/cache_speed.py --quick   # tiny models and data, for the tests (< 1 min)
"""
import argparse
import contextlib
import csv
import math
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timm_icd.distill import create_teacher  # noqa: E402
from timm_icd.run import cache_writer as cache_module  # noqa: E402
from timm_icd.run import parse_and_validate  # noqa: E402
from timm_icd.run import train as icd_train  # noqa: E402
from timm_icd.teacher_cache import TeacherCache  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import imagenet_like_jpegs, machine  # noqa: E402
from epoch_time import fashion_subset  # noqa: E402

TARGET = 1.10
RESULTS = Path(__file__).parent / 'results'
PAIR = 'resnet18->mobilenetv3_small_050'
QUALITY_EPOCHS, QUALITY_SEEDS, QUALITY_TRAIN = 10, 8, 5000
DATA_SEED = 0
INT8 = ('int8', 0)  # --cache-features int8, measured (top-K needs K well below the 10 classes here)
PAPER = (('fp16', 0), ('int8', 10))  # ImageNet-1k on paper: also --cache-topk 10 of its 1000 classes
IMAGENET = dict(rows=1281167, feature_dim=2048, num_classes=1000)  # ImageNet-1k train split, resnet50's pooled width
VARIANTS = ('vanilla', 'live icd+kd', 'write-through icd+kd', 'cached icd+kd', 'ahead writer')


def after_first(times: List[float]) -> float:
    """Median of the epoch times after the first (the only one if there is one)."""
    return statistics.median(times[1:] if len(times) > 1 else times)


def random_teacher(name: str, num_classes: int, path: Path) -> str:
    """Save a randomly initialised teacher once (seed 0), so that runs with any ``--seed`` share its weights."""
    if not path.exists():
        import safetensors.torch
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = create_teacher(name, num_classes, pretrained=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


class Probe:
    """Times what a run spends in evaluation, cache reads and cache filling, and counts live teacher writes, by
    wrapping those functions for the duration of one run (timm_icd itself is unchanged)."""

    def __init__(self):
        self.evals: List[float] = []
        self.reads: Dict[int, float] = defaultdict(float)
        self.fills: List[float] = []  # train.py's finish_epoch of a writing run, one per epoch
        self.ahead: List[float] = []  # cache.finish_epoch in write_ahead, one per epoch
        self.writes = 0

    @contextlib.contextmanager
    def active(self) -> Iterator['Probe']:
        def timed(original: Callable, record: Callable) -> Callable:
            def wrapper(*args, **kwargs):
                started = time.perf_counter()
                try:
                    return original(*args, **kwargs)
                finally:
                    record(args, time.perf_counter() - started)
            return wrapper

        def count_write(original: Callable) -> Callable:
            def wrapper(*args, **kwargs):
                self.writes += 1
                return original(*args, **kwargs)
            return wrapper

        patches = [
            (icd_train, 'evaluate', lambda o: timed(o, lambda a, s: self.evals.append(s))),
            (icd_train, 'finish_cache_epoch', lambda o: timed(o, lambda a, s: self.fills.append(s))),
            (cache_module, 'finish_epoch', lambda o: timed(o, lambda a, s: self.ahead.append(s))),
            (TeacherCache, 'read', lambda o: timed(o, lambda a, s: self.reads.__setitem__(a[1], self.reads[a[1]] + s))),
            (TeacherCache, 'write', count_write),
        ]
        originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
        for (owner, name, wrap), (_, _, original) in zip(patches, originals):
            setattr(owner, name, wrap(original))
        try:
            yield self
        finally:
            for owner, name, original in originals:
                setattr(owner, name, original)


def train_run(argv: List[str]) -> Tuple[dict, Probe]:
    """A real train_icd.py run: its result (``epoch_seconds``, ``top1``, ...) and what the probe saw."""
    probe = Probe()
    with probe.active():
        result = icd_train.run(parse_and_validate(argv), argv)
    result.pop('model', None)
    return result, probe


def ahead_run(argv: List[str]) -> Tuple[dict, Probe, float]:
    """``python -m timm_icd cache`` in this process: its result, probe (``ahead``: per-epoch times) and wall time."""
    probe = Probe()
    started = time.perf_counter()
    with probe.active():
        result = cache_module.write_ahead(parse_and_validate(argv))
    return result, probe, time.perf_counter() - started


def folder_bytes(folder: Path) -> Tuple[int, int]:
    """(allocated, apparent) bytes of the files in ``folder``: what ``du -s -B1`` and ``du -sb`` report."""
    files = [p.stat() for p in folder.iterdir() if p.is_file()]
    return sum(s.st_blocks * 512 for s in files), sum(s.st_size for s in files)


def paper_bytes_per_row(features: str, topk: int, feature_dim: int, num_classes: int) -> int:
    """``TeacherCache.bytes_per_row`` of a cache of these shapes (a manifest only; nothing on disk)."""
    manifest = {'rows': 1, 'feature_dim': feature_dim, 'num_classes': num_classes,
                'storage': {'features': features, 'topk': topk}}
    return TeacherCache(Path('unused'), manifest).bytes_per_row()


def storage_name(features: str, topk: int) -> str:
    return f'{features} features, ' + (f'top-{topk} logits' if topk else 'all logits (fp16)')


# ----------------------------------------------------------------------------------------------------------- timing

def timing_settings(cfg) -> List[dict]:
    data_dir = Path(cfg.data_dir)
    if cfg.quick:
        jpegs = imagenet_like_jpegs(data_dir / 'jpegs_48', 48)
        teacher = random_teacher('test_resnet', 10, data_dir / 'teacher_cache_test_resnet_random.safetensors')
        return [dict(name='16 px', dataset=f'imagefolder:{jpegs}', teacher='test_resnet', teacher_file=teacher,
                     student='test_efficientnet', size=16, batch=8, workers=0, epochs=2, int8=True)]
    jpegs = imagenet_like_jpegs(data_dir / 'jpegs_352', 352)  # epoch_time.py's set
    teacher = random_teacher('resnet50', 10, data_dir / 'teacher_cache_resnet50_random.safetensors')
    return [dict(name=f'{size} px', dataset=f'imagefolder:{jpegs}', teacher='resnet50', teacher_file=teacher,
                 student='mobilenetv3_small_100', size=size, batch=32, workers=2, epochs=cfg.epochs, int8=size == 112)
            for size in (112, 224)]


def timing_argv(s: dict, method: str, out: Path, seed: int = 0, cache: Optional[Path] = None,
                storage: Tuple[str, int] = ('fp16', 0), epochs: Optional[int] = None) -> List[str]:
    argv = ['--dataset', s['dataset'], '--student', s['student'], '--teacher', s['teacher'],
            '--teacher-pretrained', 'false', '--teacher-checkpoint', s['teacher_file'], '--method', method,
            '--input-size', '3', str(s['size']), str(s['size']), '-b', str(s['batch']), '--workers', str(s['workers']),
            '--epochs', str(epochs or s['epochs']), '--lr', '0.01', '--input-pipeline', 'memory',
            '--output', str(out), '--overwrite', '--seed', str(seed), '--data-seed', str(DATA_SEED)]
    if cache is not None:
        argv += ['--teacher-cache', str(cache)]
        if storage != ('fp16', 0):
            argv += ['--cache-features', storage[0], '--cache-topk', str(storage[1])]
    return argv


def time_setting(s: dict, tmp: Path, csv_rows: List[dict]) -> dict:
    """Every variant of one setting: median epoch times, breakdowns, disk, and the raw numbers into ``csv_rows``."""
    work = tmp / s['name'].replace(' ', '')
    through, ahead, int8 = work / 'cache-write-through', work / 'cache-ahead', work / 'cache-int8'
    epochs, med, detail = {}, {}, {}

    def record(variant: str, times: List[float], probe: Probe, seed: int, more: Optional[List[float]] = None) -> None:
        """``more``: the epoch times of a second run of the variant; the median then pools both runs' epochs after
        their first."""
        epochs[variant] = times + (more or [])
        med[variant] = statistics.median(times[1:] + (more or [])[1:]) if more else after_first(times)
        n = len(times)
        detail[variant] = {
            'eval': after_first(probe.evals[-n:]) if variant != 'ahead writer' and probe.evals else 0.0,
            'read': after_first([probe.reads.get(e, 0.0) for e in range(n)]),
            'fill': after_first(probe.fills) if probe.fills else 0.0,
            'writes': probe.writes}
        for k, run_times in enumerate([times] + ([more] if more else [])):
            for e, t in enumerate(run_times):
                csv_rows.append(dict(part='timing', setting=s['name'], variant=variant + (f' (run {k + 1})' if more
                                     else ''), seed=seed, epoch=e, metric='epoch_seconds', value=round(t, 4)))
        for part in ('eval', 'read', 'fill'):  # medians after the first epoch, as in the table
            csv_rows.append(dict(part='timing', setting=s['name'], variant=variant, seed=seed, epoch='',
                                 metric=f'{part}_seconds_median', value=round(detail[variant][part], 4)))
        print(f"{s['name']} {variant}: epochs {[round(t, 2) for t in epochs[variant]]} s, median after the first "
              f"{med[variant]:.3f} s", flush=True)

    result, probe = train_run(timing_argv(s, 'icd+kd', work / 'live'))
    record('live icd+kd', result['epoch_seconds'], probe, 0)
    result, probe = train_run(timing_argv(s, 'icd+kd', work / 'write-through', cache=through))
    record('write-through icd+kd', result['epoch_seconds'], probe, 0)
    # vanilla and cached, the pair the target compares, in the order A B B A: runs later in a process were seen to
    # run a few percent slower whatever they train, which a plain A then B order would charge to the cache
    vanilla = [train_run(timing_argv(s, 'vanilla', work / 'vanilla'))]
    cached = [train_run(timing_argv(s, 'icd+kd', work / f'cached{k}', seed=1, cache=through)) for k in (1, 2)]
    vanilla.append(train_run(timing_argv(s, 'vanilla', work / 'vanilla2')))
    record('vanilla', vanilla[0][0]['epoch_seconds'], vanilla[1][1], 0, vanilla[1][0]['epoch_seconds'])
    record('cached icd+kd', cached[0][0]['epoch_seconds'], cached[1][1], 1, cached[1][0]['epoch_seconds'])
    if cached[0][1].writes or cached[1][1].writes:
        raise RuntimeError('a cached run ran the live teacher')
    written, probe, wall = ahead_run(timing_argv(s, 'icd+kd', work / 'ahead-run', cache=ahead))
    record('ahead writer', probe.ahead, probe, 0)
    detail['ahead writer']['wall'] = wall
    csv_rows.append(dict(part='timing', setting=s['name'], variant='ahead writer', seed=0, epoch='',
                         metric='wall_seconds_with_setup', value=round(wall, 3)))
    identical = all(np.array_equal(np.load(through / f'epoch-{e:04d}' / f'{name}.npy'),
                                   np.load(ahead / f'epoch-{e:04d}' / f'{name}.npy'))
                    for e in range(s['epochs']) for name in ('features', 'logits'))

    disk = []
    caches = [(('fp16', 0), written['cache'], ahead)]
    if s['int8']:
        int8_written, _, _ = ahead_run(timing_argv(s, 'icd+kd', work / 'int8-run', cache=int8, storage=INT8,
                                                   epochs=1))
        caches.append((INT8, int8_written['cache'], int8))
        int8_error = feature_error(ahead, int8)
        for metric, value in int8_error.items():
            csv_rows.append(dict(part='int8', setting=s['name'], variant='int8 vs fp16 features', seed='', epoch=0,
                                 metric=metric, value=value))
    for storage, cache, folder in caches:
        allocated, apparent = folder_bytes(folder / 'epoch-0000')
        row = dict(storage=storage, dim=cache.dim, classes=cache.classes, bytes_per_row=cache.bytes_per_row(),
                   rows=cache.rows, formula=cache.bytes_per_row() * cache.rows, du=allocated, apparent=apparent)
        disk.append(row)
        for metric in ('bytes_per_row', 'rows', 'formula', 'du', 'apparent'):
            csv_rows.append(dict(part='disk', setting=s['name'], variant=storage_name(*storage), seed='', epoch=0,
                                 metric=metric, value=row[metric]))
    return dict(setting=s, epochs=epochs, med=med, detail=detail, disk=disk, identical=identical,
                int8_error=int8_error if s['int8'] else None)


def feature_error(fp16: Path, int8: Path) -> dict:
    """How far int8-stored teacher features (dequantised) are from the fp16-stored ones, epoch 0, every row: the
    relative L2 error per row (median and max) and the lowest cosine similarity."""
    reference = np.load(fp16 / 'epoch-0000' / 'features.npy').astype(np.float64)
    quantised = np.load(int8 / 'epoch-0000' / 'features.npy').astype(np.float64) * \
        np.load(int8 / 'epoch-0000' / 'scale.npy').astype(np.float64)[:, None]
    relative = np.linalg.norm(quantised - reference, axis=1) / np.maximum(np.linalg.norm(reference, axis=1), 1e-12)
    cosine = (quantised * reference).sum(1) / np.maximum(
        np.linalg.norm(quantised, axis=1) * np.linalg.norm(reference, axis=1), 1e-12)
    return {'relative_l2_median': float(np.median(relative)), 'relative_l2_max': float(relative.max()),
            'cosine_min': float(cosine.min())}


# ---------------------------------------------------------------------------------------------------------- quality

def quality_setting(cfg) -> dict:
    """Dataset, teacher weights and training flags of the quality comparison."""
    data_dir = Path(cfg.data_dir)
    if cfg.quick:
        folder = data_dir / 'digits_256_72'
        if not (folder / 'dataset_dict.json').exists():
            import datasets
            from timm_icd.data import digits_dataset
            dd = digits_dataset()
            datasets.DatasetDict(train=dd['train'].select(range(256)), test=dd['test'].select(range(72))).save_to_disk(
                str(folder))
        teacher = random_teacher('test_resnet', 10, data_dir / 'teacher_cache_test_resnet_random.safetensors')
        return dict(name='digits (quick)', dataset=str(folder), teacher='test_resnet', teacher_file=teacher,
                    teacher_record=None, student='test_efficientnet', size=16, batch=32, epochs=2, seeds=1,
                    opt=dict(opt='sgd', lr=0.01, momentum=0.9, weight_decay=5e-4))
    from accelerate import Accelerator
    from quality import PAIRS, TEACHER_EPOCHS, get_teacher, splits, teacher_file
    pair = PAIRS[PAIR]
    # quality.py's teacher, shared with it: weights in the data folder, its record in quality.py's results folder
    qcfg = SimpleNamespace(out=str(RESULTS), data_dir=str(data_dir), name='quality', batch_size=64, train_size=6000,
                           test_size=0)
    _, record = get_teacher(Accelerator(), qcfg, pair['teacher'], pair['teacher'], *splits(qcfg, 'main'),
                            TEACHER_EPOCHS)
    return dict(name='Fashion-MNIST', dataset=fashion_subset(data_dir, QUALITY_TRAIN, 0), teacher=pair['teacher'],
                teacher_file=str(teacher_file(qcfg, pair['teacher'])), teacher_record=record, student=pair['student'],
                size=28, batch=64, epochs=cfg.quality_epochs, seeds=cfg.seeds, opt=pair['opt'])


def quality_argv(q: dict, seed: int, out: Path, cache: Optional[Path]) -> List[str]:
    """quality.py's recipe as train_icd.py flags: SGD, cosine without warmup, random resized crop 0.6-1 and flips
    (bilinear, no colour jitter), eval at crop 1.0, the in-memory pipeline."""
    opt = q['opt']
    argv = ['--dataset', q['dataset'], '--student', q['student'], '--teacher', q['teacher'], '--teacher-pretrained',
            'false', '--teacher-checkpoint', q['teacher_file'], '--method', 'icd+kd', '--input-size', '3',
            str(q['size']), str(q['size']), '-b', str(q['batch']), '-vb', '256', '--epochs', str(q['epochs']),
            '--opt', opt['opt'], '--lr', str(opt['lr']), '--momentum', str(opt['momentum']), '--weight-decay',
            str(opt['weight_decay']), '--sched', 'cosine', '--warmup-epochs', '0', '--scale', '0.6', '1', '--hflip',
            '0.5', '--color-jitter', '0', '--train-interpolation', 'bilinear', '--interpolation', 'bilinear',
            '--crop-pct', '1.0', '--input-pipeline', 'memory', '--workers', '0', '--seed', str(seed), '--data-seed',
            str(DATA_SEED), '--output', str(out), '--overwrite']
    return argv + (['--teacher-cache', str(cache)] if cache is not None else [])


def quality_runs(q: dict, tmp: Path, csv_rows: List[dict]) -> List[dict]:
    """Live and cached icd+kd per seed: one row per run (mode, seed, test top-1, epoch times, teacher writes)."""
    cache, rows = tmp / 'quality-cache', []
    for seed in range(q['seeds']):
        for mode in ('live', 'cached'):
            result, probe = train_run(quality_argv(q, seed, tmp / f'quality-{mode}-{seed}',
                                                   cache if mode == 'cached' else None))
            row = dict(mode=mode, seed=seed, top1=result['top1'], teacher_top1=(result['teacher'] or {}).get('top1'),
                       epoch=after_first(result['epoch_seconds']), writes=probe.writes)
            rows.append(row)
            csv_rows.append(dict(part='quality', setting=q['name'], variant=mode, seed=seed, epoch=q['epochs'] - 1,
                                 metric='test_top1', value=row['top1']))
            for e, t in enumerate(result['epoch_seconds']):
                csv_rows.append(dict(part='quality', setting=q['name'], variant=mode, seed=seed, epoch=e,
                                     metric='epoch_seconds', value=round(t, 4)))
            print(f"quality {mode} seed {seed}: test top-1 {row['top1']:.2f}% (median epoch {row['epoch']:.2f} s, "
                  f"teacher writes {probe.writes})", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------------- report

def _s(seconds: float) -> str:
    return f'{seconds:.4g}'


def _bytes(n: float) -> str:
    for unit, size in (('GiB', 2 ** 30), ('MiB', 2 ** 20), ('KiB', 2 ** 10)):
        if n >= size:
            return f'{n:,.0f} B ({n / size:.2f} {unit})'
    return f'{n:,.0f} B'


def payback(extra: float, saving: float) -> str:
    """Students (each one run of the same epochs) after which ``extra`` seconds per epoch are recovered at
    ``saving`` seconds per student-epoch."""
    if extra <= 0:
        return '0 (no extra cost)'
    if saving <= 0:
        return 'never (a cached epoch is not faster than a live one)'
    return f'{math.ceil(extra / saving)} ({extra / saving:.2f})'


def report(cfg, timings: List[dict], quality: Optional[dict], quality_rows: List[dict], seconds: float) -> str:
    from quality_report import paired
    command = 'python benchmarks/cache_speed.py' + (' --quick' if cfg.quick else '')
    lines = ['# Teacher cache: epoch time, disk, break-even and student quality', '',
             f'Generated by `{command}` on {time.strftime("%Y-%m-%d")}. Machine: '
             f'{machine(torch.device("cuda") if torch.cuda.is_available() else None)}. Total time: '
             f'{seconds / 60:.1f} min, in one process. How each number is measured: the script\'s docstring.', '',
             '## Epoch time', '']
    first = timings[0]['setting']
    lines += [f"Teacher {first['teacher']} (random weights, one file for every run) -> student {first['student']}, "
              f"`--method icd+kd` unless vanilla, batch {first['batch']}, `--input-pipeline memory`, "
              f"{timings[0]['disk'][0]['rows']} training rows ({first['dataset'].split('/')[-1]}, ImageNet-sized "
              f"JPEGs; the loader drops the last partial batch, which a writing epoch then fills), {first['epochs']} "
              f"epochs per run. Epoch time = train + eval as the run logs it, median over the epochs after the "
              f"first. The cached run uses another `--seed` and the same `--data-seed`. Vanilla and cached, the pair "
              f"the target compares, run twice each in the order vanilla, cached, cached, vanilla (later runs in one "
              f"process ran a few percent slower whatever they trained); their medians pool both runs. The ahead "
              f"writer's epoch is "
              f"the teacher alone over every row (no student), timed around `timm_icd.teacher_cache.finish_epoch`.", '',
              '| setting | variant | epoch (s) | / vanilla | / live | eval in epoch (s) | cache read in epoch (s) | '
              'cache fill + flush in epoch (s) |', '|---|---|---|---|---|---|---|---|']
    for t in timings:
        med, detail = t['med'], t['detail']
        for variant in VARIANTS:
            d = detail[variant]
            lines.append(f"| {t['setting']['name']} | {variant} | {_s(med[variant])} | "
                         f"{med[variant] / med['vanilla']:.3f} | {med[variant] / med['live icd+kd']:.3f} | "
                         f"{_s(d['eval']) if variant != 'ahead writer' else '-'} | {_s(d['read'])} | "
                         f"{_s(d['fill']) if variant == 'write-through icd+kd' else '-'} |")
    lines += ['', '| setting | cached / vanilla | live / vanilla | cached / live | write-through / live | '
                  f'cached / vanilla <= {TARGET:.2f} |', '|---|---|---|---|---|---|']
    met = []
    for t in timings:
        med = t['med']
        ok = med['cached icd+kd'] / med['vanilla'] <= TARGET
        met.append(ok)
        lines.append(f"| {t['setting']['name']} | {med['cached icd+kd'] / med['vanilla']:.3f} | "
                     f"{med['live icd+kd'] / med['vanilla']:.3f} | {med['cached icd+kd'] / med['live icd+kd']:.3f} | "
                     f"{med['write-through icd+kd'] / med['live icd+kd']:.3f} | {'yes' if ok else 'NO'} |")
    lines += ['', _verdict(timings, met), '',
              'The ahead writer wrote the same arrays as the write-through run, to the bit: '
              + ', '.join(f"{t['setting']['name']}: {'yes' if t['identical'] else 'NO'}" for t in timings) + '. '
              'The cached runs never ran the teacher (0 cache writes).', '',
              '## When the cache has paid for itself', '',
              'Per epoch; a student is one run of the same epochs. Write-through: the writing run trains a student '
              'too, and costs (write-through - live) more than a live run; each later student saves (live - cached), '
              'so the cache has paid for itself after (write-through - live) / (live - cached) cached students after '
              'the writing run. Ahead of time: the writer costs its whole epoch, so after writer / (live - cached) '
              'cached students. Rounded up (exact value in brackets).', '',
              '| setting | live - cached (s) | write-through - live (s) | students after the writing run | '
              'ahead writer (s) | students after writing ahead |', '|---|---|---|---|---|---|']
    for t in timings:
        med = t['med']
        saving = med['live icd+kd'] - med['cached icd+kd']
        extra = med['write-through icd+kd'] - med['live icd+kd']
        lines.append(f"| {t['setting']['name']} | {saving:.3f} | {extra:.3f} | {payback(extra, saving)} | "
                     f"{med['ahead writer']:.3f} | {payback(med['ahead writer'], saving)} |")
    walls = ', '.join(f"{t['setting']['name']}: {t['detail']['ahead writer']['wall']:.1f} s for "
                      f"{t['setting']['epochs']} epochs" for t in timings)
    lines += ['', f'The ahead writer\'s wall time with its one-off setup (decoding the images, building the teacher, '
                  f'hashing its weights, measuring it on the eval split): {walls}.', '', '## Disk', '',
              'Bytes per row, as `TeacherCache.bytes_per_row` computes them: D x 2 (fp16 features) or D + 4 (int8 '
              'features and their fp32 scale), plus C x 2 (all logits, fp16) or K x 4 + K x 4 + 4 (top-K logits in '
              'fp32, their int32 indices and the fp32 log-sum-exp), plus 1 (the row\'s written flag); D the teacher\'s '
              'feature width, C the classes, K `--cache-topk`. One epoch = bytes per row x rows (plus a 128-byte '
              '.npy header per array). Measured: the allocated size (`du -s -B1`) and apparent size (`du -sb`) of one '
              '`epoch-NNNN` folder.', '',
              '| setting | storage | D | C | bytes per row | rows | bytes per epoch (formula) | du of one epoch '
              '(allocated) | apparent size |', '|---|---|---|---|---|---|---|---|---|']
    for t in timings:
        for d in t['disk']:
            lines.append(f"| {t['setting']['name']} | {storage_name(*d['storage'])} | "
                         f"{d['dim']} | {d['classes']} | {d['bytes_per_row']} | {d['rows']} | "
                         f"{_bytes(d['formula'])} | {_bytes(d['du'])} | {_bytes(d['apparent'])} |")
    for storage in PAPER:
        per_row = paper_bytes_per_row(*storage, IMAGENET['feature_dim'], IMAGENET['num_classes'])
        lines.append(f"| ImageNet-1k, resnet50 (on paper) | {storage_name(*storage)} | {IMAGENET['feature_dim']} | "
                     f"{IMAGENET['num_classes']} | {per_row} | {IMAGENET['rows']} | "
                     f"{_bytes(per_row * IMAGENET['rows'])} | - | - |")
    for t in timings:
        if t['int8_error']:
            e = t['int8_error']
            lines += ['', f"int8 features against the fp16 ones, {t['setting']['name']}, every row of epoch 0: relative "
                          f"L2 error median {e['relative_l2_median']:.4f}, max {e['relative_l2_max']:.4f}; lowest "
                          f"cosine similarity {e['cosine_min']:.6f} (a per-row scale of max|f| / 127)."]
    lines += ['', 'Every epoch is stored (each epoch augments every image anew): a run of E epochs needs E times '
                  'these bytes. With 10 classes top-10 keeps every logit, in more bytes than fp16 (K x 8 + 4 against '
                  'C x 2): the saving there is the int8 features. On ImageNet-1k top-10 is what shrinks the logits, '
                  '2,000 bytes to 84 per row.']
    if quality is not None:
        lines += _quality_lines(cfg, quality, quality_rows, paired)
    return '\n'.join(lines) + '\n'


def _verdict(timings: List[dict], met: List[bool]) -> str:
    if all(met):
        return f'A cached icd+kd epoch is within {TARGET:.2f}x a vanilla epoch at every size: target met.'
    parts = []
    for t, ok in zip(timings, met):
        if ok:
            continue
        med, d = t['med'], t['detail']
        over = med['cached icd+kd'] - med['vanilla']
        parts.append(f"{t['setting']['name']}: the cached epoch is {over:.3f} s longer than vanilla, of which "
                     f"{d['cached icd+kd']['read']:.3f} s reading the cache and "
                     f"{d['cached icd+kd']['eval'] - d['vanilla']['eval']:+.3f} s eval difference; the rest is the ICD "
                     f"heads, the KD and ICD losses and their backward, which a vanilla step does not have")
    return f'Target NOT met ({TARGET:.2f}x) at ' + '; '.join(parts) + '.'


def _quality_lines(cfg, q: dict, rows: List[dict], paired: Callable) -> List[str]:
    teacher = next((r['teacher_top1'] for r in rows if r['teacher_top1'] is not None), None)
    lines = ['', '## Student quality: live teacher against the cache', '',
             f"{q['name']}: {q['teacher']} -> {q['student']}, icd+kd, {q['size']} px, batch {q['batch']}, "
             f"{q['epochs']} epochs, {q['opt']['opt']} lr {q['opt']['lr']} momentum {q['opt']['momentum']} weight "
             f"decay {q['opt']['weight_decay']}, cosine, random resized crop 0.6-1 and flips, in-memory pipeline; "
             f"`--seed s`, `--data-seed {DATA_SEED}` for every run. "
             + ('The teacher is quality.py\'s resnet18 (trained on 6,000 training images, test top-1 '
                f"{q['teacher_record']['top1']:.2f}% in quality.py), passed with `--teacher-checkpoint`. "
                if q['teacher_record'] else 'The teacher has random weights (quick mode). ')
             + (f'Teacher test top-1 as the runs measure it: {teacher:.2f}%. ' if teacher is not None else '')
             + 'Every cached run trains on the same stored values: the seed-0 cached run wrote the cache '
               '(write-through; it trains on what it stored), the others read it and never ran the teacher. Test '
               'top-1 at the final epoch on the test split, which is only reported, never tuned on.', '',
             '| seed | live top-1 (%) | cached top-1 (%) | cached - live (pp) | live epoch (s) | cached epoch (s) | '
             'cached run |', '|---|---|---|---|---|---|---|']
    by = {(r['mode'], r['seed']): r for r in rows}
    for seed in sorted({r['seed'] for r in rows}):
        live, cached = by[('live', seed)], by[('cached', seed)]
        role = 'wrote the cache' if cached['writes'] else 'read the cache'
        lines.append(f"| {seed} | {live['top1']:.2f} | {cached['top1']:.2f} | {cached['top1'] - live['top1']:+.2f} | "
                     f"{live['epoch']:.3f} | {cached['epoch']:.3f} | {role} |")
    result = paired([dict(seed=r['seed'], method=r['mode'], test_top1=r['top1']) for r in rows], 'cached', 'live')
    if result is None:
        lines += ['', 'Mean paired difference cached - live: no interval with one seed.']
    else:
        mean, low, high, n = result
        verdict = 'the interval includes 0: no difference detected' if low <= 0 <= high \
            else 'the interval excludes 0'
        lines += ['', f'Mean paired difference cached - live: {mean:+.2f} pp, 95% t-interval [{low:+.2f}, '
                      f'{high:+.2f}] over n={n} seeds ({verdict}). Live runs see the teacher\'s float32 outputs, '
                      f'cached runs the fp16-stored ones; the runs are otherwise identical per seed.']
    return lines


def write_csv(path: Path, rows: List[dict]) -> None:
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=['part', 'setting', 'variant', 'seed', 'epoch', 'metric', 'value'])
        writer.writeheader()
        writer.writerows(rows)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='tiny models and data, 2 epochs, 1 seed (for the tests)')
    parser.add_argument('--out', default=str(RESULTS / 'teacher_cache.md'), help='report; the CSV goes beside it')
    parser.add_argument('--data-dir', default=str(Path(__file__).parent / 'data'))
    parser.add_argument('--epochs', type=int, default=4, help='epochs per timing run (median of those after the first)')
    parser.add_argument('--quality-epochs', type=int, default=QUALITY_EPOCHS)
    parser.add_argument('--seeds', type=int, default=QUALITY_SEEDS, help='quality seeds')
    parser.add_argument('--skip-quality', action='store_true', help='timing and disk only')
    cfg = parser.parse_args(argv)
    started = time.perf_counter()
    csv_rows: List[dict] = []
    timings, quality, quality_rows = [], None, []
    with tempfile.TemporaryDirectory() as tmp:
        for s in timing_settings(cfg):
            timings.append(time_setting(s, Path(tmp), csv_rows))
        if not cfg.skip_quality:
            quality = quality_setting(cfg)
            quality_rows = quality_runs(quality, Path(tmp), csv_rows)
    seconds = time.perf_counter() - started
    text = report(cfg, timings, quality, quality_rows, seconds)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    write_csv(out.with_suffix('.csv'), csv_rows)
    print(text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
