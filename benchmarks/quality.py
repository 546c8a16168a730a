#!/usr/bin/env python3
"""Quality benchmark: ICD against plain training, Hinton KD (with and without logit standardisation) and timm's own
distillation tasks, with paired confidence intervals.

On real Fashion-MNIST (Debian's dataset-fashion-mnist IDX files, converted once to a datasets save_to_disk folder;
online, zalando-datasets/fashion_mnist on the Hub is the same data), under one fixed budget per study: the same
training subset, augmentation, optimizer, schedule, epochs and seeds for every method; only the loss differs. Every
method runs through timm_icd's own epoch loop and in-memory input pipeline (timm_icd.engine, timm_icd.pipeline),
which take any timm TrainingTask.

Studies (each a list of runs; every run is one row of ``<name>_runs.csv``):

* ``main``: three teacher -> student pairs x 8 methods: vanilla (CE), kd (paper weights 0.1 CE + 0.9 KD, T=4),
  kd+ls (the same with logit standardisation, Sun et al. 2024), timm_logit (timm.task.LogitDistillationTask with
  train.py's defaults), timm_feature (timm.task.FeatureDistillationTask), icd, icd+kd and icd+kd+ls; 5 seeds on the
  CNN pair, 3 on the others.
* ``transfer``: a teacher trained on the six clothing classes distils a student on the four classes it never saw
  (sandal, sneaker, bag, ankle boot), from other images: logit KD is impossible; vanilla, timm_feature and icd
  (what ``--method auto`` picks).
* ``length``: kd and icd+kd on the CNN pair trained 4x longer (24 epochs), 2 seeds, to see whether the ICD effect
  changes with the schedule.

To keep the benchmark within about two hours on 2 CPU cores the extra pairs skip methods the CNN pair answers
already: timm_logit (Hinton KD with timm's weights), and on the resnet50 pair also kd+ls and timm_feature; the
committed run used ``--pairs 2`` (the ViT pair's last full run is v0.1's, with the per-sample loader).

Top-1 is measured on the test split (restricted to the student's classes in ``transfer``) at the final epoch, never
the best epoch. No setting here was tuned on the test split; ``--investigate`` scores settings on data held out of
the training split. Runs execute ``--jobs`` at a time (one thread each); an interrupted benchmark resumes.

    python benchmarks/quality.py                 # the full benchmark (~2 h on 2 CPU cores)
    python benchmarks/quality.py --quick         # one pair, one seed, tiny subset, for the tests (< 2 min)
    python benchmarks/quality.py --preset gpu    # the full 60,000-image training split, longer, on one GPU
    python benchmarks/quality.py --investigate   # what moves ICD, on data held out of the training split
"""
import argparse
import csv
import gzip
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.task import FeatureDistillationTask, LogitDistillationTask

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timm_icd import ICDDistillationTask, create_student  # noqa: E402
from timm_icd.data import ImageData  # noqa: E402
from timm_icd.engine import evaluate, train_one_epoch, LOSS_PARTS  # noqa: E402
from timm_icd.pipeline import create_pipeline  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_report import write_report  # noqa: E402

FASHION_MNIST_IDX = Path('/usr/share/datasets/fashion-mnist')
LABELS = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot']
METHODS = ('vanilla', 'kd', 'kd+ls', 'timm_logit', 'timm_feature', 'icd', 'icd+kd', 'icd+kd+ls')
INPUT_SIZE = (3, 28, 28)
SGD_TEACHER = dict(opt='sgd', lr=0.05, momentum=0.9, weight_decay=5e-4)
SGD_MOBILENET = dict(opt='sgd', lr=0.01, momentum=0.9, weight_decay=5e-4)  # the paper's rule for MobileNet students
TEACHER_EPOCHS = 10
PAIRS = {
    'resnet18->mobilenetv3_small_050': dict(
        teacher='resnet18', student='mobilenetv3_small_050', kwargs={}, opt=SGD_MOBILENET, warmup=0, seeds=5),
    # shaped like the README's headline command
    'resnet50->mobilenetv3_small_100': dict(
        teacher='resnet50', student='mobilenetv3_small_100', kwargs={}, opt=SGD_MOBILENET, warmup=0, seeds=3,
        skip=('timm_logit', 'kd+ls', 'timm_feature')),
    # a small ViT: 4x4 patches of 7 px, 4 blocks; the usual AdamW recipe for ViTs trained from scratch
    'resnet18->vit_tiny(p7,d4)': dict(
        teacher='resnet18', student='vit_tiny_patch16_224', kwargs=dict(img_size=28, patch_size=7, depth=4),
        opt=dict(opt='adamw', lr=5e-4, weight_decay=0.05), warmup=1, seeds=3, skip=('timm_logit',)),
}
# transfer across label spaces: the teacher knows clothing, the student learns footwear and bags
TEACHER_CLASSES, STUDENT_CLASSES = (0, 1, 2, 3, 4, 6), (5, 7, 8, 9)
TRANSFER = dict(pair='resnet18(clothing)->mobilenetv3_small_050(footwear, bags)', methods=('vanilla', 'timm_feature',
                'icd'), seeds=8, student_per_class=300)
LENGTH = dict(pair='resnet18->mobilenetv3_small_050', methods=('kd', 'icd+kd'), seeds=2,
              factor=4)
# logit standardisation (Sun et al., CVPR 2024): z-scored logits, their KD temperature for CIFAR-100
# and their loss weights (0.1 CE + 9 KD); icd+kd+ls adds the ICD term (weight 1) to exactly that recipe
LS_KWARGS = {'kd_standardize': True, 'kd_temperature': 2.0, 'task_loss_weight': 0.1, 'kd_loss_weight': 9.0}


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


def subset(ds: datasets.Dataset, per_class: int, classes=range(len(LABELS)), seed: int = 0) -> datasets.Dataset:
    """``per_class`` rows of each of ``classes`` (all of them for per_class 0), relabelled 0..len(classes)-1."""
    labels = np.asarray(ds['label'])
    rng = np.random.default_rng(seed)
    idx = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class or None] for c in classes]))
    out = ds.select(idx)
    if tuple(classes) != tuple(range(len(LABELS))):
        remap = {c: i for i, c in enumerate(classes)}
        names = [LABELS[c] for c in classes]
        out = out.map(lambda r: {'label': remap[r['label']]}, features=datasets.Features(
            {'image': datasets.Image(), 'label': datasets.ClassLabel(names=names)}))
    return out


def loaders(train, test, seed: int, model, batch_size: int = 64):
    """timm_icd's in-memory pipeline (decode once, augment batches on the device), normalised with ``model``'s own
    mean and std, which the distillation tasks (timm's and ours) assume when they re-normalise for the teacher.
    Augmentation: random resized crop with scale 0.6-1, horizontal flips, no colour jitter."""
    config = {'input_size': INPUT_SIZE, 'mean': model.pretrained_cfg['mean'], 'std': model.pretrained_cfg['std'],
              'interpolation': 'bilinear', 'crop_pct': 1.0, 'crop_mode': 'center'}
    names = train.features['label'].names
    data = ImageData(train, test, 'image', 'label', len(names), names, 'fashion_mnist', 'train', 'test')
    args = SimpleNamespace(
        batch_size=batch_size, validation_batch_size=256, reprob=0.0, remode='pixel', recount=1, workers=0,
        seed=seed, no_aug=False, scale=[0.6, 1.0], ratio=[3 / 4, 4 / 3], hflip=0.5, vflip=0.0, color_jitter=0.0,
        aa=None, train_interpolation='bilinear', input_pipeline='memory')
    return create_pipeline(data, config, args)


def build_task(method: str, student, teacher, **icd_kwargs):
    if method == 'timm_logit':  # timm train.py defaults: task and distill weights 1.0, --kd-temperature 4
        return LogitDistillationTask(student, teacher, temperature=4.0, verbose=False)
    if method == 'timm_feature':
        return FeatureDistillationTask(student, teacher, verbose=False)
    if method.endswith('+ls'):
        method, icd_kwargs = method[:-len('+ls')], {**LS_KWARGS, **icd_kwargs}
    return ICDDistillationTask(student, teacher if method != 'vanilla' else None, method=method,
                               student_input_size=INPUT_SIZE, teacher_input_size=INPUT_SIZE, verbose=False,
                               **icd_kwargs)


def fit_task(accelerator, task, pipeline, opt_cfg: dict, epochs: int, warmup: int, seed: int, curve: bool):
    """Train ``task`` for ``epochs`` with timm_icd's epoch loop; return final test metrics, train metrics, curve."""
    optimizer = create_optimizer_v2(task.get_trainable_module(), **opt_cfg)
    pipeline.to(accelerator.device)
    module, optimizer, train_dl, test_dl = accelerator.prepare(
        task.get_trainable_module(), optimizer, pipeline.train_loader, pipeline.eval_loader)
    task.trainable_module = module
    scheduler, _ = create_scheduler_v2(optimizer, 'cosine', num_epochs=epochs, warmup_epochs=warmup,
                                       warmup_lr=1e-5, updates_per_epoch=len(train_dl))
    args = SimpleNamespace(channels_last=False, seed=seed, clip_grad=None, skip_nonfinite=0, log_interval=50)
    state = {'epoch': 0, 'step_in_epoch': 0, 'global_step': 0, 'num_updates': 0, 'nonfinite_steps': 0,
             'epoch_sums': [0.0] * (len(LOSS_PARTS) + 1)}
    curve_points, train_metrics, metrics = [], {}, {}
    for epoch in range(epochs):
        state.update(epoch=epoch, step_in_epoch=0, epoch_sums=[0.0] * (len(LOSS_PARTS) + 1))
        train_metrics = train_one_epoch(accelerator, task, train_dl, optimizer, scheduler, state, args,
                                        prepare=pipeline.train_stage)
        scheduler.step(epoch + 1)
        if curve or epoch == epochs - 1:
            task.eval()
            metrics = evaluate(accelerator, task.get_eval_model(), test_dl, prepare=pipeline.eval_stage)
            if curve:
                curve_points.append((epoch, metrics['top1']))
    accelerator.free_memory()
    return metrics, train_metrics, curve_points


def scaled(opt: dict, cfg) -> dict:
    """The optimizer settings with the learning rate scaled linearly from batch 64 to ``cfg.batch_size``."""
    return {**opt, 'lr': opt['lr'] * cfg.batch_size / 64}


def teacher_file(cfg, name: str) -> Path:
    return Path(cfg.data_dir) / f'{cfg.name}_teacher_{name}.safetensors'  # weights stay out of results/


def get_teacher(accelerator, cfg, name: str, arch: str, train, test, epochs: int):
    """A teacher trained with --method vanilla on ``train``, scored on ``test`` and cached: (model, record)."""
    import safetensors.torch
    records_file = Path(cfg.out) / f'{cfg.name}_teachers.json'
    records = json.loads(records_file.read_text()) if records_file.exists() else {}
    record, weights = records.get(name, {}), teacher_file(cfg, name)
    torch.manual_seed(1000)
    num_classes = len(train.features['label'].names)
    teacher = create_student(arch, num_classes)
    if weights.exists() and record.get('epochs') == epochs:  # else (re)train: a cache of other settings is stale
        teacher.load_state_dict(safetensors.torch.load_file(weights))
    else:
        t0 = time.time()
        task = build_task('vanilla', teacher, None)
        metrics, _, _ = fit_task(accelerator, task, loaders(train, test, 1000, teacher, cfg.batch_size),
                                 scaled(SGD_TEACHER, cfg), epochs, 0, 1000, curve=False)
        task.remove_hooks()
        record = {'name': arch, 'classes': train.features['label'].names, 'train_size': len(train),
                  'top1': metrics['top1'], 'top5': metrics['top5'], 'epochs': epochs, 'seconds': time.time() - t0}
        weights.parent.mkdir(parents=True, exist_ok=True)
        safetensors.torch.save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, weights)
        records[name] = record
        records_file.write_text(json.dumps(records, indent=1))
        print(f"teacher {name}: top-1 {metrics['top1']:.2f}% ({record['seconds']:.0f}s)", flush=True)
    return teacher.eval().requires_grad_(False), record


def splits(cfg, study: str):
    """(train, test) of a study, and for ``transfer`` the teacher's own (train, test)."""
    dd = fashion_mnist(Path(cfg.data_dir))
    per_class = cfg.train_size // len(LABELS)
    test_per_class = cfg.test_size // len(LABELS) if cfg.test_size else 0
    if study != 'transfer':
        return subset(dd['train'], per_class), subset(dd['test'], test_per_class)
    student = (subset(dd['train'], cfg.transfer_per_class, STUDENT_CLASSES),
               subset(dd['test'], test_per_class, STUDENT_CLASSES))
    teacher = (subset(dd['train'], per_class, TEACHER_CLASSES), subset(dd['test'], test_per_class, TEACHER_CLASSES))
    return student, teacher


def run_job(cfg, job: dict) -> dict:
    """One training run (in a worker process with one thread): returns its CSV row and, for seed 0, its curve."""
    torch.set_num_threads(cfg.threads)
    accelerator = Accelerator(cpu=cfg.cpu)
    pair = PAIRS.get(job['pair']) or PAIRS[LENGTH['pair']]
    if job['study'] == 'transfer':
        (train, test), _ = splits(cfg, 'transfer')
        teacher_name, arch, pair = 'clothing', 'resnet18', PAIRS[LENGTH['pair']]
    else:
        train, test = splits(cfg, job['study'])
        teacher_name = arch = pair['teacher']
    import safetensors.torch
    torch.manual_seed(1000)
    teacher = create_student(arch, len(LABELS) if job['study'] != 'transfer' else len(TEACHER_CLASSES))
    teacher.load_state_dict(safetensors.torch.load_file(teacher_file(cfg, teacher_name)))
    teacher.eval().requires_grad_(False)
    t0 = time.time()
    torch.manual_seed(job['seed'])
    student = create_student(pair['student'], len(train.features['label'].names), **pair['kwargs'])
    task = build_task(job['method'], student, teacher)
    curve = job['seed'] == 0 and job['pair'] == list(PAIRS)[0] and job['study'] == 'main'  # curves: the CNN pair
    metrics, train_metrics, points = fit_task(
        accelerator, task, loaders(train, test, job['seed'], student, cfg.batch_size), scaled(pair['opt'], cfg),
        job['epochs'], pair['warmup'], job['seed'], curve)
    if hasattr(task, 'remove_hooks'):
        task.remove_hooks()
    row = {**job, 'teacher': teacher_name, 'student': pair['student'], 'train_size': len(train),
           'test_size': metrics['count'], 'test_top1': metrics['top1'], 'test_top5': metrics['top5'],
           'train_loss': train_metrics['loss'], 'train_loss_ce': train_metrics['loss_ce'],
           'tau': train_metrics['tau'], 'seconds': round(time.time() - t0, 1)}
    return {'row': row, 'curve': points}


FIELDS = ['study', 'pair', 'method', 'seed', 'epochs', 'teacher', 'student', 'train_size', 'test_size', 'test_top1',
          'test_top5', 'train_loss', 'train_loss_ce', 'tau', 'seconds']


def transfer_jobs(cfg) -> list:
    if not (cfg.transfer and 'transfer' in cfg.studies):
        return []
    return [dict(study='transfer', pair=TRANSFER['pair'], method=m, seed=s, epochs=cfg.epochs)
            for s in range(1 if cfg.quick else TRANSFER['seeds']) for m in TRANSFER['methods']]


def jobs_of(cfg) -> list:
    jobs = []
    for i, pair in enumerate(list(PAIRS)[:cfg.pairs] if 'main' in cfg.studies else []):
        for seed in range(min(cfg.seeds, PAIRS[pair]['seeds']) if cfg.seeds else PAIRS[pair]['seeds']):
            jobs += [dict(study='main', pair=pair, method=m, seed=seed, epochs=cfg.epochs) for m in cfg.methods
                     if m not in PAIRS[pair].get('skip', ())]
        if i == 0:  # the CNN pair first, then the transfer study: the questions that matter most
            jobs += transfer_jobs(cfg)
    if 'main' not in cfg.studies:
        jobs += transfer_jobs(cfg)
    if cfg.length and 'length' in cfg.studies:
        jobs += [dict(study='length', pair=LENGTH['pair'], method=m, seed=s, epochs=cfg.epochs * LENGTH['factor'])
                 for s in range(LENGTH['seeds']) for m in LENGTH['methods']]
    return jobs


def append_csv(path: Path, fields, row: dict) -> None:
    new = not path.exists()
    with open(path, 'a', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerow(row)


def run(cfg) -> int:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads * cfg.jobs)
    runs_csv, curves_csv = out / f'{cfg.name}_runs.csv', out / f'{cfg.name}_curves.csv'
    if cfg.report_only:
        write_report(out, cfg)
        return 0
    done = set()
    if runs_csv.exists():  # resume an interrupted benchmark: completed runs are kept, not rerun
        with open(runs_csv) as f:
            previous = list(csv.DictReader(f))
        if previous and 'study' not in previous[0]:
            raise SystemExit(f'{runs_csv} comes from an older version of this benchmark; move it aside.')
        stale = {r['train_size'] for r in previous if r['study'] == 'main'} - {str(cfg.train_size)}
        if stale:  # resuming must not mix runs of another budget into one table
            raise SystemExit(f'{runs_csv} holds runs with other train sizes {sorted(stale)}; move it aside or pass '
                             f'--out to another folder.')
        done = {(r['study'], r['pair'], r['method'], int(r['seed']), int(r['epochs'])) for r in previous}
    jobs = [j for j in jobs_of(cfg) if (j['study'], j['pair'], j['method'], j['seed'], j['epochs']) not in done]
    started = time.time()
    print(f'Fashion-MNIST: {cfg.train_size} train images, {cfg.test_size or 10000} test images; {len(jobs)} runs to '
          f'do, '
          f'{cfg.jobs} at a time', flush=True)
    accelerator = Accelerator(cpu=cfg.cpu)
    teachers = {PAIRS[p]['teacher'] for p in list(PAIRS)[:cfg.pairs]} | ({'resnet18'} if cfg.length else set())
    for name in sorted(teachers):
        get_teacher(accelerator, cfg, name, name, *splits(cfg, 'main'), cfg.teacher_epochs)
    if cfg.transfer:
        get_teacher(accelerator, cfg, 'clothing', 'resnet18', *splits(cfg, 'transfer')[1], cfg.teacher_epochs)

    def record(result):
        row = result['row']
        append_csv(runs_csv, FIELDS, row)
        for epoch, top1 in result['curve']:
            append_csv(curves_csv, ['pair', 'method', 'seed', 'epoch', 'test_top1'],
                       {'pair': row['pair'], 'method': row['method'], 'seed': row['seed'], 'epoch': epoch,
                        'test_top1': top1})
        print(f"{row['study']} {row['pair']} {row['method']:12s} seed {row['seed']} ({row['epochs']} ep): test top-1 "
              f"{row['test_top1']:.2f}% ({row['seconds']:.0f}s, total {time.time() - started:.0f}s)", flush=True)

    if cfg.jobs == 1:
        for job in jobs:
            record(run_job(cfg, job))
    else:
        worker_cfg = SimpleNamespace(**{**vars(cfg), 'threads': cfg.threads})
        with ProcessPoolExecutor(cfg.jobs, mp_context=multiprocessing.get_context('spawn')) as pool:
            for result in pool.map(run_job, [worker_cfg] * len(jobs), jobs):
                record(result)
    write_report(out, cfg)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='one pair, one seed, tiny subset (for the tests)')
    parser.add_argument('--preset', choices=('cpu', 'gpu'), default='cpu',
                        help='gpu: the full 60,000-image training split on one GPU (about 5 min on an H100)')
    parser.add_argument('--out', default=str(Path(__file__).parent / 'results'), help='results folder')
    parser.add_argument('--data-dir', default=str(Path(__file__).parent / 'data'), help='converted dataset folder')
    parser.add_argument('--train-size', type=int, default=6000, help='stratified training subset')
    parser.add_argument('--test-size', type=int, default=0, help='0: the full 10,000-image test split')
    parser.add_argument('--epochs', type=int, default=6)
    parser.add_argument('--teacher-epochs', type=int, default=TEACHER_EPOCHS)
    parser.add_argument('--seeds', type=int, default=0, help='seeds per pair (0: 5 on the CNN pair, 3 on others)')
    parser.add_argument('--pairs', type=int, default=len(PAIRS))
    parser.add_argument('--methods', default=','.join(METHODS))
    parser.add_argument('--no-transfer', dest='transfer', action='store_false')
    parser.add_argument('--studies', default='main,transfer,length', help='which studies to run (default: all)')
    parser.add_argument('--no-length', dest='length', action='store_false')
    parser.add_argument('--batch-size', type=int, default=64, help='lr scales linearly from 64')
    parser.add_argument('--jobs', type=int, default=2, help='runs at a time, one thread each (default: 2)')
    parser.add_argument('--investigate', nargs='?', const='defaults', default=None,
                        choices=('defaults', 'when-icd-hurts'),
                        help='vary settings on pair 1, scored on data held out of the training split')
    parser.add_argument('--investigate-seeds', type=int, default=2)
    parser.add_argument('--report-only', action='store_true', help='rewrite the report and plot from the CSVs')
    cfg = parser.parse_args(argv)
    cfg.methods = tuple(m for m in cfg.methods.split(',') if m)
    cfg.studies = tuple(s for s in cfg.studies.split(',') if s)
    cfg.name, cfg.threads, cfg.cpu = 'quality', 1, True
    cfg.transfer_per_class = TRANSFER['student_per_class']
    cfg.pairs_flag = f' --pairs {cfg.pairs}' if cfg.pairs != len(PAIRS) else ''
    if cfg.preset == 'gpu':
        cfg.name, cfg.cpu, cfg.jobs = 'quality_gpu', False, 1
        # sized for about 5 minutes on one H100: 6 methods x 2 seeds of 10 epochs at batch 256 (lr scaled x4)
        cfg.train_size, cfg.epochs, cfg.threads, cfg.pairs, cfg.seeds, cfg.batch_size = 60000, 10, 8, 1, 2, 256
        cfg.methods = ('vanilla', 'kd', 'kd+ls', 'icd', 'icd+kd', 'icd+kd+ls')
        cfg.transfer = cfg.length = False
        cfg.transfer_per_class = 0
    if cfg.quick:
        cfg.name = 'quality_quick' if cfg.preset == 'cpu' else 'quality_gpu_quick'
        cfg.train_size, cfg.test_size, cfg.epochs, cfg.teacher_epochs = 320, 500, 1, 1
        cfg.seeds, cfg.pairs, cfg.transfer_per_class, cfg.length = 1, 1, 40, False
    if cfg.investigate:
        from quality_investigate import investigate
        return investigate(cfg)
    return run(cfg)


if __name__ == '__main__':
    sys.exit(main())
