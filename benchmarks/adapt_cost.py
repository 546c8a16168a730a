#!/usr/bin/env python3
"""What a linear teacher adaptation costs, against one teacher pass over the training split.

A resnet50 teacher (timm's architecture, random weights: no download; the forward's cost does not depend on the
weights) of 1000 classes is adapted to the built-in digits (the first ``--images`` training images, at the teacher's
own 224 px: what a resnet50 teacher runs at, in distillation as in adaptation) by ``run.adapt.adapt_teacher``,
exactly as ``train_icd.py`` does for a teacher of other classes: features through the eval transform, the L2 strength
chosen on a hold-out of the training split (6 fits), a final fit, the folder written. Against it: one teacher
epoch, the teacher's forward passes over the same images already decoded and normalised (what a distillation epoch
spends on the teacher). Both in one process, alternating, several times; medians and their ratio.

    python benchmarks/adapt_cost.py            # writes benchmarks/results/adapt_cost.md
"""
import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from timm.data import create_transform

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timm_icd.data import load_image_data  # noqa: E402
from timm_icd.distill import ICDTeacher, create_teacher  # noqa: E402
from timm_icd.run.adapt import adapt_teacher  # noqa: E402

HERE = Path(__file__).resolve().parent
DATA_CONFIG = {'input_size': (3, 224, 224), 'interpolation': 'bilinear', 'mean': (0.485, 0.456, 0.406),
               'std': (0.229, 0.224, 0.225), 'crop_pct': 1.0, 'crop_mode': 'center'}


def teacher_epoch(teacher: torch.nn.Module, batches: list) -> float:
    """Seconds of the teacher's forward passes over ``batches`` (normalised, on the CPU)."""
    wrapped = ICDTeacher(teacher, DATA_CONFIG['input_size'], need_features=True)
    started = time.perf_counter()
    with torch.no_grad():
        for x in batches:
            wrapped(x)
    seconds = time.perf_counter() - started
    wrapped.remove_hooks()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--images', type=int, default=512, help='training images (of the 1,437)')
    parser.add_argument('--out', default=str(HERE / 'results' / 'adapt_cost.md'))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    data = load_image_data('digits')
    data.train = data.train.select(range(args.images))
    data.train_rows = len(data.train)
    # the batches a teacher epoch sees, decoded once here so that only the teacher's forward is timed
    transform = create_transform(**DATA_CONFIG, is_training=False)
    images = torch.stack([transform(row['image'].convert('RGB')) for row in data.train])
    batches = list(images.split(args.batch_size))

    epochs, adapts, records = [], [], []
    for _ in range(args.repeats):
        teacher = create_teacher('resnet50', pretrained=False, num_classes=1000)
        epochs.append(teacher_epoch(teacher, batches))
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            record = adapt_teacher(teacher, data, DATA_CONFIG, accelerator, Path(tmp) / 'adapted',
                                   teacher_input_size=DATA_CONFIG['input_size'], batch_size=args.batch_size)
            adapts.append(time.perf_counter() - started)
        records.append(record)
    epoch, adapt = statistics.median(epochs), statistics.median(adapts)
    fit = statistics.median(r['seconds']['fit'] for r in records)
    feats = statistics.median(r['seconds']['features'] for r in records)
    lines = [
        '# Linear teacher adaptation: cost against one teacher epoch',
        '',
        f'`python benchmarks/adapt_cost.py` on {platform.machine()} ({torch.get_num_threads()} torch threads, CPU), '
        f'torch {torch.__version__.split("+")[0]}; resnet50 teacher (1000 classes, 25.6 M parameters) adapted to the '
        f'built-in digits: {len(data.train)} training images at the teacher\'s {DATA_CONFIG["input_size"][1]} px, '
        f'batch '
        f'{args.batch_size}, {records[0]["features"]["dim"]}-d features; {args.repeats} alternating repeats in one '
        f'process, medians (min-max).',
        '',
        '| | seconds |',
        '|---|---|',
        f'| one teacher epoch (forward passes over the decoded training images) | {epoch:.2f} '
        f'({min(epochs):.2f}-{max(epochs):.2f}) |',
        f'| adaptation, total (decode + forward + hold-out choice of L2 + fit + write) | {adapt:.2f} '
        f'({min(adapts):.2f}-{max(adapts):.2f}) |',
        f'| of which the feature pass (decode + forward) | {feats:.2f} |',
        f'| of which the probe fits (6 hold-out fits over the L2 grid, then one on all rows) | {fit:.2f} |',
        '',
        f'**Adaptation / teacher epoch: {adapt / epoch:.2f}x.** The chosen L2 was '
        f'{json.dumps(sorted({r["fit"]["l2"] for r in records}))}. The fits grow with rows x feature width x classes '
        f'and run on the run\'s device; the feature pass grows with the images like a teacher epoch does.',
        '',
    ]
    Path(args.out).write_text('\n'.join(lines))
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
