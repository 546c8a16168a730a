#!/usr/bin/env python3
"""Train-loader throughput: timm_icd's input pipelines against timm's ``create_loader``, on two JPEG sets.

Every path runs timm's default train augmentation (RandomResizedCrop scale 0.08-1, 'random' interpolation, hflip
0.5, colour jitter 0.4) at ``--size`` px, and a batch counts once it is a normalised float tensor on the device (the
GPU if any, else the CPU). Two sets of JPEGs from real photographs (``common.py``): ``--images`` of 500x375 px
(``imagenet_like_jpegs``, the bulk of ImageNet) and ``--realistic-images`` in a mix of sizes with a tail of large
photographs (``realistic_jpegs``; heavier than ImageNet's tail, see there). ``PATHS`` maps each (set, path) to its
factory (a new path is a factory and one line there):

* timm's ``create_loader(ImageDataset(folder))`` without (workers normalise) and with its prefetcher
  (``PrefetchLoader`` normalises uint8 batches): the reference, "timm best" being the faster of the two per set;
* timm_icd's ``create_pipeline`` with input_pipeline 'loader' over ``imagefolder:`` and over a save_to_disk copy
  with the JPEG bytes embedded (workers decode, crop, resize, flip to uint8; ``train_stage`` normalises the batch,
  and on a GPU applies the colour jitter, which on a CPU stays in the workers), and its levers one at a time:
  ``decode_scale='off'`` (full decoding) and the other place for the colour jitter (``jitter_on_device``);
* ``--streaming`` over webdataset shards written by ``python -m timm_icd shards`` (the main process reads, a pool
  decodes and augments), from the original JPEGs and, on the realistic set, written with ``--max-size 512``, and the
  ``--decode-device`` path (workers draw, the main process decodes the batch with torchvision on the device: on a
  CPU-only machine that is the CPU, labelled so);
* 'memory' on the 500x375 set (decoded once, timed apart; then ``train_stage`` augments whole batches).

One process, interleaved: each of ``--rounds`` rounds builds and measures every path once, in an order rotating by
one per round; the table gives medians. A measurement builds the loader, takes ``--skip`` batches (worker start-up),
then times ``--batches`` (default: the rest of one epoch, at least 10; more run on into the next epoch). Workers are
not persistent; the iterator is closed and its workers have exited before the next measurement.

CPU time covers the main process and its workers over exactly the timed window (``cpu_time.py``). Worker start-up
and the skipped batches are excluded; prefetch past the window's end balances prefetch before it. NaN without
/proc. Work moved to the device (colour jitter, normalisation, the ``--decode-device`` decode) is CPU time on a
CPU-only machine and counted there; on a GPU it is not CPU time.

Besides speed (``throughput_lib.py``): on each set, how often reduced decoding applies at ``--size`` and the PSNR
of its crops against full decoding; on the realistic set, the PSNR of crops of the images ``--max-size 512``
resizes against the same crops of the originals. Top-1 is not measured (see the results file).

    python benchmarks/data_throughput.py            # writes benchmarks/results/data_throughput.md
    python benchmarks/data_throughput.py --quick --threads 1 --out /tmp/dt.md   # small sets at 64 px, smoke run
"""
import argparse
import gc
import itertools
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import datasets
import numpy as np
import torch
from PIL import Image
from timm.data import ImageDataset, create_loader, resolve_data_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timm_icd.data import AugmentConfig, create_pipeline, load_image_data, load_stream_data, write_shards  # noqa: E402

from common import imagenet_like_jpegs, machine, realistic_jpegs  # noqa: E402
from cpu_time import cpu_reading, cpu_seconds, forked_children  # noqa: E402
from throughput_lib import max_size_fidelity, reduced_decoding_fidelity  # noqa: E402

SCALE, RATIO, HFLIP, COLOR_JITTER, INTERPOLATION = (0.08, 1.0), (3 / 4, 4 / 3), 0.5, 0.4, 'random'
MAX_SIZE, QUALITY = 512, 90  # python -m timm_icd shards' --max-size alone, and its default quality
BULK, REALISTIC = '500x375', 'realistic mix'  # the two sets


@dataclass
class Files:
    """One JPEG set in the forms the paths read."""
    jpegs: Path  # the ImageFolder tree
    arrow: Optional[Path] = None  # a save_to_disk copy, JPEG bytes embedded
    shards: Optional[Path] = None  # webdataset shards of the JPEGs as they are
    bounded: Optional[Path] = None  # webdataset shards written with --max-size MAX_SIZE


@dataclass
class Setup:
    """What every path factory gets: the sets and the loader settings."""
    sets: Dict[str, Files]
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


def timm_icd_path(setup: Setup, spec: str, kind: str, **levers) -> Built:
    """The project's pipeline (``create_pipeline``) with ``input_pipeline=kind`` over ``load_image_data(spec)``;
    kind 'stream' streams ``spec`` (``--streaming``, the default shuffle buffer). ``levers``: ``decode_scale``,
    ``jitter_on_device``, ``decode_device`` keywords of ``create_pipeline``."""
    augment = AugmentConfig(scale=tuple(SCALE), hflip=HFLIP, color_jitter=COLOR_JITTER,
                            train_interpolation=INTERPOLATION)
    data = _load(spec, kind == 'stream')
    start = time.perf_counter()
    pipeline = create_pipeline(data, resolve_data_config({'input_size': (3, setup.size, setup.size)}), augment,
                               kind='loader' if kind == 'stream' else kind, batch_size=setup.batch_size,
                               workers=setup.workers, seed=0, **levers)
    pipeline.to(setup.device)
    decode_s = time.perf_counter() - start if pipeline.kind == 'memory' else float('nan')

    def epoch(e: int):
        pipeline.train_loader.dataset.set_epoch(e)
        for step, batch in enumerate(pipeline.train_loader):
            batch = [t.to(setup.device, non_blocking=True) for t in batch]
            yield pipeline.train_stage(batch, e, step, 0)
    return Built(epoch, len(pipeline.train_loader), 0 if pipeline.kind == 'memory' else setup.workers, decode_s)


def timm_path(setup: Setup, name: str, prefetcher: bool) -> Built:
    """timm's ``create_loader`` over ``ImageDataset(folder)``, as timm's train.py builds it (on ``setup.device``)."""
    loader = create_loader(
        ImageDataset(str(setup.sets[name].jpegs)), input_size=(3, setup.size, setup.size),
        batch_size=setup.batch_size, is_training=True, use_prefetcher=prefetcher, num_workers=setup.workers,
        scale=SCALE, hflip=HFLIP, ratio=RATIO, color_jitter=COLOR_JITTER, interpolation=INTERPOLATION,
        device=setup.device, pin_memory=setup.device.type == 'cuda', persistent_workers=False)

    def epoch(e: int):
        for x, y in loader:
            yield x.to(setup.device, non_blocking=True), y.to(setup.device, non_blocking=True)
    return Built(epoch, len(loader), setup.workers)


def _folder(s: Setup, name: str) -> str:
    return f'imagefolder:{s.sets[name].jpegs}'


def _device_decode_label() -> str:
    return 'cuda' if torch.cuda.is_available() else 'cpu: the --decode-device path on the CPU'


def _other_jitter() -> Tuple[str, bool]:
    """The colour jitter's place that is not the default here: (label, ``jitter_on_device``)."""
    return ('jitter in workers', False) if torch.cuda.is_available() else ('jitter on the device', True)


PATHS: Dict[Tuple[str, str], Callable[[Setup], Built]] = {
    (BULK, 'timm create_loader'): partial(timm_path, name=BULK, prefetcher=False),
    (BULK, 'timm create_loader (prefetcher)'): partial(timm_path, name=BULK, prefetcher=True),
    (BULK, 'timm_icd imagefolder (loader)'): lambda s: timm_icd_path(s, _folder(s, BULK), 'loader'),
    (BULK, f'timm_icd imagefolder (loader, {_other_jitter()[0]})'):
        lambda s: timm_icd_path(s, _folder(s, BULK), 'loader', jitter_on_device=_other_jitter()[1]),
    (BULK, 'timm_icd save_to_disk (loader)'): lambda s: timm_icd_path(s, str(s.sets[BULK].arrow), 'loader'),
    (BULK, 'timm_icd memory'): lambda s: timm_icd_path(s, _folder(s, BULK), 'memory'),
    (BULK, 'timm_icd webdataset shards (stream)'):
        lambda s: timm_icd_path(s, f'webdataset:{s.sets[BULK].shards}', 'stream'),
    (REALISTIC, 'timm create_loader'): partial(timm_path, name=REALISTIC, prefetcher=False),
    (REALISTIC, 'timm create_loader (prefetcher)'): partial(timm_path, name=REALISTIC, prefetcher=True),
    (REALISTIC, 'timm_icd imagefolder (loader)'): lambda s: timm_icd_path(s, _folder(s, REALISTIC), 'loader'),
    (REALISTIC, 'timm_icd imagefolder (loader, --decode-scale off)'):
        lambda s: timm_icd_path(s, _folder(s, REALISTIC), 'loader', decode_scale='off'),
    (REALISTIC, f'timm_icd imagefolder (loader, {_other_jitter()[0]})'):
        lambda s: timm_icd_path(s, _folder(s, REALISTIC), 'loader', jitter_on_device=_other_jitter()[1]),
    (REALISTIC, 'timm_icd webdataset shards (stream)'):
        lambda s: timm_icd_path(s, f'webdataset:{s.sets[REALISTIC].shards}', 'stream'),
    (REALISTIC, f'timm_icd webdataset shards --max-size {MAX_SIZE} (stream)'):
        lambda s: timm_icd_path(s, f'webdataset:{s.sets[REALISTIC].bounded}', 'stream'),
    (REALISTIC, f'timm_icd webdataset shards (stream, --decode-device {_device_decode_label()})'):
        lambda s: timm_icd_path(s, f'webdataset:{s.sets[REALISTIC].shards}', 'stream',
                                decode_device='cuda' if torch.cuda.is_available() else 'cpu'),
}


def _current(jpegs: Path, target: Path) -> bool:
    """Whether ``target`` was made from ``jpegs`` as they are now (their marker file), else clear it."""
    marker = (jpegs / '.imagenet_like.json').read_text()
    if (target / 'source.json').exists() and (target / 'source.json').read_text() == marker:
        return True
    if target.exists():
        shutil.rmtree(target)
    return False


def shards_copy(jpegs: Path, target: Path, max_size: Optional[int] = None) -> Path:
    """The ImageFolder tree as webdataset shards of 250 images (``python -m timm_icd shards``, with ``--max-size``
    when given; reused if current)."""
    if not _current(jpegs, target):
        write_shards(f'imagefolder:{jpegs}', str(target / 'wds'), shard_size=250, max_size=max_size, quality=QUALITY)
        (target / 'source.json').write_text((jpegs / '.imagenet_like.json').read_text())
    return target / 'wds'


def save_to_disk_copy(jpegs: Path, target: Path) -> Path:
    """The ImageFolder tree as a ``datasets`` save_to_disk folder with the JPEG bytes embedded (reused if current)."""
    if _current(jpegs, target):
        return target
    dd = datasets.load_dataset('imagefolder', data_dir=str(jpegs)).cast_column('image', datasets.Image(decode=False))
    dd = dd.map(lambda rows: {'image': [{'bytes': Path(r['path']).read_bytes(), 'path': None} for r in rows['image']]},
                batched=True).cast_column('image', datasets.Image())
    dd.save_to_disk(str(target))
    (target / 'source.json').write_text((jpegs / '.imagenet_like.json').read_text())
    return target


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
    for _ in range(100):  # let the loader's forked workers exit before the next path runs
        if not os.path.isdir('/proc') or not forked_children():
            break
        time.sleep(0.1)
    return images / elapsed, cpu_seconds(cpu0, cpu1) / images


TOP1 = ('Top-1 of training on the bounded images is not measured: a paired run that could show a difference needs '
        'labelled large photographs (ImageNet-like data), and none is reachable offline here (the photographs above '
        'carry arbitrary labels). The PSNR above is what this benchmark can say: how far the crops a student sees '
        'move. FFCV stores ImageNet at a bounded maximum resolution and JPEG quality for the same speed, and its '
        'documentation treats both as a trade of accuracy for loading speed; its measurements are for its own '
        'settings and are not repeated here.')


def _set_stats(folder: Path) -> str:
    """'N JPEGs, mean W x H px, P% above MAX_SIZE px on the long side' from the files' headers."""
    sizes = np.array([Image.open(p).size for p in sorted(folder.glob('class_*/img_*.jpg'))])
    return (f'{len(sizes)} JPEGs, mean {sizes[:, 0].mean():.0f}x{sizes[:, 1].mean():.0f} px, '
            f'{100 * (sizes.max(1) > MAX_SIZE).mean():.1f}% above {MAX_SIZE} px on the long side')


def _db(value: float) -> str:
    """A PSNR cell: one decimal, or '-' when no image qualified (nothing to compare)."""
    return '-' if math.isnan(value) else f'{value:.1f}'


def _fidelity(setup: Setup, size: int) -> List[str]:
    """The results' fidelity section: reduced decoding per set, and --max-size on the realistic set."""
    lines = ['## Fidelity', '', f'Reduced decoding (`--decode-scale auto`) at {size} px: how often a JPEG is decoded '
             f'at 1/2, 1/4 or 1/8 scale, and the PSNR of those crops against full decoding (timm\'s crop, the same '
             f'draws).', '', '| set | images | decoded at reduced scale | PSNR median dB | PSNR 5th pct dB | '
             'lowest dB |', '|---|---|---|---|---|---|']
    for name, files in setup.sets.items():
        paths = sorted(files.jpegs.glob('class_*/img_*.jpg'))
        f = reduced_decoding_fidelity(paths, size, SCALE, RATIO, INTERPOLATION)
        psnr = ' | '.join(_db(f[k]) for k in ('psnr_median', 'psnr_p5', 'psnr_min'))
        lines.append(f"| {name} | {f['images']} | {f['applied']} ({100 * f['applied'] / f['images']:.1f}%) | {psnr} |")
    if REALISTIC in setup.sets:
        paths = sorted(setup.sets[REALISTIC].jpegs.glob('class_*/img_*.jpg'))
        f = max_size_fidelity(paths, size, MAX_SIZE, QUALITY, SCALE, RATIO, INTERPOLATION)
        lines += ['', f'Bounded size (`--max-size {MAX_SIZE} --quality {QUALITY}`) on the realistic mix: '
                  f"{f['applied']} of {f['images']} images resized; PSNR of their {size} px crops against the same "
                  f"crops of the originals: median {f['psnr_median']:.1f} dB, 5th percentile {f['psnr_p5']:.1f} dB, "
                  f"lowest {f['psnr_min']:.1f} dB.", '', TOP1]
    return lines


def _targets(median: Dict[Tuple[str, str], list], best: Dict[str, float]) -> List[str]:
    """The issue's targets, for the rows this run measured."""
    out = []
    loader = median.get((BULK, 'timm_icd imagefolder (loader)'))
    if loader and BULK in best:
        ratio = loader[0] / best[BULK]
        out.append(f'Loader path on the 500x375 set against timm\'s best: {ratio:.2f}x (target >= 1.0x: '
                   f'{"met" if ratio >= 1.0 else "not met"}).')
    bounded = median.get((REALISTIC, f'timm_icd webdataset shards --max-size {MAX_SIZE} (stream)'))
    if bounded and REALISTIC in best:
        ratio = bounded[0] / best[REALISTIC]
        out.append(f'Shards written with --max-size {MAX_SIZE} on the realistic mix against timm\'s best on the '
                   f'original JPEGs: {ratio:.2f}x (target >= 2.0x: {"met" if ratio >= 2.0 else "not met"}).')
        small = median.get((BULK, 'timm_icd webdataset shards (stream)'))
        if ratio < 2.0 and small:  # what bounds it: the speed of images the bound leaves alone
            out.append(f'The bound can only remove the large images\' extra cost: the same shard stream on the '
                       f'500x375 set, where no image is above {MAX_SIZE} px, runs at {small[0]:.1f} images/s, '
                       f'{small[0] / best[REALISTIC]:.2f}x timm\'s best on the realistic mix; the bounded shards '
                       f'({bounded[0]:.1f} images/s) reach that speed, and 2x would need the per-image work every '
                       f'image pays at 500x375 (decode, crop and resize, colour jitter, normalisation: '
                       f'loader_profile.md) to shrink, which --max-size does not touch.')
    return out


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true',
                        help='96 + 48 images at 64 px, 1 worker, 1 round, 3 batches: a smoke run')
    parser.add_argument('--images', type=int, default=None, help='500x375 JPEGs (default: 2000)')
    parser.add_argument('--realistic-images', type=int, default=None, help='JPEGs of the realistic mix (default: 1000)')
    parser.add_argument('--sets', default='500x375,realistic', help='sets to measure: 500x375, realistic or both')
    parser.add_argument('--only', default=None, help='comma-separated parts of path names: measure only those')
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
    quick = dict(images=96, realistic_images=48, size=64, workers=1, batch_size=16, rounds=1, batches=3) \
        if args.quick else {}
    full = dict(images=2000, realistic_images=1000, size=224, workers=2, batch_size=64, rounds=3)
    for key, value in {**full, **quick}.items():
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    if args.threads:
        torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    data_dir, wanted = Path(args.data_dir), set(args.sets.split(','))
    sets = {}
    if '500x375' in wanted:
        jpegs = imagenet_like_jpegs(data_dir / f'jpegs_{args.images}', args.images)
        sets[BULK] = Files(jpegs, save_to_disk_copy(jpegs, data_dir / f'arrow_{args.images}'),
                           shards_copy(jpegs, data_dir / f'shards_{args.images}'))
    if 'realistic' in wanted:
        n = args.realistic_images
        jpegs = realistic_jpegs(data_dir / f'realistic_{n}', n)
        sets[REALISTIC] = Files(jpegs, shards=shards_copy(jpegs, data_dir / f'realistic_shards_{n}'),
                                bounded=shards_copy(jpegs, data_dir / f'realistic_shards_{n}_max{MAX_SIZE}', MAX_SIZE))
    setup = Setup(sets, args.size, args.batch_size, args.workers, device)
    started = time.time()
    names = [key for key in PATHS if key[0] in sets and (
        args.only is None or any(part in key[1] for part in args.only.split(',')))]
    results: Dict[Tuple[str, str], List[Tuple[float, float, float, int]]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            built = PATHS[name](setup)
            rate, cpu = measure(built, args.skip, args.batches, device)
            results[name].append((rate, cpu, built.decode_s, built.workers))
            del built
            print(f'round {r + 1} | {name[0]} | {name[1]} | {rate:.1f} images/s | {cpu * 1e3:.2f} CPU-ms/image',
                  flush=True)
    median = {name: [statistics.median(v[i] for v in rows) for i in range(3)] + [rows[0][3]]
              for name, rows in results.items()}
    best = {}
    for (set_name, path), m in median.items():
        if path.startswith('timm '):
            best[set_name] = max(best.get(set_name, 0.0), m[0])
    rows = ['| set | path | images/s (median) | per worker | vs timm best (same set) | CPU-ms per image | '
            'one-off decode s |', '|---|---|---|---|---|---|---|']
    for (set_name, path), (rate, cpu, decode_s, workers) in median.items():
        per_worker = f'{rate / workers:.1f}' if workers else 'n/a (main process)'
        decode = f'{decode_s:.2f}' if decode_s == decode_s else '-'
        versus = f'{rate / best[set_name]:.2f}x' if set_name in best else '-'
        rows.append(f'| {set_name} | {path} | {rate:.1f} | {per_worker} | {versus} | {cpu * 1e3:.2f} | {decode} |')
    quick_note = ' Quick mode: a smoke run, not a measurement.' if args.quick else ''
    targets = [target + quick_note for target in _targets(median, best)]
    fidelity = _fidelity(setup, args.size)
    command = 'python benchmarks/data_throughput.py' + ''.join(f' {a}' for a in (argv if argv is not None
                                                                                  else sys.argv[1:]))
    described = '; '.join(f'{name}: {_set_stats(files.jpegs)}' for name, files in sets.items())
    lines = ['# Train-loader throughput: timm_icd input pipelines against timm\'s create_loader', '',
             f'Generated by `{command}` on {machine(device)}, {time.strftime("%Y-%m-%d")}; '
             f'{"quick mode: " if args.quick else ""}JPEGs from real photographs ({described}), '
             f'{args.size}x{args.size} px, batch {args.batch_size}, {args.workers} workers, device {device.type}. '
             f'timm\'s default train augmentation on every path (RandomResizedCrop scale 0.08-1, interpolation '
             f'random, hflip 0.5, colour jitter 0.4). {args.rounds} rounds interleaved in one process, medians; '
             f'each measurement skips {args.skip} batches, then times {args.batches or "the rest of one epoch"} '
             f'batches until normalised float on the device. CPU-ms per image: main process and workers over the '
             f'timed window (work done on the device counts there only when the device is the CPU). The memory '
             f'path\'s one-off decode (train and eval splits) is not in its images/s; per worker: images/s over the '
             f'loader\'s worker processes. timm_icd\'s rows use its defaults (reduced decoding; colour jitter on '
             f'the device on a GPU, in the workers on a CPU) unless the path names a lever.', '', *rows, '',
             *targets, '', *fidelity, '', f'Total benchmark time: {(time.time() - started) / 60:.1f} min.']
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text('\n'.join(lines) + '\n')
    print('\n'.join(rows + [''] + targets + [''] + fidelity))
    print(f'wrote {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
