"""A run's parts from its config (``config.RunConfig``): data, models, the distiller, the input pipeline and the
teacher cache.

Order matters for users: every check that can fail fast (names, the output folder, the dataset, teacher weights, the
method against the teacher's label space, a resumed run's settings) runs here, before the first training step, and
nothing in an existing run folder is changed by it.
"""
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from timm.data import Mixup, resolve_data_config

from ..base import UserError
from ..data import (
    ImageData, Pipeline, create_pipeline, find_bad_images, load_image_data, load_stream_data)
from ..distill import (
    TERMS, DistillationTask, ICDDistillationTask, ICDTeacher, LabelSpace, auto_adapts, check_input_size,
    check_model_name, create_student, create_teacher, fixed_size_kwargs, imagenet_label_names, is_hub_or_local,
    match_label_space, logit_loss_of, read_label_map, reindex_classes, resolve_method, timm_methods)
from ..distill.label_space import ADAPTED, REINDEXED, SAME
from ..teacher_cache import CachedTeacher, TeacherCache, open_for_run
from .adapt import ADAPTED_DIR, adapt_teacher, adaptation_mode
from .checkpoint import check_output_dir, read_run_state, resolve_resume
from .config import DataConfig, RunConfig
from .state import RunState

_logger = logging.getLogger(__name__)

FineTune = Callable[[Path, Path], dict]  # (start folder, run folder) -> the trained folder and its results

# settings a resumed run must share with the run that wrote the checkpoint
FINGERPRINT = ('student', 'teacher', 'teacher_checkpoint', 'teacher_pretrained', 'method', 'dataset', 'input_size',
               'batch_size', 'grad_accum_steps', 'seed', 'data_seed', 'icd_feat_dim', 'icd_negatives',
               'student_layer', 'teacher_layer', 'num_processes', 'input_pipeline', 'model_ema', 'streaming',
               'shuffle_buffer', 'teacher_cache', 'decode_scale', 'decode_device', 'color_jitter_on', 'teacher_adapt',
               'teacher_adapt_augment', 'teacher_label_map', 'same_label_space')


@dataclass
class Run:
    """Everything a run needs, built and checked before the run folder is touched."""
    config: RunConfig
    accelerator: Accelerator
    output: Path
    data: ImageData
    data_config: dict
    task: DistillationTask
    pipeline: Pipeline
    train_loader: Any
    eval_loader: Any
    mixup_fn: Optional[Mixup]
    resume_from: List[Path] = field(default_factory=list)  # checkpoints to try, newest first
    cache: Optional[TeacherCache] = None
    model_ema: Any = None
    optimizer: Any = None
    scheduler: Any = None
    num_epochs: int = 0
    state: RunState = field(default_factory=RunState)
    adaptation: Optional[dict] = None  # the teacher's adaptation (run/adapt.py), when it had one
    preemption: Any = None  # run.preempt.Preemption: signals and time limit (set by run.train.run)


def default_output(config: RunConfig, accelerator: Accelerator) -> Path:
    """output/train/<time>-<student>-<method> (as timm names runs), the same on every process."""
    stamp = [time.strftime('%Y%m%d-%H%M%S')]
    if accelerator.num_processes > 1:
        broadcast_object_list(stamp)
    name = config.output.experiment or '-'.join([stamp[0], config.model.student.split(':')[-1].replace('/', '_'),
                                                 config.method.method.replace('+', '_')])
    return Path('output') / 'train' / name


def fingerprint(config: RunConfig, accelerator: Accelerator, method: str, pipeline: Pipeline) -> dict:
    """The FINGERPRINT settings of this run; ``method`` and ``pipeline`` are the resolved ones (not ``auto``). The
    decoding and the colour jitter's place are the pipeline's (``Pipeline.views``: what changes the samples; the
    jitter's place follows the device). The rest are the flags as parsed (``RunConfig.flags``), as runs saved them."""
    views = pipeline.views
    settings = {**config.flags, 'num_processes': accelerator.num_processes, 'method': method,
                'input_pipeline': pipeline.kind, 'data_seed': config.data.seed,
                'decode_scale': views.get('decode_scale', 'off'), 'decode_device': views.get('decode_device', 'cpu'),
                'color_jitter_on': views.get('color_jitter_on', 'device' if pipeline.kind == 'memory' else 'workers')}
    return {k: settings[k] for k in FINGERPRINT}


def _load_data(d: DataConfig, accelerator: Accelerator) -> ImageData:
    with accelerator.main_process_first():  # the hold-out of a dataset without eval split is fixed (seed 0)
        if d.streaming:
            data = load_stream_data(d.dataset, d.train_split, d.val_split, d.image_column, d.label_column,
                                    d.num_classes, d.train_num_samples, d.val_num_samples)
        else:
            data = load_image_data(d.dataset, d.train_split, d.val_split, d.image_column, d.label_column,
                                   d.val_fraction)
    if d.skip_bad_images and not d.streaming:  # a stream skips them as it reads (StreamLoader)
        for split in ('train', 'eval'):
            ds = getattr(data, split)
            bad = [find_bad_images(ds, data.image_column, d.workers) if accelerator.is_main_process else None]
            if accelerator.num_processes > 1:  # decode everything once, on the main process
                broadcast_object_list(bad)
            bad = bad[0]
            if bad:
                _logger.warning(f'Skipping {len(bad)} unreadable images in split {split} (rows {bad[:10]}).')
                setattr(data, split, ds.select(sorted(set(range(len(ds))) - set(bad))))
                setattr(data, f'{split}_rows', len(ds) - len(bad))
            data.skipped_images[split] = len(bad)
    return data


def _teacher_label_names(config: RunConfig, teacher: nn.Module) -> Optional[List[str]]:
    """The teacher's class names: its config's, else ImageNet's for timm's pretrained weights of an ImageNet class
    count (as timm's inference script reads them, ``infer_imagenet_subset``)."""
    names = teacher.pretrained_cfg.get('label_names')
    if not names and config.model.teacher_pretrained and not config.model.teacher_checkpoint:
        names = imagenet_label_names(teacher.num_classes)
    return list(names) if names else None


def _align_teacher(config: RunConfig, accelerator: Accelerator, data: ImageData, data_config: dict,
                   teacher: nn.Module, teacher_input_size, output: Path,
                   finetune: Optional[FineTune]) -> Tuple[LabelSpace, Optional[dict]]:
    """Match the teacher's classes to the dataset's; re-index or adapt it (in place) so that, where it can, it
    predicts exactly the dataset's classes. Returns the label space after that and the adaptation's record."""
    m, name, d, train = config.model, config.method.method, config.data, config.train
    names = _teacher_label_names(config, teacher)
    label_map = read_label_map(m.teacher_label_map, data.label_names, names) if m.teacher_label_map else None
    space = match_label_space(teacher.num_classes, data.num_classes, names, data.label_names, label_map,
                              m.same_label_space)
    uses_logits = (name == 'auto' and auto_adapts()) or logit_loss_of(name) is not None or bool(
        config.method.kd_loss_weight) or (name in timm_methods() and TERMS[name].same_label_space)
    mode = adaptation_mode(m.teacher_adapt if uses_logits or m.teacher_adapt != 'auto' else 'off', space)
    if mode is None:
        if space.predicts_dataset:
            _logger.info(f'Teacher: {space.why}.')
        if space.kind != REINDEXED:
            return space, None
        reindex_classes(teacher, space.index, list(data.label_names))
        return LabelSpace(SAME, None, space.why), None
    how = 'a linear probe on its frozen features' + (
        f', then {m.teacher_adapt_epochs} epochs of training the whole teacher' if mode == 'finetune' else '')
    _logger.info(f"Teacher: {space.why}; adapting it to the dataset's {data.num_classes} classes "
                 f"(--teacher-adapt {m.teacher_adapt}: {how}).")
    adaptation = adapt_teacher(
        teacher, data, data_config, accelerator, Path(m.teacher_adapt_dir or output / ADAPTED_DIR),
        teacher_input_size, m.teacher_torch_dtype, batch_size=d.eval_batch_size, workers=d.workers,
        passes=m.teacher_adapt_augment, augment=d.augment, seed=d.seed, overwrite=config.output.overwrite, mode=mode,
        finetune=finetune,
        finetune_settings={'epochs': m.teacher_adapt_epochs, 'lr': m.teacher_adapt_lr or train.lr / 10,
                           'opt': train.opt, 'sched': train.sched, 'batch_size': d.batch_size,
                           'weight_decay': train.weight_decay, 'seed': train.seed, 'augment': d.augment.per_sample()}
        if mode == 'finetune' else None)
    return LabelSpace(ADAPTED, None, f'the teacher was adapted to the dataset\'s classes ({space.why})'), adaptation


def _create_task(config: RunConfig, accelerator: Accelerator, data: ImageData, data_config: dict,
                 student: nn.Module, output: Path,
                 finetune: Optional[FineTune]) -> Tuple[DistillationTask, Optional[dict]]:
    """The teacher and the distiller, with the teacher aligned to the dataset's classes (re-indexed or adapted)
    and the method resolved against its label space; also the adaptation's record."""
    m, how = config.model, config.method
    teacher, teacher_input_size = None, m.teacher_input_size
    if how.method != 'vanilla':
        if teacher_input_size is None and (m.teacher_checkpoint or not (
                m.teacher_pretrained or is_hub_or_local(m.teacher))):
            teacher_input_size = data_config['input_size']  # weights without a config: assume the student's size
        teacher = create_teacher(m.teacher, data.num_classes, m.teacher_pretrained, m.teacher_checkpoint,
                                 **fixed_size_kwargs(m.teacher, teacher_input_size))
        check_input_size(teacher, teacher_input_size or teacher.pretrained_cfg.get('input_size')
                         or data_config['input_size'], 'teacher')
        if teacher.pretrained_cfg.get('interpolation') not in (None, data_config['interpolation']):
            _logger.info(f"The teacher sees the student's {data_config['interpolation']} resizing; its config "
                         f"says {teacher.pretrained_cfg['interpolation']} (set --interpolation to match it).")
    space, adaptation = None, None
    if teacher is not None:
        space, adaptation = _align_teacher(config, accelerator, data, data_config, teacher, teacher_input_size,
                                           output, finetune)
    method = resolve_method(
        how.method, data.num_classes, teacher_classes=teacher.num_classes if teacher is not None else None,
        task_loss_weight=how.task_loss_weight, kd_loss_weight=how.kd_loss_weight,
        icd_loss_weight=how.icd_loss_weight, label_space=space)
    criterion_kwargs = {'smoothing': how.smoothing, 'soft_targets': config.data.mixup_active}
    if method.name in timm_methods():  # timm's own tasks (feature, token), for comparison in the same loop
        input_size = tuple(teacher_input_size or teacher.pretrained_cfg.get('input_size') or data_config['input_size'])
        if input_size[1:] != tuple(data_config['input_size'])[1:]:
            raise UserError(f"--method {method.name} (timm's task) feeds the teacher the student's "
                            f"{data_config['input_size'][1]} px batches, but the teacher expects "
                            f"{input_size[1]} px: use --method icd, which resizes.")
        _logger.info(f'Method {method.reason}.')
        return TERMS[method.name].loss(
            student, teacher, criterion_kwargs=criterion_kwargs, task_loss_weight=method.task_loss_weight,
            kd_loss_weight=method.kd_loss_weight, student_mean=data_config['mean'], student_std=data_config['std'],
            verbose=accelerator.is_main_process, terms=dict(how.terms)), adaptation
    if config.cache.root and teacher is not None:  # the cache serves icd and kd runs alike: it holds the features
        teacher = ICDTeacher(teacher, teacher_input_size, layer=m.teacher_layer, need_features=True,
                             dtype=m.teacher_torch_dtype)
    return ICDDistillationTask(
        student, teacher, method=method, criterion_kwargs=criterion_kwargs, terms=dict(how.terms),
        student_layer=m.student_layer, teacher_layer=m.teacher_layer,
        student_input_size=data_config['input_size'], teacher_input_size=teacher_input_size,
        student_mean=data_config['mean'], student_std=data_config['std'], teacher_dtype=m.teacher_torch_dtype,
        verbose=accelerator.is_main_process), adaptation


def build(config: RunConfig, accelerator: Accelerator, finetune: Optional[FineTune] = None) -> Run:
    """Check names, the run folder, the data and the weights, and build the task and loaders; writes nothing but
    the adapted teacher, where the teacher needs one (``finetune`` trains it for ``--teacher-adapt finetune``)."""
    m, d, out = config.model, config.data, config.output
    output = Path(out.output) if out.output else default_output(config, accelerator)
    check_model_name(m.student, 'student')
    if config.method.method != 'vanilla':
        check_model_name(m.teacher, 'teacher')
    check_output_dir(output, out.resume, out.overwrite)
    data = _load_data(d, accelerator)
    student = create_student(m.student, data.num_classes, m.pretrained, m.student_checkpoint, drop_rate=m.drop,
                             drop_path_rate=m.drop_path, **fixed_size_kwargs(m.student, m.input_size))
    data_config = resolve_data_config(
        {'input_size': m.input_size, 'mean': m.mean, 'std': m.std, 'interpolation': m.interpolation,
         'crop_pct': m.crop_pct}, model=student)
    check_input_size(student, data_config['input_size'], 'student')
    task, adaptation = _create_task(config, accelerator, data, data_config, student, output, finetune)
    pipeline = create_pipeline(data, data_config, d.augment, d.pipeline(
        rank=accelerator.process_index, world=accelerator.num_processes, with_index=bool(config.cache.root),
        jitter_on_device=accelerator.device.type != 'cpu'))
    _logger.info(f'Input pipeline: {pipeline.description}.')
    cache = None
    if config.cache.root and task.teacher is not None:
        cache = open_for_run(
            config.cache.root, task.teacher, data, data_config, accelerator, d.augment, pipeline.kind, d.seed,
            config.train.epochs, m.teacher, teacher_dtype=m.teacher_dtype,
            mixed_precision=config.train.mixed_precision, features=config.cache.features, topk=config.cache.topk,
            views=pipeline.views)
        task.teacher = CachedTeacher(task.teacher, cache, pipeline.train_stage)
    mixup_fn = Mixup(
        mixup_alpha=d.mixup, cutmix_alpha=d.cutmix, cutmix_minmax=d.cutmix_minmax, prob=d.mixup_prob,
        switch_prob=d.mixup_switch_prob, mode=d.mixup_mode, label_smoothing=config.method.smoothing,
        num_classes=data.num_classes) if d.mixup_active else None
    resume_from = resolve_resume(output, out.resume)
    if resume_from:  # before any weights are read: a precise message for a mismatched run
        expected = fingerprint(config, accelerator, task.method, pipeline)
        saved = read_run_state(resume_from[0])['fingerprint']
        saved = {'input_pipeline': 'loader', 'model_ema': False, 'streaming': False,  # what older runs used
                 'shuffle_buffer': d.shuffle_buffer, 'data_seed': saved['seed'], 'teacher_cache': None,
                 'teacher_adapt': 'off', 'teacher_adapt_augment': 0, 'teacher_label_map': None,
                 'same_label_space': False,
                 **{k: expected[k] for k in ('decode_scale', 'decode_device', 'color_jitter_on')}, **saved}
        changed = [k for k in FINGERPRINT if saved.get(k) != expected[k]]
        if changed:
            raise UserError(f'cannot resume {resume_from[0]}: it was written with different '
                            f'{", ".join(changed)}; resume with the original settings.')
    return Run(config, accelerator, output, data, data_config, task, pipeline, pipeline.train_loader,
               pipeline.eval_loader, mixup_fn, resume_from=resume_from, cache=cache, adaptation=adaptation)
