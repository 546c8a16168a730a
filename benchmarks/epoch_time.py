#!/usr/bin/env python3
"""Epoch time of train_icd.py itself (input pipeline, steps, evaluation) against the compute floor.

For each setting and method, in ONE process:

* ``memory`` and ``loader``: a real ``train_icd.py`` run (``timm_icd.run.run``, what the CLI calls) with
  ``--input-pipeline memory`` / ``loader``; its epoch times (train + eval, as logged) after the first epoch.
* ``floor``: the same run's task, optimizer and batches, but the batches are taken from the pipeline once and kept
  in memory as normalised tensors; each epoch then replays them through the same distillation step (forward,
  backward, optimizer step) and the student's evaluation forward over the eval batches, with no loader and no
  per-step host sync. This is what a plain loop over in-memory tensors costs: the epoch's compute.

Ratios are epoch / floor (median over epochs after the first). Target: <= 1.15 at both sizes.

Settings: 28 px Fashion-MNIST (5,000 training images, the size where per-sample Python work dominates), lcnet_050
from a resnet18 teacher, one loader worker; and 224 px on ImageNet-size JPEGs made from real photographs
(``common.imagenet_like_jpegs``), mobilenetv3_small_100 from resnet50, two loader workers. Teachers are randomly
initialised (timing only).

    python benchmarks/epoch_time.py            # writes benchmarks/results/epoch_time.md (~15 min on 2 CPU cores)
    python benchmarks/epoch_time.py --quick    # tiny models and data, for the tests
"""
import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timm_icd.run import parse_and_validate, run_config  # noqa: E402
from timm_icd.run import train as icd_train  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fashion_subset, imagenet_like_jpegs, machine  # noqa: E402

TARGET = 1.15


def settings(cfg):
    data_dir = Path(cfg.data_dir)
    if cfg.preset == 'gpu':  # 300 steps of batch 128 per epoch, bf16, the step-time benchmark's pair and size
        return [dict(name='224 px, bf16 (Fashion-MNIST upscaled)', dataset=fashion_subset(data_dir, 38400, 2000),
                     student='mobilenetv3_small_100', teacher='resnet50', size=224, batch=128, workers=8,
                     methods=('icd+kd',), epochs=3, extra=['--mixed-precision', 'bf16'])]
    if cfg.quick:
        small = fashion_subset(data_dir, 160, 50)
        return [dict(name='28 px (quick)', dataset=small, student='test_efficientnet', teacher='test_resnet',
                     size=28, batch=32, workers=1, methods=('icd+kd',), epochs=2)]
    jpegs = imagenet_like_jpegs(data_dir / 'jpegs_352', 352)
    return [
        dict(name='28 px', dataset=fashion_subset(data_dir, 5000, 1000), student='lcnet_050', teacher='resnet18',
             size=28, batch=64, workers=1, methods=('vanilla', 'kd', 'icd+kd'), epochs=4),
        dict(name='224 px', dataset=f'imagefolder:{jpegs}', student='mobilenetv3_small_100', teacher='resnet50',
             size=224, batch=32, workers=2, methods=('icd+kd',), epochs=3),
    ]


def argv_of(s: dict, method: str, pipeline: str, out: Path) -> list:
    return ['--dataset', str(s['dataset']), '--student', s['student'], '--teacher', s['teacher'],
            '--teacher-pretrained', 'false', '--method', method, '--input-size', '3', str(s['size']), str(s['size']),
            '-b', str(s['batch']), '--workers', str(s['workers']), '--epochs', str(s['epochs']), '--lr', '0.01',
            '--input-pipeline', pipeline, '--output', str(out), '--overwrite', '--seed', '0', *s.get('extra', [])]


def train_run(argv: list) -> list:
    """Epoch times of a real train_icd.py run."""
    result = icd_train.run(parse_and_validate(argv), argv)
    return result['epoch_seconds']


def floor_run(argv: list, epochs: int) -> list:
    """Epoch times of the same run's step and evaluation replayed on batches kept in memory."""
    args = parse_and_validate(argv)
    accelerator = Accelerator()
    r = icd_train.build(run_config(args), accelerator)
    icd_train.start(r)
    stage_t, stage_e = r.pipeline.train_stage, r.pipeline.eval_stage
    train = [stage_t(b, 0, i) for i, b in enumerate(r.train_loader)]
    evals = [stage_e(b) for b in r.eval_loader]
    task, optimizer, model = r.task, r.optimizer, r.task.get_eval_model()
    times = []
    for _ in range(epochs):
        started = time.perf_counter()
        task.train()
        for x, y in train:
            with accelerator.autocast():
                loss = task(x, y)['loss']
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        task.eval()
        with torch.no_grad():
            for x, _ in evals:
                with accelerator.autocast():
                    model(x)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    r.task.remove_hooks()
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='tiny models and data (for the tests)')
    parser.add_argument('--preset', choices=('cpu', 'gpu'), default='cpu', help='gpu: 300 bf16 steps at 224 px')
    parser.add_argument('--out', default=str(Path(__file__).parent / 'results' / 'epoch_time.md'))
    parser.add_argument('--data-dir', default=str(Path(__file__).parent / 'data'))
    cfg = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for s in settings(cfg):
            for method in s['methods']:
                times = {}
                for variant in ('floor', 'memory', 'loader'):
                    out = Path(tmp) / f'{variant}-{method}'
                    argv_v = argv_of(s, method, 'memory' if variant == 'floor' else variant, out)
                    started = time.perf_counter()
                    times[variant] = floor_run(argv_v, s['epochs']) if variant == 'floor' else train_run(argv_v)
                    print(f"{s['name']} {method} {variant}: epochs {[round(t, 2) for t in times[variant]]} s "
                          f"(run {time.perf_counter() - started:.0f}s)", flush=True)
                med = {k: statistics.median(v[1:] if len(v) > 1 else v) for k, v in times.items()}
                rows.append((s, method, med))
    lines = ['# Epoch time: train_icd.py against the compute floor', '',
             f'Generated by `python benchmarks/epoch_time.py{" --quick" if cfg.quick else ""}'
             f'{" --preset gpu" if cfg.preset == "gpu" else ""}`. Machine: '
             f'{machine(torch.device("cuda") if torch.cuda.is_available() else None)}. Median epoch time (train + eval) after the first epoch; the floor replays the same '
             f'batches through the same step and evaluation from memory (see the script\'s docstring). Target: '
             f'epoch / floor <= {TARGET}.', '',
             '| setting | pair | method | batch | workers | floor (s) | memory (s) | memory / floor | loader (s) | '
             'loader / floor |', '|---|---|---|---|---|---|---|---|---|---|']
    for s, method, med in rows:
        lines.append(f"| {s['name']} | {s['teacher']} -> {s['student']} | {method} | {s['batch']} | {s['workers']} | "
                     f"{med['floor']:.3f} | {med['memory']:.3f} | {med['memory'] / med['floor']:.3f} | "
                     f"{med['loader']:.3f} | {med['loader'] / med['floor']:.3f} |")
    ok = all(med['memory'] / med['floor'] <= TARGET for _, _, med in rows)
    lines += ['', f'The in-memory path (what `--input-pipeline auto` picks for these datasets) is '
                  f'{"within" if ok else "NOT within"} the target in every row.']
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.out).write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    return 0


if __name__ == '__main__':
    sys.exit(main())
