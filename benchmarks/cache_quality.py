"""The teacher cache benchmark's quality part (``cache_speed.py``, part 2): students trained with a live teacher
against students reading a cache, on Fashion-MNIST, paired by seed.

The teacher is the v0.2 quality benchmark's resnet18 (its runner is archived, ``benchmarks/archive/``): trained once
with ``--method vanilla``'s task through timm_icd's own epoch loop and in-memory pipeline on a stratified 6,000-image
training subset (``quality_teacher``: that benchmark's recipe, kept here unchanged so that
``results/teacher_cache.md`` stays reproducible), its weights in the data folder and its record in
``results/quality_teachers.json``. The students are real ``train_icd.py`` runs with the same SGD settings and
augmentation (``quality_argv``).
"""
import json
import time
from pathlib import Path
from typing import List, Optional

import datasets
import safetensors.torch
import torch
from accelerate import Accelerator
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from cache_probe import DATA_SEED, after_first, random_teacher, train_run
from common import fashion_mnist, fashion_subset, paired_rows, subset
from timm_icd import ICDDistillationTask, create_student
from timm_icd.data import AugmentConfig, ImageData, create_pipeline, digits_dataset
from timm_icd.run import LoopConfig, RunState, evaluate, train_one_epoch

RESULTS = Path(__file__).parent / 'results'
TEACHER, STUDENT = 'resnet18', 'mobilenetv3_small_050'
INPUT_SIZE = (3, 28, 28)
SGD_TEACHER = dict(opt='sgd', lr=0.05, momentum=0.9, weight_decay=5e-4)
SGD_MOBILENET = dict(opt='sgd', lr=0.01, momentum=0.9, weight_decay=5e-4)  # the paper's rule for MobileNet students
TEACHER_EPOCHS, TEACHER_TRAIN_PER_CLASS, TEACHER_SEED = 10, 600, 1000
QUALITY_EPOCHS, QUALITY_SEEDS, QUALITY_TRAIN = 10, 8, 5000


def loaders(train: datasets.Dataset, test: datasets.Dataset, seed: int, model, batch_size: int = 64):
    """timm_icd's in-memory pipeline (decode once, augment batches on the device), normalised with ``model``'s own
    mean and std. Augmentation: random resized crop with scale 0.6-1, horizontal flips, no colour jitter."""
    config = {'input_size': INPUT_SIZE, 'mean': model.pretrained_cfg['mean'], 'std': model.pretrained_cfg['std'],
              'interpolation': 'bilinear', 'crop_pct': 1.0, 'crop_mode': 'center'}
    names = train.features['label'].names
    data = ImageData(train, test, 'image', 'label', len(names), names, 'fashion_mnist', 'train', 'test')
    augment = AugmentConfig(scale=(0.6, 1.0), hflip=0.5, color_jitter=0.0, train_interpolation='bilinear')
    return create_pipeline(data, config, augment, kind='memory', batch_size=batch_size, eval_batch_size=256, seed=seed)


def fit_task(accelerator, task, pipeline, opt_cfg: dict, epochs: int, seed: int) -> dict:
    """Train ``task`` for ``epochs`` with timm_icd's epoch loop (cosine, no warmup); return the final test metrics."""
    optimizer = create_optimizer_v2(task.get_trainable_module(), **opt_cfg)
    pipeline.to(accelerator.device)
    module, optimizer, train_dl, test_dl = accelerator.prepare(
        task.get_trainable_module(), optimizer, pipeline.train_loader, pipeline.eval_loader)
    task.trainable_module = module
    scheduler, _ = create_scheduler_v2(optimizer, 'cosine', num_epochs=epochs, warmup_epochs=0,
                                       warmup_lr=1e-5, updates_per_epoch=len(train_dl))
    config, state, metrics = LoopConfig(data_seed=seed, log_interval=50), RunState(), {}
    for epoch in range(epochs):
        train_one_epoch(accelerator, task, train_dl, optimizer, scheduler, state, config,
                        prepare=pipeline.train_stage)
        state.end_epoch()
        scheduler.step(epoch + 1)
        if epoch == epochs - 1:
            task.eval()
            metrics = evaluate(accelerator, task.get_eval_model(), test_dl, prepare=pipeline.eval_stage)
    accelerator.free_memory()
    return metrics


def quality_teacher(data_dir: Path, records_file: Path = RESULTS / 'quality_teachers.json'):
    """The quality benchmark's resnet18 teacher: (weights file, record), trained once (10 epochs on 600 training images
    per class, scored on the whole test split) unless its weights are in ``data_dir`` with the recorded epochs."""
    records = json.loads(records_file.read_text()) if records_file.exists() else {}
    record, weights = records.get(TEACHER, {}), data_dir / f'quality_teacher_{TEACHER}.safetensors'
    if weights.exists() and record.get('epochs') == TEACHER_EPOCHS:
        return weights, record
    dd = fashion_mnist(data_dir)
    train, test = subset(dd['train'], TEACHER_TRAIN_PER_CLASS)[0], subset(dd['test'], 0)[0]
    torch.manual_seed(TEACHER_SEED)
    teacher = create_student(TEACHER, len(train.features['label'].names))
    t0 = time.time()
    task = ICDDistillationTask(teacher, None, method='vanilla', student_input_size=INPUT_SIZE,
                               teacher_input_size=INPUT_SIZE, verbose=False)
    metrics = fit_task(Accelerator(), task, loaders(train, test, TEACHER_SEED, teacher), SGD_TEACHER, TEACHER_EPOCHS,
                       TEACHER_SEED)
    task.remove_hooks()
    record = {'name': TEACHER, 'classes': train.features['label'].names, 'train_size': len(train),
              'top1': metrics['top1'], 'top5': metrics['top5'], 'epochs': TEACHER_EPOCHS, 'seconds': time.time() - t0}
    weights.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(weights))
    records_file.write_text(json.dumps({**records, TEACHER: record}, indent=1))
    print(f"teacher {TEACHER}: top-1 {metrics['top1']:.2f}% ({record['seconds']:.0f}s)", flush=True)
    return weights, record


def quality_setting(cfg) -> dict:
    """Dataset, teacher weights and training flags of the quality comparison."""
    data_dir = Path(cfg.data_dir)
    if cfg.quick:
        folder = data_dir / 'digits_256_72'
        if not (folder / 'dataset_dict.json').exists():
            dd = digits_dataset()
            datasets.DatasetDict(train=dd['train'].select(range(256)), test=dd['test'].select(range(72))).save_to_disk(
                str(folder))
        teacher = random_teacher('test_resnet', 10, data_dir / 'teacher_cache_test_resnet_random.safetensors')
        return dict(name='digits (quick)', dataset=str(folder), teacher='test_resnet', teacher_file=teacher,
                    teacher_record=None, student='test_efficientnet', size=16, batch=32, epochs=2, seeds=1,
                    opt=dict(opt='sgd', lr=0.01, momentum=0.9, weight_decay=5e-4))
    weights, record = quality_teacher(data_dir)
    return dict(name='Fashion-MNIST', dataset=fashion_subset(data_dir, QUALITY_TRAIN, 0), teacher=TEACHER,
                teacher_file=str(weights), teacher_record=record, student=STUDENT, size=28, batch=64,
                epochs=cfg.quality_epochs, seeds=cfg.seeds, opt=SGD_MOBILENET)


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


def quality_lines(q: dict, rows: List[dict]) -> List[str]:
    """The report's quality section: a row per seed and the paired difference cached - live."""
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
    result = paired_rows(rows, 'cached', 'live', value='top1', arm='mode')
    if result is None:
        lines += ['', 'Mean paired difference cached - live: no interval with one seed.']
    else:
        mean, low, high, n = result['mean'], result['low'], result['high'], result['n']
        verdict = 'the interval includes 0: no difference detected' if low <= 0 <= high \
            else 'the interval excludes 0'
        lines += ['', f'Mean paired difference cached - live: {mean:+.2f} pp, 95% t-interval [{low:+.2f}, '
                      f'{high:+.2f}] over n={n} seeds ({verdict}). Live runs see the teacher\'s float32 outputs, '
                      f'cached runs the fp16-stored ones; the runs are otherwise identical per seed.']
    return lines
