#!/usr/bin/env python3
"""Train-loader throughput: timm_icd's input pipelines against timm's ``create_loader`` on ImageNet-sized JPEGs.

Every path runs timm's default train augmentation (RandomResizedCrop scale 0.08-1, 'random' interpolation, hflip
0.5, colour jitter 0.4) at ``--size`` px on the same ``--images`` JPEGs (``common.imagenet_like_jpegs``, 500x375),
and a batch counts once it is a normalised float tensor on the device (the GPU if any, else the CPU). ``PATHS``
maps each path's name to its factory (a new path is a factory and one line there): timm_icd's ``create_pipeline``
with input_pipeline 'loader' over ``imagefolder:`` and over a save_to_disk copy with the JPEG bytes embedded
(workers decode and augment to uint8, ``train_stage`` normalises), ``--streaming`` over webdataset shards written
by ``python -m timm_icd.shards`` (the main process reads, a pool decodes and augments), and 'memory' (decoded
once, timed apart; then
``train_stage`` augments whole batches in the main process); timm's ``create_loader(ImageDataset(folder))`` without
(workers normalise) and with its prefetcher (``PrefetchLoader`` normalises uint8 batches).

One process, interleaved: each of ``--rounds`` rounds builds and measures every path once, in an order rotating by
one per round; the table gives medians. A measurement builds the loader, takes ``--skip`` batches (worker start-up),
then times ``--batches`` (default: the rest of one epoch, at least 10; more run on into the next epoch). Workers are
not persistent; the iterator is closed and its workers have exited before the next measurement.

CPU time covers the main process and its workers over exactly the timed window: the getrusage RUSAGE_SELF +
RUSAGE_CHILDREN delta (this process's threads; children reaped in the window) plus, per child process alive at
either end, utime + stime from ``/proc/<pid>/stat``: end - start if alive at both ends, end if started in the
window, minus the start reading if reaped in it (its whole life landed in RUSAGE_CHILDREN). Worker start-up and the
skipped batches are excluded; prefetch past the window's end balances prefetch before it. NaN without /proc.

    python benchmarks/data_throughput.py            # writes benchmarks/results/data_throughput.md
    python benchmarks/data_throughput.py --quick --threads 1 --out /tmp/dt.md   # 96 images at 64 px, smoke run
"""
import argparse
import gc
import itertools
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import datasets
import torch
from timm.data import ImageDataset, create_loader, resolve_data_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timm_icd.data import AugmentConfig, create_pipeline, load_image_data, load_stream_data, write_shards  # noqa: E402

from common import imagenet_like_jpegs, machine  # noqa: E402

CLOCK_TICKS = os.sysconf('SC_CLK_TCK') if hasattr(os, 'sysconf') else 100
SCALE, RATIO, HFLIP, COLOR_JITTER, INTERPOLATION = (0.08, 1.0), (3 / 4, 4 / 3), 0.5, 0.4, 'random'


@dataclass
class Setup:
    """What every path factory gets: the data and the loader settings."""
    jpegs: Path
    arrow: Path
    shards: Path
    size: int
    batch_size: int
    workers: int
    device: torch.device


@dataclass
class Built:
    """A built path: ``epoch(e)`` iterates one epoch of normalised (x, y) batches on the device."""
    epoch: Callable[[int], Iterator[Tuple[torch.Tensor, torch.Tensor]]]
    length: int  # batches per epoch
    workers: int  # worker processes (0: the main process does all the work)
    decode_s: float = float('nan')  # one-off work before the first batch (decoding into memory)


@lru_cache(maxsize=None)
def _load(spec: str, streaming: bool = False):
    """``load_image_data(spec)`` (or the stream's splits), loaded once (listing the files is not what is measured)."""
    return load_stream_data(spec, val_split='train') if streaming else load_image_data(spec, seed=0)


def timm_icd_path(setup: Setup, spec: str, kind: str) -> Built:
    """The project's pipeline (``create_pipeline``) with ``input_pipeline=kind`` over ``load_image_data(spec)``;
    kind 'stream' streams ``spec`` (``--streaming``, the default shuffle buffer)."""
    augment = AugmentConfig(scale=tuple(SCALE), hflip=HFLIP, color_jitter=COLOR_JITTER,
                            train_interpolation=INTERPOLATION)
    data = _load(spec, kind == 'stream')
    start = time.perf_counter()
    pipeline = create_pipeline(data, resolve_data_config({'input_size': (3, setup.size, setup.size)}), augment,
                               kind='loader' if kind == 'stream' else kind, batch_size=setup.batch_size,
                               workers=setup.workers, seed=0)
    pipeline.to(setup.device)
    decode_s = time.perf_counter() - start if pipeline.kind == 'memory' else float('nan')

    def epoch(e: int):
        pipeline.train_loader.dataset.set_epoch(e)
        for step, batch in enumerate(pipeline.train_loader):
            batch = [t.to(setup.device, non_blocking=True) for t in batch]
            yield pipeline.train_stage(batch, e, step, 0)
    return Built(epoch, len(pipeline.train_loader), 0 if pipeline.kind == 'memory' else setup.workers, decode_s)


def timm_path(setup: Setup, prefetcher: bool) -> Built:
    """timm's ``create_loader`` over ``ImageDataset(folder)``, as timm's train.py builds it (on ``setup.device``)."""
    loader = create_loader(
        ImageDataset(str(setup.jpegs)), input_size=(3, setup.size, setup.size), batch_size=setup.batch_size,
        is_training=True, use_prefetcher=prefetcher, num_workers=setup.workers, scale=SCALE, hflip=HFLIP,
        ratio=RATIO, color_jitter=COLOR_JITTER, interpolation=INTERPOLATION, device=setup.device,
        pin_memory=setup.device.type == 'cuda', persistent_workers=False)

    def epoch(e: int):
        for x, y in loader:
            yield x.to(setup.device, non_blocking=True), y.to(setup.device, non_blocking=True)
    return Built(epoch, len(loader), setup.workers)


PATHS: Dict[str, Callable[[Setup], Built]] = {
    'timm_icd imagefolder (loader)': lambda s: timm_icd_path(s, f'imagefolder:{s.jpegs}', 'loader'),
    'timm_icd save_to_disk (loader)': lambda s: timm_icd_path(s, str(s.arrow), 'loader'),
    'timm_icd memory': lambda s: timm_icd_path(s, f'imagefolder:{s.jpegs}', 'memory'),
    'timm_icd webdataset shards (stream)': lambda s: timm_icd_path(s, f'webdataset:{s.shards}', 'stream'),
    'timm create_loader': partial(timm_path, prefetcher=False),
    'timm create_loader (prefetcher)': partial(timm_path, prefetcher=True),
}


def shards_copy(jpegs: Path, target: Path) -> Path:
    """The ImageFolder tree as webdataset shards of 250 images (``python -m timm_icd.shards``; reused if current)."""
    marker = (jpegs / '.imagenet_like.json').read_text()
    if (target / 'source.json').exists() and (target / 'source.json').read_text() == marker:
        return target
    if target.exists():
        import shutil
        shutil.rmtree(target)
    write_shards(f'imagefolder:{jpegs}', str(target / 'wds'), shard_size=250)
    (target / 'source.json').write_text(marker)
    return target


def save_to_disk_copy(jpegs: Path, target: Path) -> Path:
    """The ImageFolder tree as a ``datasets`` save_to_disk folder with the JPEG bytes embedded (reused if current)."""
    marker = (jpegs / '.imagenet_like.json').read_text()
    if (target / 'source.json').exists() and (target / 'source.json').read_text() == marker:
        return target
    dd = datasets.load_dataset('imagefolder', data_dir=str(jpegs)).cast_column('image', datasets.Image(decode=False))
    dd = dd.map(lambda rows: {'image': [{'bytes': Path(r['path']).read_bytes(), 'path': None} for r in rows['image']]},
                batched=True).cast_column('image', datasets.Image())
    dd.save_to_disk(str(target))
    (target / 'source.json').write_text(marker)
    return target


def _children() -> Dict[int, float]:
    """CPU seconds (utime + stime) of each child process of this one, from /proc/<pid>/stat."""
    me, out = str(os.getpid()), {}
    for entry in os.scandir('/proc'):
        if entry.name.isdigit():
            try:
                with open(f'/proc/{entry.name}/stat') as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rfind(')') + 2:].split()  # after "pid (comm) ": state, ppid, ... utime, stime
            if fields[1] == me:
                out[int(entry.name)] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return out


def cpu_reading() -> Tuple[float, Optional[Dict[int, float]]]:
    """(RUSAGE_SELF + RUSAGE_CHILDREN CPU seconds, {child pid: CPU seconds} or None without /proc)."""
    own = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ('ru_utime', 'ru_stime'))
    return own, (_children() if os.path.isdir('/proc') else None)


def cpu_seconds(start: tuple, end: tuple) -> float:
    """CPU seconds of this process and its children between two ``cpu_reading``s (see the module docstring)."""
    (own0, kids0), (own1, kids1) = start, end
    if kids0 is None:
        return float('nan')
    live = sum(t - kids0.get(pid, 0.0) for pid, t in kids1.items())
    reaped = sum(t for pid, t in kids0.items() if pid not in kids1)  # already counted whole in RUSAGE_CHILDREN
    return own1 - own0 + live - reaped


def measure(built: Built, skip: int, batches: Optional[int], device: torch.device) -> Tuple[float, float]:
    """(images/s, CPU seconds per image) over ``batches`` batches after ``skip``; closes the workers after."""
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    batches = batches or max(10, built.length - skip)
    it = itertools.chain.from_iterable(map(built.epoch, itertools.count()))  # epoch after epoch
    for _ in range(skip):
        next(it)
    sync()
    cpu0, t0 = cpu_reading(), time.perf_counter()
    images = sum(next(it)[0].shape[0] for _ in range(batches))
    sync()
    elapsed, cpu1 = time.perf_counter() - t0, cpu_reading()
    del it  # frees the epoch generator and its DataLoader iterator, which joins (reaps) its workers
    gc.collect()
    for _ in range(100):  # let any straggler exit before the next path runs
        if not os.path.isdir('/proc') or not _children():
            break
        time.sleep(0.1)
    return images / elapsed, cpu_seconds(cpu0, cpu1) / images


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='96 images at 64 px, 1 worker, 1 round, 3 batches')
    parser.add_argument('--images', type=int, default=None, help='JPEGs (default: 2000)')
    parser.add_argument('--size', type=int, default=None, help='train input size in px (default: 224)')
    parser.add_argument('--workers', type=int, default=None, help='loader worker processes (default: 2)')
    parser.add_argument('--batch-size', type=int, default=None, help='default: 64')
    parser.add_argument('--rounds', type=int, default=None, help='measurements per path (default: 3)')
    parser.add_argument('--batches', type=int, default=None, help='timed batches (default: one epoch, >= 10)')
    parser.add_argument('--skip', type=int, default=2, help='batches taken before timing (worker start-up)')
    parser.add_argument('--threads', type=int, default=None, help='torch threads of the main process')
    parser.add_argument('--data-dir', default=str(Path(__file__).parent / 'data' / 'throughput'))
    parser.add_argument('--out', default=str(Path(__file__).parent / 'results' / 'data_throughput.md'))
    args = parser.parse_args(argv)
    quick = dict(images=96, size=64, workers=1, batch_size=16, rounds=1, batches=3) if args.quick else {}
    full = dict(images=2000, size=224, workers=2, batch_size=64, rounds=3)
    for key, value in {**full, **quick}.items():
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    if args.threads:
        torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    data_dir = Path(args.data_dir)
    jpegs = imagenet_like_jpegs(data_dir / f'jpegs_{args.images}', args.images)
    setup = Setup(jpegs, save_to_disk_copy(jpegs, data_dir / f'arrow_{args.images}'),
                  shards_copy(jpegs, data_dir / f'shards_{args.images}') / 'wds', args.size, args.batch_size,
                  args.workers, device)
    started = time.time()
    names = list(PATHS)
    results: Dict[str, List[Tuple[float, float, float, int]]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            built = PATHS[name](setup)
            rate, cpu = measure(built, args.skip, args.batches, device)
            results[name].append((rate, cpu, built.decode_s, built.workers))
            del built
            print(f'round {r + 1} | {name} | {rate:.1f} images/s | {cpu * 1e3:.2f} CPU-ms/image', flush=True)
    median = {name: [statistics.median(v[i] for v in rows) for i in range(3)] + [rows[0][3]]
              for name, rows in results.items()}
    timm_best = max(m[0] for name, m in median.items() if name.startswith('timm '))
    rows = ['| path | images/s (median) | per worker | vs timm best | CPU-ms per image | one-off decode s |',
            '|---|---|---|---|---|---|']
    for name, (rate, cpu, decode_s, workers) in median.items():
        per_worker = f'{rate / workers:.1f}' if workers else 'n/a (main process)'
        decode = f'{decode_s:.2f}' if decode_s == decode_s else '-'
        rows.append(f'| {name} | {rate:.1f} | {per_worker} | {rate / timm_best:.2f}x | {cpu * 1e3:.2f} | {decode} |')
    ours = {name: m[0] / timm_best for name, m in median.items() if name.startswith('timm_icd')}
    worst = min(ours, key=ours.get)
    verdict = (f'Every timm_icd path reaches >= 1.0x timm\'s best: {"yes" if ours[worst] >= 1.0 else "no"} '
               f'(lowest: {worst}, {ours[worst]:.2f}x).')
    command = 'python benchmarks/data_throughput.py' + ''.join(f' {a}' for a in (argv if argv is not None
                                                                                  else sys.argv[1:]))
    lines = ['# Train-loader throughput: timm_icd input pipelines against timm\'s create_loader', '',
             f'Generated by `{command}` on {machine(device)}, {time.strftime("%Y-%m-%d")}; '
             f'{"quick mode: " if args.quick else ""}{args.images} JPEGs of 500x375 px from real photographs, '
             f'{args.size}x{args.size} px, batch {args.batch_size}, {args.workers} workers, device {device.type}. '
             f'timm\'s default train augmentation on every path (RandomResizedCrop scale 0.08-1, interpolation '
             f'random, hflip 0.5, colour jitter 0.4). {args.rounds} rounds interleaved in one process, medians; '
             f'each measurement skips {args.skip} batches, then times {args.batches or "the rest of one epoch"} '
             f'batches until normalised float on the device. CPU-ms per image: main process and workers over the '
             f'timed window. The memory path\'s one-off decode (train and eval splits) is not in its images/s; '
             f'per worker: images/s over the loader\'s worker processes.', '', *rows, '', verdict, '',
             f'Total benchmark time: {(time.time() - started) / 60:.1f} min.']
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text('\n'.join(lines) + '\n')
    print('\n'.join(rows + ['', verdict]))
    print(f'wrote {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
