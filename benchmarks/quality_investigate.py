"""What moves ICD: settings varied on data held out of the TRAINING split (never the test split).

Pair 1 of the quality benchmark, 2 seeds per setting; the teacher is trained again on the fit part only, so no
image it has seen is used for scoring.

    python benchmarks/quality.py --investigate
"""
import csv
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from quality import LABELS, PAIRS, build_task, create_student, fashion_mnist, fit_task, get_teacher, loaders, subset

# (method, changed settings, batch, learning rate or None for the pair's 0.01)
STUDIES = {
    # v0.1's sweep of ICD's own settings, at the benchmark's recipe
    'defaults': [
        ('kd', {}, 64, None), ('icd', {}, 64, None), ('icd+kd', {}, 64, None),
        ('icd', {'icd_feat_dim': 32}, 64, None), ('icd', {'icd_feat_dim': 512}, 64, None),
        ('icd', {}, 128, None),
        ('icd', {'icd_alpha': 0.0}, 64, None),
        ('icd', {'student_layer': 'blocks.4', 'teacher_layer': 'layer3'}, 64, None),
        ('icd+kd', {'kd_temperature': 2.0}, 64, None), ('icd+kd', {'kd_temperature': 8.0}, 64, None),
        ('icd', {'icd_max_tau': 5.0}, 64, None), ('icd', {'icd_max_tau': 20.0}, 64, None),
    ],
    # when does ICD hurt? A user saw icd and icd+kd end below plain training at train_icd.py's default lr 0.05
    # (tau at its clamp, train CE above kd's): the same comparison at lr 0.05 and 0.01, and the ICD weight and
    # tau clamp as remedies
    'when-icd-hurts': [
        (m, {}, 64, lr) for lr in (0.05, 0.01) for m in ('vanilla', 'kd', 'icd', 'icd+kd')
    ] + [
        ('icd+kd', {'icd_loss_weight': 0.3}, 64, 0.05), ('icd+kd', {'icd_loss_weight': 0.3}, 64, 0.01),
        ('icd', {'icd_max_tau': 5.0}, 64, 0.05),
    ],
}


def investigate(cfg) -> int:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads * cfg.jobs)
    accelerator = Accelerator(cpu=cfg.cpu)
    pair = list(PAIRS)[0]
    pcfg = PAIRS[pair]
    pool = subset(fashion_mnist(Path(cfg.data_dir))['train'], cfg.train_size // len(LABELS))
    order = np.random.default_rng(123).permutation(len(pool))
    val, fit = pool.select(np.sort(order[:1000])), pool.select(np.sort(order[1000:]))
    study = '' if cfg.investigate == 'defaults' else '_' + cfg.investigate.replace('-', '_')
    name = f'{cfg.name}_investigation{study}'
    inv_cfg = type(cfg)(**{**vars(cfg), 'name': name})
    inv_cfg.name = f'{cfg.name}_investigation'  # one held-out teacher for every study
    teacher, teacher_record = get_teacher(accelerator, inv_cfg, 'resnet18', pcfg['teacher'], fit, val,
                                          cfg.teacher_epochs)
    csv_path = out / f'{name}.csv'
    fields = ['method', 'settings', 'batch', 'lr', 'seed', 'val_top1', 'train_loss_ce', 'tau', 'seconds']
    done = set()
    if csv_path.exists():  # resume: settings already measured are kept
        with open(csv_path) as f:
            done = {(r['method'], r['settings'], int(r['batch']), r.get('lr', ''), int(r['seed']))
                    for r in csv.DictReader(f)}
    for method, kwargs, batch, lr in STUDIES[cfg.investigate]:
        opt = pcfg['opt'] if lr is None else {**pcfg['opt'], 'lr': lr}
        for seed in range(cfg.investigate_seeds):
            if (method, json.dumps(kwargs, sort_keys=True), batch, '' if lr is None else str(lr), seed) in done:
                continue
            t0 = time.time()
            torch.manual_seed(seed)
            student = create_student(pcfg['student'], len(LABELS), **pcfg['kwargs'])
            task = build_task(method, student, teacher, **kwargs)
            metrics, train_metrics, _ = fit_task(accelerator, task, loaders(fit, val, seed, student, batch), opt,
                                                 cfg.epochs, pcfg['warmup'], seed, curve=False)
            task.remove_hooks()
            row = {'method': method, 'settings': json.dumps(kwargs, sort_keys=True), 'batch': batch,
                   'lr': '' if lr is None else lr, 'seed': seed, 'val_top1': metrics['top1'],
                   'train_loss_ce': train_metrics['loss_ce'], 'tau': train_metrics['tau'],
                   'seconds': round(time.time() - t0, 1)}
            new = not csv_path.exists()
            with open(csv_path, 'a', newline='') as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                if new:
                    writer.writeheader()
                writer.writerow(row)
            print(f"investigate {method} {kwargs} batch {batch} lr {opt['lr']} seed {seed}: val top-1 "
                  f"{metrics['top1']:.2f}%", flush=True)
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    groups = {}
    for r in rows:
        key = (r['method'], r['settings'], r['batch'], r.get('lr') or str(pcfg['opt']['lr']))
        groups.setdefault(key, []).append(r)
    lines = ['# What moves ICD: an investigation on held-out training data', '',
             f'Generated by `python benchmarks/quality.py --investigate {cfg.investigate}`. Pair {pair}; '
             f'{len(fit)} training images and a validation split of {len(val)} images, both from the benchmark\'s '
             f'60,000-image training split '
             f'(the test split is not used); {cfg.epochs} epochs; {cfg.investigate_seeds} seeds per setting; '
             f'top-1 on the validation split at the final epoch. The teacher ({pcfg["teacher"]}) is trained '
             f'on the same {len(fit)} images only and scores {teacher_record["top1"]:.2f}% on the validation split.',
             '',
             '| method | changed setting | batch | lr | val top-1 (mean +- std) | per seed | train CE | final tau |',
             '|---|---|---|---|---|---|---|---|']
    for (method, settings, batch, lr), group in groups.items():
        values = [float(r['val_top1']) for r in group]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        ce = statistics.mean(float(r['train_loss_ce']) for r in group) if 'train_loss_ce' in group[0] else float('nan')
        tau = statistics.mean(float(r['tau']) for r in group) if 'tau' in group[0] else float('nan')
        lines.append(f'| {method} | {settings if settings != "{}" else "paper default"} | {batch} | {lr} | '
                     f'{statistics.mean(values):.2f} +- {std:.2f} | {", ".join(f"{v:.2f}" for v in values)} | '
                     f'{ce:.3f} | {tau:.2f} |')
    (out / f'{name}.md').write_text('\n'.join(lines) + '\n')
    return 0
