#!/usr/bin/env python3
"""Where the per-sample loader's CPU time goes: timm_icd's ``imagefolder:`` loader against timm's prefetcher loader.

``data_throughput.py`` measured the loader path at 0.83x timm's best loader on 500x375 JPEGs (6.76 against 5.56
CPU-ms per image) before this script found where the difference sat. It samples both loaders with py-spy
(``--subprocesses --nonblocking``: the main process and its workers, unmodified code), on the same files, with the
augmentation, batch and workers of ``data_throughput.py``, and sorts every sample into a stage by the frames on its
stack (``STAGES``). Each loader also runs without the sampler; its CPU time per image (main process and workers,
``cpu_time.cpu_reading``) is shared out over the stages in proportion to their samples. (py-spy counts a
thread that is running or runnable, so its raw milliseconds exceed CPU time when processes outnumber cores; the
table's last row gives them.)

    python benchmarks/loader_profile.py                 # writes benchmarks/results/loader_profile.md
    python benchmarks/loader_profile.py --quick --out /tmp/lp.md   # the small set at 64 px, a smoke run

Needs py-spy (``pip install py-spy``; not a dependency of timm_icd) and permission to read its child processes'
memory (ptrace; the default for one's own children on most Linux machines).
"""
import argparse
import collections
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SETUP = 'set-up (outside the timed epochs)'
# (stage, where, frame pattern, innermost frame only): the first stage whose pattern matches a frame takes the sample,
# searching from the innermost frame outwards (some stages only look at the innermost frame). Patterns match py-spy's
# "function (file:line)" frames; a frame no stage claims passes the sample on to the frame that called it.
STAGES: List[Tuple[str, str, str, bool]] = [
    ('JPEG decode', 'worker', r'ImageFile\.py|\bload \(.*Image\.py|draft \(', False),
    ('colour jitter', 'worker', r'adjust_|ImageEnhance|ColorJitter|_blend', False),
    ('crop and resize', 'worker', r'resized_crop|\bresize \(|\bcrop \(|_crop \(|RandomResizedCrop|ReducedDecodeCrop',
     False),
    ('flip', 'worker', r'hflip|transpose \(|RandomHorizontalFlip', False),
    ('to array / tensor', 'worker', r'ToNumpy|PILToTensor|pil_to_tensor|__array_interface__|asarray|from_numpy'
                                    r'|tobytes', False),
    ('RGB conversion (a copy of the decoded image)', 'worker', r'Image\.copy|Image\.convert', False),
    ('transform-call overhead (Compose, nn.Module dispatch)', 'worker',
     r'Compose\.__call__|Module\._call_impl|Module\._wrapped_call_impl|_log_api_usage_once|is_tracing', True),
    ('per-sample RNG seeding', 'worker', r'manual_seed|Random\.seed|seeded_transform', True),
    ('file read and image header', 'worker', r'\bopen \(.*Image\.py|open_image|read_bytes|getexif|_open \(|exif_'
                                             r'|JpegImagePlugin|_binary\.py|reader_image_folder|isfile', False),
    ('dataset rows (datasets / timm reader) and __getitem__', 'worker',
     r'arrow_dataset|formatting|table\.py|timm/data/dataset\.py|sources\.py', False),
    ('collate', 'worker', r'collate|stack_images', False),
    ('send batch (pickle, shared memory)', 'worker', r'reduction|queues\.py|_send|ForkingPickler|share_memory', False),
    ('receive batch (unpickle, shared memory)', 'main', r'rebuild_storage|queues\.py|_recv|connection\.py|poll \(',
     False),
    ('normalise (main process)', 'main', r'PrefetchLoader|InputStage|pipeline\.py', False),
    ('loader bookkeeping', 'any', r'dataloader\.py|fetch\.py|worker\.py', False),
]


def py_spy() -> Optional[str]:
    """The py-spy executable: on PATH or beside this Python's (a virtual environment's bin folder)."""
    beside = Path(sys.executable).parent / 'py-spy'
    return shutil.which('py-spy') or (str(beside) if beside.exists() else None)


def _classify(stack: List[str], where: str) -> str:
    for depth, frame in enumerate(reversed(stack)):
        for stage, place, pattern, leaf in STAGES:
            if place in ('any', where) and (depth == 0 or not leaf) and re.search(pattern, frame):
                return stage
    return f'other ({where})'


def parse(raw: Path) -> Tuple[Dict[str, int], Dict[str, List[Tuple[int, str]]]]:
    """py-spy raw (collapsed) output of one run: samples per stage, and the innermost frames of 'other' samples.

    py-spy names every sample with the profiled command's process (forked workers included), so the stack decides:
    a worker's samples hold ``_worker_loop``, or ``_feed``, the thread of its queue that pickles each batch (and
    moves it to shared memory when it is not there yet; the main process's own feeder only sends sample indices).
    The main process counts inside the timed epochs only; the rest is set-up.
    """
    stages: Dict[str, int] = collections.Counter()
    unknown: Dict[str, List[Tuple[int, str]]] = collections.defaultdict(list)
    for line in raw.read_text().splitlines():
        stack_text, _, count = line.rpartition(' ')
        if not stack_text or not count.isdigit():  # a command line's newline splits its record: skip the piece
            continue
        frames = stack_text.split(';')
        if frames[0].startswith('process '):
            frames = frames[1:]
        if '_worker_loop' in stack_text or '_feed (' in stack_text:
            where = 'worker'
        elif 'epoch (data_throughput' in stack_text:  # the main process inside the timed epochs
            where = 'main'
        else:  # building the loader, listing the files, start-up: outside the timed window
            stages[SETUP] += int(count)
            continue
        stage = _classify(frames, where)
        stages[stage] += int(count)
        if stage.startswith('other'):
            unknown[stage].append((int(count), ';'.join(frames[-3:])))
    return stages, unknown


def run_child(path: str, data_dir: str, size: int, batch_size: int, workers: int, epochs: int) -> None:
    """The profiled process: ``epochs`` epochs of one loader, then images and CPU seconds on stdout."""
    import torch
    torch.set_num_threads(1)
    from cpu_time import cpu_reading, cpu_seconds
    from data_throughput import BULK, PATHS, Files, Setup, imagenet_like_jpegs
    count = int(os.environ.get('LOADER_PROFILE_IMAGES', '2000'))
    jpegs = imagenet_like_jpegs(Path(data_dir) / f'jpegs_{count}', count)
    setup = Setup({BULK: Files(jpegs)}, size, batch_size, workers, torch.device('cpu'))
    built = PATHS[(BULK, path)](setup)
    cpu0, t0, images = cpu_reading(), time.perf_counter(), 0
    for e in range(epochs):
        images += sum(x.shape[0] for x, _ in built.epoch(e))
    print(f'RESULT {images} {cpu_seconds(cpu0, cpu_reading()):.4f} {time.perf_counter() - t0:.4f}', flush=True)


def profile(path: str, args, rate: int, sampled: bool) -> Tuple[int, float, float, Optional[Path]]:
    """One run of ``path`` in a child (under py-spy when ``sampled``): (images, CPU s, wall s, raw samples file)."""
    child = [sys.executable, __file__, '--run', path, '--data-dir', args.data_dir, '--size', str(args.size),
             '--batch-size', str(args.batch_size), '--workers', str(args.workers), '--epochs', str(args.epochs)]
    raw = Path(tempfile.mkdtemp(prefix='loader_profile_')) / 'samples.txt' if sampled else None
    if sampled:
        child = [py_spy(), 'record', '--subprocesses', '--nonblocking', '--format', 'raw',
                 '--rate', str(rate), '--output', str(raw), '--', *child]
    env = {**os.environ, 'LOADER_PROFILE_IMAGES': str(args.images), 'OMP_NUM_THREADS': '1'}
    out = subprocess.run(child, env=env, capture_output=True, text=True, check=False)
    result = [line for line in out.stdout.splitlines() if line.startswith('RESULT ')]
    if out.returncode != 0 or not result:
        raise SystemExit(f'profiling {path!r} failed (exit {out.returncode}): {out.stderr.strip()[-2000:]}')
    _, images, cpu, wall = result[-1].split()
    return int(images), float(cpu), float(wall), raw


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='96 images at 64 px, 1 worker, 1 round: a smoke run')
    parser.add_argument('--images', type=int, default=None, help='500x375 JPEGs (default: 2000)')
    parser.add_argument('--size', type=int, default=None)
    parser.add_argument('--batch-size', type=int, default=None)
    parser.add_argument('--workers', type=int, default=None)
    parser.add_argument('--epochs', type=int, default=None, help='epochs per run (default: 2)')
    parser.add_argument('--rounds', type=int, default=None, help='runs per loader, interleaved (default: 3)')
    parser.add_argument('--rate', type=int, default=250, help='py-spy samples per second')
    parser.add_argument('--data-dir', default=str(HERE / 'data' / 'throughput'))
    parser.add_argument('--out', default=str(HERE / 'results' / 'loader_profile.md'))
    parser.add_argument('--keep', default=None, help='keep the samples (py-spy raw files) and runs.json here')
    parser.add_argument('--again', action='store_true', help='no new runs: re-sort the samples kept in --keep')
    parser.add_argument('--run', default=None, help=argparse.SUPPRESS)  # the profiled child
    args = parser.parse_args(argv)
    quick = dict(images=96, size=64, batch_size=16, workers=1, epochs=1, rounds=1) if args.quick else {}
    full = dict(images=2000, size=224, batch_size=64, workers=2, epochs=2, rounds=3)
    for key, value in {**full, **quick}.items():
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    if args.run:
        run_child(args.run, args.data_dir, args.size, args.batch_size, args.workers, args.epochs)
        return 0
    from common import machine
    import torch
    paths = ['timm create_loader (prefetcher)', 'timm_icd imagefolder (loader)']
    started = time.time()
    keep = Path(args.keep or tempfile.mkdtemp(prefix='loader_profile_'))
    command = 'python benchmarks/loader_profile.py' + ''.join(f' {a}' for a in (argv if argv is not None
                                                                                  else sys.argv[1:]))
    settings = ('images', 'size', 'batch_size', 'workers', 'epochs', 'rounds', 'quick')
    where, when, minutes, resorted = machine(torch.device('cpu')), time.strftime('%Y-%m-%d'), None, ''
    if args.again:  # re-sort the samples of an earlier run (kept with --keep) by the stages as they are now
        runs = json.loads((keep / 'runs.json').read_text())
        if (keep / 'settings.json').exists():  # the kept runs' own settings and command, for the header
            kept = json.loads((keep / 'settings.json').read_text())
            for key in settings:
                setattr(args, key, kept[key])
            command, resorted = kept['command'], f' (its samples re-sorted by `{command}`)'
            where, when, minutes = kept['machine'], kept['date'], kept['minutes']
        missing = [p for p in paths if not any(r['path'] == p for r in runs)]
        if missing:
            raise SystemExit(f"{keep / 'runs.json'} holds no run of {', '.join(missing)}: nothing to compare.")
    else:
        if py_spy() is None:
            raise SystemExit('py-spy is not installed: pip install py-spy')
        keep.mkdir(parents=True, exist_ok=True)
        runs = []
        for r in range(args.rounds):
            for path in paths[r % 2:] + paths[:r % 2]:
                n, cpu, _, _ = profile(path, args, args.rate, sampled=False)
                n_sampled, cpu_sampled, _, raw = profile(path, args, args.rate, sampled=True)
                samples_file = keep / f'samples_{len(runs)}.txt'
                shutil.move(raw, samples_file)
                shutil.rmtree(raw.parent, ignore_errors=True)
                runs.append(dict(path=path, round=r, images=n, cpu_ms=1e3 * cpu / n, sampled_images=n_sampled,
                                 sampled_cpu_ms=1e3 * cpu_sampled / n_sampled, raw=samples_file.name, rate=args.rate))
                print(f'round {r + 1} | {path} | {n} images | {runs[-1]["cpu_ms"]:.2f} CPU-ms/image without the '
                      f'sampler, {runs[-1]["sampled_cpu_ms"]:.2f} with', flush=True)
        (keep / 'runs.json').write_text(json.dumps(runs, indent=1))
        minutes = (time.time() - started) / 60
        (keep / 'settings.json').write_text(json.dumps({'command': command, 'machine': where, 'date': when,
                                                        'minutes': minutes, **{k: getattr(args, k) for k in settings}}))
    samples = {p: collections.Counter() for p in paths}
    images = {p: 0 for p in paths}
    unknown = {p: collections.defaultdict(int) for p in paths}
    for run in runs:
        stages, other = parse(keep / run['raw'])
        samples[run['path']].update(stages)
        images[run['path']] += run['sampled_images']
        for stage, frames in other.items():
            for count, text in frames:
                unknown[run['path']][text] += count
    rate = runs[0]['rate']
    med = {p: statistics.median(r['cpu_ms'] for r in runs if r['path'] == p) for p in paths}
    sampled = {p: {s: 1e3 * c / rate / images[p] for s, c in samples[p].items() if s != SETUP} for p in paths}
    total = {p: sum(sampled[p].values()) for p in paths}
    ms = {p: {s: v / total[p] * med[p] for s, v in sampled[p].items()} for p in paths}  # shares of the CPU time
    order = [s for s, *_ in STAGES] + sorted({s for p in paths for s in ms[p] if s.startswith('other')})
    timm_p, ours = paths
    rows = ['| stage | timm prefetcher, CPU-ms/image | timm_icd loader, CPU-ms/image | difference |',
            '|---|---|---|---|']
    for stage in order:
        a, b = ms[timm_p].get(stage, 0.0), ms[ours].get(stage, 0.0)
        if a or b:
            rows.append(f'| {stage} | {a:.2f} | {b:.2f} | {b - a:+.2f} |')
    rows.append(f'| **CPU-ms per image (median of {len(runs) // 2} runs without the sampler)** | {med[timm_p]:.2f} | '
                f'{med[ours]:.2f} | {med[ours] - med[timm_p]:+.2f} |')
    rows.append(f'| sampled ms per image, all stages (running or runnable) | {total[timm_p]:.2f} | '
                f'{total[ours]:.2f} | {total[ours] - total[timm_p]:+.2f} |')
    top_other = {p: sorted(unknown[p].items(), key=lambda kv: -kv[1])[:5] for p in paths}
    lines = ['# Where the loader\'s CPU time goes: timm_icd imagefolder loader against timm\'s prefetcher loader', '',
             f'Generated by `{command}`{resorted} on '
             f'{where}, {when}; '
             f'{"quick mode, a smoke run: " if args.quick else ""}'
             f'{args.images} JPEGs of 500x375 px (`common.imagenet_like_jpegs`), {args.size} px, batch '
             f'{args.batch_size}, {args.workers} workers, timm\'s default train augmentation (as '
             f'`data_throughput.py`), {args.epochs} epochs per run, {args.rounds} runs per loader interleaved, one '
             f'torch thread per process. py-spy at {args.rate} Hz over the main process and its workers; a stage\'s '
             f'CPU-ms per image is its share of the samples (the set-up before the first epoch left out) times the '
             f'median CPU time per image of the runs without the sampler.', '', *rows, '',
             'Innermost frames of the samples no stage claimed (most frequent five per loader):', '']
    for p in paths:
        lines += [f'* {p}: ' + ('; '.join(f'`{t}` ({c})' for t, c in top_other[p]) or 'none')]
    lines += ['', f'Total time: {minutes:.1f} min.' if minutes is not None else 'Total time: not recorded.']
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    return 0


if __name__ == '__main__':
    sys.exit(main())
