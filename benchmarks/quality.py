#!/usr/bin/env python3
"""Quality benchmark: ICD and ICD+KD against plain training, Hinton KD and timm's own distillation tasks.

On real Fashion-MNIST (Debian's dataset-fashion-mnist IDX files, converted once to a datasets save_to_disk folder;
online, zalando-datasets/fashion_mnist on the Hub is the same data), under one fixed budget per pair: the same
training subset, transforms, optimizer, schedule, epochs and seeds for every method; only the loss differs. Every
method runs through timm_icd's own epoch loop (timm_icd.engine), which takes any timm TrainingTask.

Methods: vanilla (CE), kd (paper weights 0.1 CE + 0.9 KD, T=4), timm_logit (timm.task.LogitDistillationTask with
timm train.py's defaults: CE + KD, T=4), timm_feature (timm.task.FeatureDistillationTask defaults: CE + MSE on
projected pre-logits), icd and icd+kd (paper weights).

Top-1 is measured on the full 10,000-image test split at the final epoch (never the best epoch), and on every
epoch for seed 0 (for the curves only). No setting here was tuned on the test split.

    python benchmarks/quality.py            # the full benchmark (~65 min on 2 CPU cores)
    python benchmarks/quality.py --quick    # one pair, one seed, tiny subset, for the tests (< 3 min)
    python benchmarks/quality.py --investigate   # what moves ICD, on data held out of the training split
"""
import argparse
import csv
import gzip
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from timm.data import create_transform
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.task import FeatureDistillationTask, LogitDistillationTask

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timm_icd import ICDDistillationTask, create_student  # noqa: E402
from timm_icd.data import ImageClassificationDataset  # noqa: E402
from timm_icd.engine import evaluate, train_one_epoch, LOSS_PARTS  # noqa: E402

from common import machine  # noqa: E402

FASHION_MNIST_IDX = Path('/usr/share/datasets/fashion-mnist')
LABELS = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot']
METHODS = ('vanilla', 'kd', 'timm_logit', 'timm_feature', 'icd', 'icd+kd')
INPUT_SIZE = (3, 28, 28)
TEACHER = {'name': 'resnet18', 'epochs': 10, 'opt': dict(opt='sgd', lr=0.05, momentum=0.9, weight_decay=5e-4)}
PAIRS = {
    # the paper's rule: lr 0.01 for MobileNet students
    'resnet18->mobilenetv3_small_050': dict(
        student='mobilenetv3_small_050', kwargs={}, opt=dict(opt='sgd', lr=0.01, momentum=0.9, weight_decay=5e-4),
        warmup=0),
    # a small ViT: 4x4 patches of 7 px, 4 blocks; the usual AdamW recipe for ViTs trained from scratch
    'resnet18->vit_tiny(p7,d4)': dict(
        student='vit_tiny_patch16_224', kwargs=dict(img_size=28, patch_size=7, depth=4),
        opt=dict(opt='adamw', lr=5e-4, weight_decay=0.05), warmup=1),
}


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path) as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def fashion_mnist(data_dir: Path) -> datasets.DatasetDict:
    """Fashion-MNIST as a DatasetDict (train 60,000 / test 10,000), converted once from the IDX files."""
    folder = data_dir / 'fashion_mnist'
    if (folder / 'dataset_dict.json').exists():
        return datasets.load_from_disk(str(folder))
    if not FASHION_MNIST_IDX.is_dir():
        raise SystemExit(f'{FASHION_MNIST_IDX} is missing: apt-get install dataset-fashion-mnist '
                         f'(or save zalando-datasets/fashion_mnist from the Hub to {folder}).')
    features = datasets.Features({'image': datasets.Image(), 'label': datasets.ClassLabel(names=LABELS)})
    splits = {}
    for split, prefix in (('train', 'train'), ('test', 't10k')):
        images = read_idx(FASHION_MNIST_IDX / f'{prefix}-images-idx3-ubyte.gz')
        labels = read_idx(FASHION_MNIST_IDX / f'{prefix}-labels-idx1-ubyte.gz')
        splits[split] = datasets.Dataset.from_dict({'image': list(images), 'label': labels.tolist()},
                                                   features=features)
    dd = datasets.DatasetDict(splits)
    dd.save_to_disk(str(folder))
    return datasets.load_from_disk(str(folder))


def loaders(train, test, seed: int, model, batch_size: int = 64):
    """Train/test loaders normalised with ``model``'s own mean and std, which the distillation tasks (timm's and
    ours) assume for the student's batches when they re-normalise them for the teacher."""
    norm = {'mean': model.pretrained_cfg['mean'], 'std': model.pretrained_cfg['std']}
    train_tf = create_transform(INPUT_SIZE, is_training=True, scale=(0.6, 1.0), hflip=0.5, color_jitter=0.0,
                                interpolation='bilinear', **norm)
    test_tf = create_transform(INPUT_SIZE, crop_pct=1.0, interpolation='bilinear', **norm)
    train_set = ImageClassificationDataset(train, 'image', 'label', train_tf, seed=seed)
    test_set = ImageClassificationDataset(test, 'image', 'label', test_tf, split_name='test')
    common = dict(num_workers=1, persistent_workers=False)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=True,
                                               generator=torch.Generator().manual_seed(seed), **common)
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=256, **common)
    return train_loader, test_loader


def build_task(method: str, student, teacher, **icd_kwargs):
    if method == 'timm_logit':  # timm train.py defaults: task and distill weights 1.0, --kd-temperature 4
        return LogitDistillationTask(student, teacher, temperature=4.0, verbose=False)
    if method == 'timm_feature':
        return FeatureDistillationTask(student, teacher, verbose=False)
    return ICDDistillationTask(student, teacher if method != 'vanilla' else None, method=method,
                               student_input_size=INPUT_SIZE, teacher_input_size=INPUT_SIZE, verbose=False,
                               **icd_kwargs)


# Investigation (on a validation split held out of the TRAINING split, never the test split): what moves ICD?
INVESTIGATE = [
    ('kd', {}, 64), ('icd', {}, 64), ('icd+kd', {}, 64),
    ('icd', {'icd_feat_dim': 32}, 64), ('icd', {'icd_feat_dim': 512}, 64),
    ('icd', {}, 128),
    ('icd', {'icd_alpha': 0.0}, 64),
    ('icd', {'student_layer': 'blocks.4', 'teacher_layer': 'layer3'}, 64),
    ('icd+kd', {'kd_temperature': 2.0}, 64), ('icd+kd', {'kd_temperature': 8.0}, 64),
    ('icd', {'icd_max_tau': 5.0}, 64), ('icd', {'icd_max_tau': 20.0}, 64),  # tau sits at the clamp of 10 here
]


def investigate(args, dd, accelerator, out: Path) -> None:
    """Pair A, 2 seeds per setting, trained on the benchmark's subset minus a held-out validation part.

    The teacher is trained again on the fit part only, so no image it has seen is used for scoring.
    """
    pair = list(PAIRS)[0]
    cfg = PAIRS[pair]
    rng = np.random.default_rng(123)
    pool = stratified_subset(dd['train'], args.train_size)
    order = rng.permutation(len(pool))
    val, fit = pool.select(np.sort(order[:1000])), pool.select(np.sort(order[1000:]))
    name = f'{args.name}_investigation'
    teacher, teacher_record = get_teacher(accelerator, fit, val, Path(args.data_dir) / f'{name}_teacher.st',
                                          out / f'{name}_teacher.json', args.teacher_epochs)
    csv_path = out / f'{name}.csv'
    fields = ['method', 'settings', 'batch', 'seed', 'val_top1', 'seconds']
    done = set()
    if csv_path.exists():  # resume: settings already measured are kept
        with open(csv_path) as f:
            done = {(r['method'], r['settings'], int(r['batch']), int(r['seed'])) for r in csv.DictReader(f)}
    for method, kwargs, batch in INVESTIGATE:
        for seed in range(args.investigate_seeds):
            if (method, json.dumps(kwargs, sort_keys=True), batch, seed) in done:
                continue
            t0 = time.time()
            torch.manual_seed(seed)
            student = create_student(cfg['student'], len(LABELS), **cfg['kwargs'])
            task = build_task(method, student, teacher, **kwargs)
            train_loader, val_loader = loaders(fit, val, seed=seed, model=student, batch_size=batch)
            metrics, _, _ = fit_task(accelerator, task, train_loader, val_loader, cfg['opt'], args.epochs,
                                     cfg['warmup'], seed, curve=False)
            task.remove_hooks()
            row = {'method': method, 'settings': json.dumps(kwargs, sort_keys=True), 'batch': batch, 'seed': seed,
                   'val_top1': metrics['top1'], 'seconds': round(time.time() - t0, 1)}
            append_csv(csv_path, fields, row)
            print(f"investigate {method} {kwargs} batch {batch} seed {seed}: val top-1 {metrics['top1']:.2f}%",
                  flush=True)
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    groups = {}
    for r in rows:
        groups.setdefault((r['method'], r['settings'], r['batch']), []).append(float(r['val_top1']))
    lines = ['# What moves ICD: an investigation on held-out training data', '',
             f'Generated by `python benchmarks/quality.py --investigate`. Pair {pair}; {len(fit)} training images '
             f'and a validation split of {len(val)} images, both from the benchmark\'s 60,000-image training split '
             f'(the test split is not used); {args.epochs} epochs; {args.investigate_seeds} seeds per setting; '
             f'top-1 on the validation split at the final epoch. The teacher ({TEACHER["name"]}) is trained '
             f'on the same {len(fit)} images only and scores {teacher_record["top1"]:.2f}% on the validation split.',
             '',
             '| method | changed setting | batch | val top-1 (mean +- std) |', '|---|---|---|---|']
    for (method, settings, batch), values in groups.items():
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(f'| {method} | {settings if settings != "{}" else "paper default"} | {batch} | '
                     f'{statistics.mean(values):.2f} +- {std:.2f} |')
    (out / f'{name}.md').write_text('\n'.join(lines) + '\n')


def fit_task(accelerator, task, train_loader, test_loader, opt_cfg: dict, epochs: int, warmup: int, seed: int,
          curve: bool):
    """Train ``task`` for ``epochs`` with timm_icd's epoch loop; return final test metrics and the curve."""
    optimizer = create_optimizer_v2(task.get_trainable_module(), **opt_cfg)
    module, optimizer, train_dl, test_dl = accelerator.prepare(
        task.get_trainable_module(), optimizer, train_loader, test_loader)
    task.trainable_module = module
    scheduler, _ = create_scheduler_v2(optimizer, 'cosine', num_epochs=epochs, warmup_epochs=warmup,
                                       warmup_lr=1e-5, updates_per_epoch=len(train_dl))
    args = SimpleNamespace(channels_last=False, seed=seed, clip_grad=None, skip_nonfinite=0, log_interval=50)
    state = {'epoch': 0, 'step_in_epoch': 0, 'global_step': 0, 'num_updates': 0, 'nonfinite_steps': 0,
             'epoch_sums': [0.0] * (len(LOSS_PARTS) + 1)}
    curve_points, train_metrics, metrics = [], {}, {}
    for epoch in range(epochs):
        state.update(epoch=epoch, step_in_epoch=0, epoch_sums=[0.0] * (len(LOSS_PARTS) + 1))
        train_dl.dataset.set_epoch(epoch)
        train_metrics = train_one_epoch(accelerator, task, train_dl, optimizer, scheduler, state, args)
        scheduler.step(epoch + 1)
        if curve or epoch == epochs - 1:
            task.eval()
            metrics = evaluate(accelerator, task.get_eval_model(), test_dl)
            if curve:
                curve_points.append((epoch, metrics['top1']))
    accelerator.free_memory()
    return metrics, train_metrics, curve_points


def stratified_subset(ds: datasets.Dataset, size: int, seed: int = 0) -> datasets.Dataset:
    labels = np.asarray(ds['label'])
    rng = np.random.default_rng(seed)
    per_class = size // len(LABELS)
    idx = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(len(LABELS))])
    return ds.select(np.sort(idx))


def get_teacher(accelerator, train, test, weights: Path, record_file: Path, epochs: int):
    """The benchmark's teacher, trained with --method vanilla on ``train`` and scored on ``test``; cached."""
    import safetensors.torch
    record = json.loads(record_file.read_text()) if record_file.exists() else {}
    torch.manual_seed(1000)
    teacher = create_student(TEACHER['name'], len(LABELS))
    if weights.exists() and record.get('epochs') == epochs:  # else (re)train: a cache of other settings is stale
        teacher.load_state_dict(safetensors.torch.load_file(weights))
    else:
        t0 = time.time()
        train_loader, test_loader = loaders(train, test, seed=1000, model=teacher)
        task = build_task('vanilla', teacher, None)
        metrics, _, _ = fit_task(accelerator, task, train_loader, test_loader, TEACHER['opt'], epochs, 0, 1000,
                                 curve=False)
        task.remove_hooks()
        record = {'name': TEACHER['name'], 'top1': metrics['top1'], 'top5': metrics['top5'], 'epochs': epochs,
                  'seconds': time.time() - t0}
        weights.parent.mkdir(parents=True, exist_ok=True)
        safetensors.torch.save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, weights)
        record_file.write_text(json.dumps(record))
        print(f"teacher {TEACHER['name']}: top-1 {metrics['top1']:.2f}% ({record['seconds']:.0f}s)", flush=True)
    return teacher.eval().requires_grad_(False), record


def run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    dd = fashion_mnist(Path(args.data_dir))
    train = stratified_subset(dd['train'], args.train_size)
    test = dd['test'] if not args.test_size else stratified_subset(dd['test'], args.test_size)
    pairs = {k: PAIRS[k] for k in list(PAIRS)[:args.pairs]}
    seeds = list(range(args.seeds))
    accelerator = Accelerator(cpu=True)
    if args.investigate:
        investigate(args, dd, accelerator, out)
        return 0
    if args.report_only:
        write_report(out, args, json.loads((out / f'{args.name}_teacher.json').read_text()))
        return 0
    runs_csv, curves_csv = out / f'{args.name}_runs.csv', out / f'{args.name}_curves.csv'
    done = set()
    if runs_csv.exists():  # resume an interrupted benchmark: completed runs are kept, not rerun
        with open(runs_csv) as f:
            previous = list(csv.DictReader(f))
        stale = {(r['epochs'], r['train_size']) for r in previous} - {(str(args.epochs), str(len(train)))}
        if stale:  # resuming must not mix runs of another budget into one table
            raise SystemExit(f'{runs_csv} holds runs with other (epochs, train size) {sorted(stale)}; move it '
                             f'aside or pass --out to another folder.')
        done = {(r['pair'], r['method'], int(r['seed'])) for r in previous}
    teacher_file = out / f'{args.name}_teacher.json'
    started = time.time()
    print(f'Fashion-MNIST: {len(train)} train images (stratified subset of 60,000), {len(test)} test images; '
          f'{len(pairs)} pairs x {len(METHODS)} methods x {len(seeds)} seeds, {args.epochs} epochs', flush=True)
    teacher_path = Path(args.data_dir) / f'{args.name}_teacher.safetensors'  # weights stay out of results/
    teacher, teacher_record = get_teacher(accelerator, train, test, teacher_path, teacher_file, args.teacher_epochs)

    fields = ['pair', 'teacher', 'student', 'method', 'seed', 'epochs', 'train_size', 'test_size', 'test_top1',
              'test_top5', 'train_loss', 'train_loss_ce', 'tau', 'seconds']
    for pair, cfg in pairs.items():
        for seed in seeds:
            for method in METHODS:
                if (pair, method, seed) in done:
                    continue
                t0 = time.time()
                torch.manual_seed(seed)
                student = create_student(cfg['student'], len(LABELS), **cfg['kwargs'])
                task = build_task(method, student, teacher)
                train_loader, test_loader = loaders(train, test, seed=seed, model=student)
                metrics, train_metrics, curve = fit_task(accelerator, task, train_loader, test_loader, cfg['opt'],
                                                      args.epochs, cfg['warmup'], seed, curve=seed == 0)
                if hasattr(task, 'remove_hooks'):
                    task.remove_hooks()
                row = {'pair': pair, 'teacher': TEACHER['name'], 'student': cfg['student'], 'method': method,
                       'seed': seed, 'epochs': args.epochs, 'train_size': len(train), 'test_size': metrics['count'],
                       'test_top1': metrics['top1'], 'test_top5': metrics['top5'],
                       'train_loss': train_metrics['loss'], 'train_loss_ce': train_metrics['loss_ce'],
                       'tau': train_metrics['tau'], 'seconds': round(time.time() - t0, 1)}
                append_csv(runs_csv, fields, row)
                for epoch, top1 in curve:  # seed 0 only
                    append_csv(curves_csv, ['pair', 'method', 'seed', 'epoch', 'test_top1'],
                               {'pair': pair, 'method': method, 'seed': seed, 'epoch': epoch, 'test_top1': top1})
                print(f"{pair} {method:12s} seed {seed}: test top-1 {metrics['top1']:.2f}% "
                      f"({row['seconds']:.0f}s, total {time.time() - started:.0f}s)", flush=True)
    write_report(out, args, teacher_record)
    return 0


def append_csv(path: Path, fields, row: dict) -> None:
    new = not path.exists()
    with open(path, 'a', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerow(row)


def summarize(rows):
    """{pair: {method: (mean, std, n)}} of test top-1."""
    table = {}
    for r in rows:
        table.setdefault(r['pair'], {}).setdefault(r['method'], []).append(float(r['test_top1']))
    return {p: {m: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)) for m, v in ms.items()}
            for p, ms in table.items()}


def write_report(out: Path, args, teacher: dict) -> None:
    with open(out / f'{args.name}_runs.csv') as f:
        rows = list(csv.DictReader(f))
    stats = summarize(rows)
    seconds = sum(float(r['seconds']) for r in rows) + teacher.get('seconds', 0)
    lines = [f'# Quality benchmark: Fashion-MNIST ({"quick mode" if args.quick else "full run"})', '',
             f'Generated by `python benchmarks/quality.py{" --quick" if args.quick else ""}`. Top-1 (%) on the '
             f'{rows[0]["test_size"]}-image test split at the final epoch, mean +- std over '
             f'{max(s[2] for p in stats.values() for s in p.values())} seeds; {rows[0]["train_size"]} training images '
             f'(stratified subset of the 60,000), {rows[0]["epochs"]} epochs, batch 64, 28x28 input, cosine schedule, '
             f'same data, transforms, optimizer, schedule and seeds for every method.', '',
             f'Teacher: {teacher["name"]} trained with `--method vanilla` for {teacher["epochs"]} epochs on the same '
             f'subset: **{teacher["top1"]:.2f}%** top-1' + (' (shared by both pairs).' if len(stats) > 1 else '.'), '',
             f'Machine: {machine()}. Wall time: {seconds / 60:.1f} min, the sum of every run\'s wall-clock time '
             f'(teacher included; the runs execute one after another)'
             + '.', '']
    header = '| pair | ' + ' | '.join(METHODS) + ' |'
    lines += [header, '|' + '---|' * (len(METHODS) + 1)]
    for pair, methods in stats.items():
        cells = [f'{methods[m][0]:.2f} +- {methods[m][1]:.2f}' if m in methods else '-' for m in METHODS]
        lines.append(f'| {pair} | ' + ' | '.join(cells) + ' |')
    lines += ['', '## Differences (mean over seeds, percentage points)', '',
              '| pair | icd - vanilla | icd+kd - vanilla | icd+kd - kd | icd+kd - timm_logit | icd+kd - timm_feature |',
              '|---|---|---|---|---|---|']
    for pair, m in stats.items():
        def diff(a, b):
            return f'{m[a][0] - m[b][0]:+.2f}' if a in m and b in m else '-'
        lines.append(f'| {pair} | {diff("icd", "vanilla")} | {diff("icd+kd", "vanilla")} | {diff("icd+kd", "kd")} | '
                     f'{diff("icd+kd", "timm_logit")} | {diff("icd+kd", "timm_feature")} |')
    lines += ['', f'Every run: `{args.name}_runs.csv`; test top-1 per epoch for seed 0: `{args.name}_curves.csv`; '
              f'plot: `{args.name}.png`.']
    findings = out / f'{args.name}_findings.md'
    if findings.exists():
        lines += ['', f'Findings and investigation: [{findings.name}]({findings.name}).']
    (out / f'{args.name}.md').write_text('\n'.join(lines) + '\n')
    plot(out, args.name, stats)


def plot(out: Path, name: str, stats) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    curves = {}
    curves_csv = out / f'{name}_curves.csv'
    if curves_csv.exists():
        with open(curves_csv) as f:
            for r in csv.DictReader(f):
                if r['seed'] == '0':
                    curves.setdefault(r['pair'], {}).setdefault(r['method'], []).append(
                        (int(r['epoch']), float(r['test_top1'])))
    pairs = list(stats)
    fig, axes = plt.subplots(1, 1 + len(pairs), figsize=(5.5 * (1 + len(pairs)), 4.2))
    ax = axes[0]
    width = 0.8 / len(METHODS)
    for i, method in enumerate(METHODS):
        means = [stats[p].get(method, (np.nan, 0, 0))[0] for p in pairs]
        stds = [stats[p].get(method, (0, 0, 0))[1] for p in pairs]
        ax.bar(np.arange(len(pairs)) + i * width - 0.4 + width / 2, means, width, yerr=stds, capsize=3,
               label=method)
    low = min(s[0] - s[1] for p in stats.values() for s in p.values())
    high = max(s[0] + s[1] for p in stats.values() for s in p.values())
    ax.set_ylim(max(0, low - 2), min(100, high + 1))
    ax.set_xticks(np.arange(len(pairs)), [p.replace('->', '\n-> ') for p in pairs], fontsize=8)
    ax.set_ylabel('test top-1 (%), final epoch, mean +- std')
    ax.set_title('Fashion-MNIST: method by pair')
    ax.legend(fontsize=7, ncol=2)
    for ax, pair in zip(axes[1:], pairs):
        for method, points in curves.get(pair, {}).items():
            points.sort()
            ax.plot([e + 1 for e, _ in points], [t for _, t in points], marker='o', ms=3, label=method)
        ax.set_title(f'{pair}: test top-1 per epoch (seed 0)', fontsize=9)
        ax.set_xlabel('epoch')
        ax.set_ylabel('test top-1 (%)')
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f'{name}.png', dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='one pair, one seed, tiny subset (for the tests)')
    parser.add_argument('--out', default=str(Path(__file__).parent / 'results'), help='results folder')
    parser.add_argument('--data-dir', default=str(Path(__file__).parent / 'data'), help='converted dataset folder')
    parser.add_argument('--train-size', type=int, default=6000)
    parser.add_argument('--test-size', type=int, default=0, help='0: the full 10,000-image test split')
    parser.add_argument('--epochs', type=int, default=6)
    parser.add_argument('--teacher-epochs', type=int, default=TEACHER['epochs'])
    parser.add_argument('--seeds', type=int, default=3)
    parser.add_argument('--pairs', type=int, default=len(PAIRS))
    parser.add_argument('--threads', type=int, default=torch.get_num_threads())
    parser.add_argument('--investigate', action='store_true',
                        help='vary ICD settings on pair 1, scored on data held out of the training split')
    parser.add_argument('--investigate-seeds', type=int, default=2)
    parser.add_argument('--report-only', action='store_true', help='rewrite the report and plot from the CSVs')
    args = parser.parse_args(argv)
    args.name = 'quality'
    if args.quick:
        args.name = 'quality_quick'
        args.train_size, args.test_size, args.epochs, args.teacher_epochs = 320, 500, 1, 1
        args.seeds, args.pairs = 1, 1
    return run(args)


if __name__ == '__main__':
    sys.exit(main())
