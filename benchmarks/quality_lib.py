"""What the quality benchmarks share: real Fashion-MNIST, subsets, the teachers, the tasks, and one training run
through timm_icd's own epoch loop and in-memory pipeline (``timm_icd.run``, ``timm_icd.data``)."""
import csv
import gzip
import json
import time
from pathlib import Path

import datasets
import numpy as np
import safetensors.torch
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.task import FeatureDistillationTask, LogitDistillationTask

from timm_icd import ICDDistillationTask, create_student
from timm_icd.data import AugmentConfig, ImageData, create_pipeline
from timm_icd.run import LoopConfig, RunState, evaluate, train_one_epoch

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
    augment = AugmentConfig(scale=(0.6, 1.0), hflip=0.5, color_jitter=0.0, train_interpolation='bilinear')
    return create_pipeline(data, config, augment, kind='memory', batch_size=batch_size, eval_batch_size=256, seed=seed)


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
    config, state = LoopConfig(data_seed=seed, log_interval=50), RunState()
    curve_points, train_metrics, metrics = [], {}, {}
    for epoch in range(epochs):
        train_metrics = train_one_epoch(accelerator, task, train_dl, optimizer, scheduler, state, config,
                                        prepare=pipeline.train_stage)
        state.end_epoch()
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


FIELDS = ['study', 'pair', 'method', 'seed', 'epochs', 'teacher', 'student', 'train_size', 'test_size', 'test_top1',
          'test_top5', 'train_loss', 'train_loss_ce', 'tau', 'seconds']


def append_csv(path: Path, fields, row: dict) -> None:
    new = not path.exists()
    with open(path, 'a', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerow(row)
