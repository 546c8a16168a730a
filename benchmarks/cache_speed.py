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
   only: bytes do not depend on the input size), and on paper for ImageNet-1k (also with ``--cache-topk 10``).
   Break-even: students after which the cache has paid for itself.
2. Quality, on Fashion-MNIST (Debian's IDX files; ``cache_quality.py``): the resnet18 -> mobilenetv3_small_050 pair
   of the v0.2 quality benchmark (its trained resnet18 teacher, ``cache_quality.quality_teacher``, passed with
   ``--teacher-checkpoint``; its SGD settings and augmentation), icd+kd on a stratified 5,000-image training subset,
   the full 10,000-image test split (used only to report), ``QUALITY_EPOCHS`` (10) epochs, 8 seeds with one shared
   ``--data-seed``: live teacher against students reading one cache (written once, by the first cached run). Test
   top-1 at the final epoch per seed and the paired difference cached - live with a 95% t-interval
   (``common.paired_rows``).

The runs and their probe are ``cache_probe.py``; this file holds the timing part, the report and the command.

Timing needs an otherwise idle machine: with 2 torch threads on 2 cores, another busy process makes small ops wait
for a core and epoch times jump by up to 10x.

    python benchmarks/cache_speed.py           # writes benchmarks/results/teacher_cache.{md,csv} (~25 min, 2 cores)
    python benchmarks/cache_speed.py --quick   # tiny models and data, for the tests (< 1 min)
"""
import argparse
import csv
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cache_probe import DATA_SEED, Probe, after_first, ahead_run, random_teacher, train_run  # noqa: E402
from cache_quality import QUALITY_EPOCHS, QUALITY_SEEDS, quality_lines, quality_runs, quality_setting  # noqa: E402
from common import imagenet_like_jpegs, machine  # noqa: E402
from timm_icd.teacher_cache import TeacherCache  # noqa: E402

TARGET = 1.10
RESULTS = Path(__file__).parent / 'results'
INT8 = ('int8', 0)  # --cache-features int8, measured (top-K needs K well below the 10 classes here)
PAPER = (('fp16', 0), ('int8', 10))  # ImageNet-1k on paper: also --cache-topk 10 of its 1000 classes
IMAGENET = dict(rows=1281167, feature_dim=2048, num_classes=1000)  # ImageNet-1k train split, resnet50's pooled width
VARIANTS = ('vanilla', 'live icd+kd', 'write-through icd+kd', 'cached icd+kd', 'ahead writer')


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
        lines += quality_lines(quality, quality_rows)
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
