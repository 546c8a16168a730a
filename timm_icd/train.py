"""A distillation run from parsed flags: data, models, the distiller, Accelerate, the epoch loop and the outputs.

Order matters for users: every check that can fail fast (flags, names, output folder, dataset, teacher weights)
runs before the first training step, and nothing in an existing run folder is changed until they all pass.
"""
import csv
import io
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import ProjectConfiguration, broadcast_object_list, gather_object, set_seed
from timm.data import Mixup, resolve_data_config
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import distribute_bn

from .cache import finish_epoch as finish_cache_epoch
from .cache import open_for_run
from .checkpoint import (
    check_output_dir, claim_output_dir, load_checkpoint, read_run_state, resolve_resume, save_checkpoint,
    settle_overwrite, write_text_atomic)
from .config import args_to_yaml, data_seed, teacher_dtype, tracker_config
from .data import ImageData, find_bad_images, load_image_data
from .engine import LOSS_PARTS, evaluate, train_one_epoch
from .errors import UserError
from .export import run_record, save_student
from .feature_task import FeatureTask
from .models import (
    check_model_name, create_student, create_student_ema, create_teacher, fixed_size_kwargs, is_hub_or_local)
from .pipeline import Pipeline, create_pipeline
from .report import CURVES, plot_run
from .streaming import load_stream_data
from .task import ICDDistillationTask, ICDTeacher
from .teacher_cache import CachedTeacher, TeacherCache
from .watchdog import start_watchdog

_logger = logging.getLogger(__name__)

# settings a resumed run must share with the run that wrote the checkpoint
FINGERPRINT = ('student', 'teacher', 'teacher_checkpoint', 'teacher_pretrained', 'method', 'dataset', 'input_size',
               'batch_size', 'grad_accum_steps', 'seed', 'data_seed', 'icd_feat_dim', 'icd_negatives',
               'student_layer', 'teacher_layer', 'num_processes', 'input_pipeline', 'model_ema', 'streaming',
               'shuffle_buffer', 'teacher_cache')


def default_output(args, accelerator: Accelerator) -> Path:
    """output/train/<time>-<student>-<method> (as timm names runs), the same on every process."""
    stamp = [time.strftime('%Y%m%d-%H%M%S')]
    if accelerator.num_processes > 1:
        broadcast_object_list(stamp)
    name = args.experiment or '-'.join([stamp[0], args.student.split(':')[-1].replace('/', '_'),
                                        args.method.replace('+', '_')])
    return Path('output') / 'train' / name


def _summary_csv(history: List[dict]) -> str:
    buf = io.StringIO()
    if history:
        writer = csv.DictWriter(buf, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    return buf.getvalue()


def _fingerprint(args, accelerator, method: str, pipeline: str) -> dict:
    """The FINGERPRINT settings of this run; ``method`` and ``pipeline`` are the resolved ones (not ``auto``)."""
    settings = {**vars(args), 'num_processes': accelerator.num_processes, 'method': method, 'input_pipeline': pipeline,
                'data_seed': data_seed(args)}
    return {k: settings[k] for k in FINGERPRINT}


def _fresh_state(args, accelerator, method: str, pipeline: str) -> dict:
    return {
        'epoch': 0, 'step_in_epoch': 0, 'global_step': 0, 'num_updates': 0,
        'epoch_sums': [0.0] * (len(LOSS_PARTS) + 1), 'nonfinite_steps': 0,
        'best_top1': None, 'best_epoch': None, 'history': [], 'teacher': None, 'seconds': 0.0,
        'fingerprint': _fingerprint(args, accelerator, method, pipeline),
    }


def _snapshot(state: dict) -> dict:
    """The JSON-able run state (loss sums leave the device here, once per checkpoint)."""
    snap = dict(state)
    if isinstance(snap['epoch_sums'], torch.Tensor):
        snap['epoch_sums'] = snap['epoch_sums'].tolist()
    return snap


@dataclass
class Run:
    """Everything a run needs, built and checked before the run folder is touched."""
    args: Any
    accelerator: Accelerator
    output: Path
    data: ImageData
    data_config: dict
    task: ICDDistillationTask
    pipeline: Pipeline
    train_loader: Any
    eval_loader: Any
    mixup_fn: Optional[Mixup]
    resume_from: Optional[Path] = None
    cache: Optional[TeacherCache] = None
    model_ema: Any = None
    optimizer: Any = None
    scheduler: Any = None
    num_epochs: int = 0
    state: dict = field(default_factory=dict)


def _check_label_space(method: str, teacher, label_names: List[str]) -> str:
    """The method to build, given what the teacher's config says its classes are.

    Counting classes is not enough to allow logit KD: a teacher saved with label names (this tool's students, most
    Hub models) that name other classes than the dataset's predicts another label space even at the same count.
    Then ``auto`` becomes ``icd`` and a method with a KD term is refused.
    """
    names = (teacher.pretrained_cfg.get('label_names') if teacher is not None else None) or None
    if names is None or len(names) != len(label_names) or [str(n) for n in names] == [str(n) for n in label_names]:
        return method
    if method == 'auto':
        _logger.info(f"The teacher's classes ({', '.join(map(str, names[:3]))}, ...) are not the dataset's "
                     f"({', '.join(map(str, label_names[:3]))}, ...): auto uses icd, as logit KD would be meaningless.")
        return 'icd'
    if 'kd' in method:
        raise UserError(f"--method {method} needs a teacher that predicts the dataset's classes, but the teacher's "
                        f"label names ({', '.join(map(str, names[:3]))}, ...) are not the dataset's "
                        f"({', '.join(map(str, label_names[:3]))}, ...): use --method icd or auto.")
    return method


def build(args, accelerator: Accelerator) -> Run:
    """Check names, the run folder, the data and the weights, and build the task and loaders; writes nothing."""
    output = Path(args.output) if args.output else default_output(args, accelerator)
    check_model_name(args.student, 'student')
    uses_teacher = args.method != 'vanilla'
    if uses_teacher:
        check_model_name(args.teacher, 'teacher')
    check_output_dir(output, args.resume, args.overwrite)

    with accelerator.main_process_first():  # the hold-out of a dataset without eval split is fixed (seed 0)
        if args.streaming:
            data = load_stream_data(args.dataset, args.train_split, args.val_split, args.image_column,
                                    args.label_column, args.num_classes, args.train_num_samples, args.val_num_samples)
        else:
            data = load_image_data(args.dataset, args.train_split, args.val_split, args.image_column,
                                   args.label_column, args.val_fraction)
    if args.skip_bad_images:
        for split in ('train', 'eval'):
            ds = getattr(data, split)
            bad = [find_bad_images(ds, data.image_column, args.workers) if accelerator.is_main_process else None]
            if accelerator.num_processes > 1:  # decode everything once, on the main process
                broadcast_object_list(bad)
            bad = bad[0]
            if bad:
                _logger.warning(f'Skipping {len(bad)} unreadable images in split {split} (rows {bad[:10]}).')
                setattr(data, split, ds.select(sorted(set(range(len(ds))) - set(bad))))
                setattr(data, f'{split}_rows', len(ds) - len(bad))
            data.skipped_images[split] = len(bad)

    student = create_student(args.student, data.num_classes, args.pretrained, args.student_checkpoint,
                             drop_rate=args.drop, drop_path_rate=args.drop_path,
                             **fixed_size_kwargs(args.student, args.input_size))
    data_config = resolve_data_config(
        {'input_size': args.input_size, 'mean': args.mean, 'std': args.std, 'interpolation': args.interpolation,
         'crop_pct': args.crop_pct}, model=student)
    teacher, teacher_input_size = None, args.teacher_input_size
    if uses_teacher:
        if teacher_input_size is None and (args.teacher_checkpoint or not (
                args.teacher_pretrained or is_hub_or_local(args.teacher))):
            teacher_input_size = data_config['input_size']  # weights without a config: assume the student's size
        teacher = create_teacher(args.teacher, data.num_classes, args.teacher_pretrained, args.teacher_checkpoint,
                                 **fixed_size_kwargs(args.teacher, teacher_input_size))
        if teacher.pretrained_cfg.get('interpolation') not in (None, data_config['interpolation']):
            _logger.info(f"The teacher sees the student's {data_config['interpolation']} resizing; its config "
                         f"says {teacher.pretrained_cfg['interpolation']} (set --interpolation to match it).")
    method = _check_label_space(args.method, teacher, data.label_names)
    mixup_active = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    if method == 'feature':  # timm's own feature distillation, for comparison in the same loop
        input_size = tuple(teacher.pretrained_cfg.get('input_size') or data_config['input_size'])
        if tuple(teacher_input_size or input_size)[1:] != tuple(data_config['input_size'])[1:]:
            raise UserError(f"--method feature (timm's task) feeds the teacher the student's "
                            f"{data_config['input_size'][1]} px batches, but the teacher expects "
                            f"{tuple(teacher_input_size or input_size)[1]} px: use --method icd, which resizes.")
        task = FeatureTask(student, teacher, criterion_kwargs={'smoothing': args.smoothing, 'soft_targets':
                           mixup_active}, task_loss_weight=args.task_loss_weight, kd_loss_weight=args.kd_loss_weight,
                           student_mean=data_config['mean'], student_std=data_config['std'],
                           verbose=accelerator.is_main_process)
    else:
        if args.teacher_cache:  # the cache serves icd and kd runs alike: it always holds the features
            teacher = ICDTeacher(teacher, teacher_input_size, layer=args.teacher_layer, need_features=True,
                                 dtype=teacher_dtype(args))
        task = ICDDistillationTask(
            student, teacher, method=method,
            criterion_kwargs={'smoothing': args.smoothing, 'soft_targets': mixup_active},
            task_loss_weight=args.task_loss_weight, kd_loss_weight=args.kd_loss_weight,
            icd_loss_weight=args.icd_loss_weight, kd_temperature=args.kd_temperature,
            kd_standardize=args.kd_standardize, icd_feat_dim=args.icd_feat_dim, icd_alpha=args.icd_alpha,
            icd_init_t=args.icd_init_t, icd_max_tau=args.icd_max_tau, icd_negatives=args.icd_negatives,
            student_layer=args.student_layer, teacher_layer=args.teacher_layer,
            student_input_size=data_config['input_size'], teacher_input_size=teacher_input_size,
            student_mean=data_config['mean'], student_std=data_config['std'], teacher_dtype=teacher_dtype(args),
            verbose=accelerator.is_main_process)
    pipeline = create_pipeline(data, data_config, args, accelerator.process_index, accelerator.num_processes)
    _logger.info(f'Input pipeline: {pipeline.description}.')
    cache = None
    if args.teacher_cache and task.teacher is not None:
        cache = open_for_run(args, data, data_config, pipeline.kind, task.teacher, accelerator)
        task.teacher = CachedTeacher(task.teacher, cache)
    mixup_fn = Mixup(
        mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax, prob=args.mixup_prob,
        switch_prob=args.mixup_switch_prob, mode=args.mixup_mode, label_smoothing=args.smoothing,
        num_classes=data.num_classes) if mixup_active else None
    resume_from = resolve_resume(output, args.resume) if args.resume else None
    if resume_from is not None:  # before any weights are read: a precise message for a mismatched run
        expected = _fingerprint(args, accelerator, task.method, pipeline.kind)
        saved = read_run_state(resume_from)['fingerprint']
        saved = {'input_pipeline': 'loader', 'model_ema': False, 'streaming': False,  # what older runs used
                 'shuffle_buffer': args.shuffle_buffer, 'data_seed': saved['seed'], 'teacher_cache': None, **saved}
        changed = [k for k in FINGERPRINT if saved.get(k) != expected[k]]
        if changed:
            raise UserError(f'cannot resume {resume_from}: it was written with different '
                            f'{", ".join(changed)}; resume with the original settings.')
    return Run(args, accelerator, output, data, data_config, task, pipeline, pipeline.train_loader,
               pipeline.eval_loader, mixup_fn, resume_from=resume_from, cache=cache)


def start(r: Run) -> None:
    """Claim the run folder, move everything onto the device(s), and restore a checkpoint or measure the teacher."""
    args, accelerator, task = r.args, r.accelerator, r.task
    if accelerator.is_main_process:
        claim_output_dir(r.output, args.overwrite)
        write_text_atomic(r.output / 'args.yaml', args_to_yaml(args))
    accelerator.wait_for_everyone()
    if args.log_with:  # into the run folder (OUT/logs/<project>), on the main process (Accelerate decides)
        accelerator.project_configuration.logging_dir = str(r.output / 'logs')
        accelerator.init_trackers(args.tracker_project, config=tracker_config(args))

    if args.grad_checkpointing:
        task.student.set_grad_checkpointing(True)
    if args.sync_bn:
        task.convert_sync_batchnorm()
    task.to(accelerator.device)
    r.pipeline.to(accelerator.device)
    if args.channels_last:
        task.to(memory_format=torch.channels_last)
    optimizer = create_optimizer_v2(task.trainable_module, **optimizer_kwargs(args))
    if args.model_ema:  # on the device, before DDP or compile wrap the student (as timm's train.py)
        r.model_ema = create_student_ema(task.student, args)
        accelerator.register_for_checkpointing(r.model_ema)
    if args.compile:  # student + heads and teacher, with their hooks, before DDP wraps the student (as timm)
        task.compile()
    if r.pipeline.kind == 'stream':  # each process streams its own part: Accelerate must not shard it again
        task.trainable_module, r.optimizer = accelerator.prepare(task.trainable_module, optimizer)
    else:
        task.trainable_module, r.optimizer, r.train_loader, r.eval_loader = accelerator.prepare(
            task.trainable_module, optimizer, r.train_loader, r.eval_loader)
    updates_per_epoch = -(-len(r.train_loader) // args.grad_accum_steps)
    r.scheduler, r.num_epochs = create_scheduler_v2(
        r.optimizer, **scheduler_kwargs(args), updates_per_epoch=updates_per_epoch)

    r.state = _fresh_state(args, accelerator, task.method, r.pipeline.kind)
    if r.resume_from is not None:
        r.state = load_checkpoint(accelerator, r.resume_from, r.scheduler)
        if accelerator.process_index > 0:  # the saved loss sums are all processes' (see checkpoint): count them once
            r.state['epoch_sums'] = [0.0] * len(r.state['epoch_sums'])
        _logger.info(f"Resumed from {r.resume_from}: epoch {r.state['epoch']}, step {r.state['step_in_epoch']}.")
    elif r.cache is not None and r.cache.manifest.get('teacher_metrics'):  # measured by the run that wrote it
        r.state['teacher'] = r.cache.manifest['teacher_metrics']
    elif task.teacher is not None and task.teacher.num_classes == r.data.num_classes:
        task.eval()
        r.state['teacher'] = evaluate(accelerator, task.teacher_logits, r.eval_loader, args.channels_last,
                                      r.pipeline.eval_stage, sharded=r.pipeline.kind == 'stream')
        _logger.info(f"Teacher on '{r.data.eval_split}': top-1 {r.state['teacher']['top1']:.2f}%, "
                     f"top-5 {r.state['teacher']['top5']:.2f}% (with the student's eval preprocessing)")


def checkpoint(r: Run, state: dict) -> None:
    """Save a checkpoint; the first one also lets go of a run replaced with --overwrite.

    Mid-epoch, a streaming run also records where each process's stream goes on (``StreamLoader.position``).
    """
    accelerator = r.accelerator
    state['stream'] = None
    if r.pipeline.kind == 'stream' and state['step_in_epoch']:
        positions = [r.train_loader.position]
        state['stream'] = gather_object(positions) if accelerator.num_processes > 1 else positions
    snapshot = _snapshot(state)
    if accelerator.num_processes > 1 and state['step_in_epoch']:  # the epoch's loss sums of all processes so far
        sums = torch.as_tensor(snapshot['epoch_sums'], dtype=torch.float64, device=accelerator.device)
        snapshot['epoch_sums'] = accelerator.reduce(sums, reduction='sum').tolist()
    save_checkpoint(accelerator, r.output, snapshot, r.scheduler, r.args.keep_checkpoints)
    if r.accelerator.is_main_process:
        settle_overwrite(r.output, keep_new=True)


def fit(r: Run, argv: Optional[List[str]]) -> dict:
    """The epoch loop from the current state, then the student folder (and the Hub push)."""
    args, accelerator, task, state = r.args, r.accelerator, r.task, r.state

    def step_checkpoint(current: dict) -> None:
        # every N optimizer updates, so never in the middle of a gradient accumulation cycle
        if args.checkpoint_steps and accelerator.sync_gradients and current['num_updates'] % args.checkpoint_steps == 0:
            checkpoint(r, current)

    last = state['history'][-1] if state['history'] else {}
    epoch_seconds = []  # wall time of each epoch this process ran (train + eval), for the log and benchmarks
    for epoch in range(state['epoch'], r.num_epochs):
        started = time.perf_counter()
        state['epoch'] = epoch
        r.train_loader.set_epoch(epoch)
        r.train_loader.dataset.set_epoch(epoch)
        loader = r.train_loader
        if state['step_in_epoch'] and r.pipeline.kind == 'stream':
            loader.resume_from(state['stream'][accelerator.process_index])
        elif state['step_in_epoch']:
            loader = accelerator.skip_first_batches(r.train_loader, state['step_in_epoch'])
        recording = r.cache is not None and not r.cache.complete(epoch)
        if recording:  # this epoch runs the teacher and records it
            r.cache.prepare_epoch(epoch, accelerator.is_main_process)
            accelerator.wait_for_everyone()
        train_metrics = train_one_epoch(accelerator, task, loader, r.optimizer, r.scheduler, state, args,
                                        r.mixup_fn, on_step=step_checkpoint, prepare=r.pipeline.train_stage,
                                        model_ema=r.model_ema, select=task.teacher.select if r.cache else None)
        if recording:
            finish_cache_epoch(r.cache, task.teacher, r.pipeline, epoch, accelerator,
                               args.validation_batch_size or args.batch_size, args.workers, state['teacher'])
        if accelerator.num_processes > 1 and args.dist_bn in ('reduce', 'broadcast'):
            distribute_bn(task.student, accelerator.num_processes, reduce=args.dist_bn == 'reduce')
        task.eval()
        sharded = r.pipeline.kind == 'stream'
        metrics = evaluate(accelerator, task.get_eval_model(), r.eval_loader, args.channels_last,
                           r.pipeline.eval_stage, sharded)
        ema_metrics = {}
        if r.model_ema is not None:
            ema_metrics = evaluate(accelerator, r.model_ema.module, r.eval_loader, args.channels_last,
                                   r.pipeline.eval_stage, sharded)
            ema_metrics = {'eval_ema_top1': ema_metrics['top1'], 'eval_ema_top5': ema_metrics['top5']}
        r.scheduler.step(epoch + 1, metrics['top1'])
        epoch_seconds.append(time.perf_counter() - started)
        state['seconds'] = state.get('seconds', 0.0) + epoch_seconds[-1]  # over resumes too
        last = {'epoch': epoch, **{f'train_{k}': v for k, v in train_metrics.items() if k != 'lr'},
                **{f'eval_{k}': v for k, v in metrics.items()}, **ema_metrics, 'lr': train_metrics['lr']}
        state['history'].append(last)
        if args.log_with:  # the summary.csv row, as epoch/<column>
            accelerator.log({f'epoch/{k}': v for k, v in {**last, 'seconds': epoch_seconds[-1]}.items()},
                            step=state['global_step'])
        _logger.info(f"Epoch {epoch}: loss {train_metrics['loss']:.4f} (ce {train_metrics['loss_ce']:.4f}, "
                     f"kd {train_metrics['loss_kd']:.4f}, icd {train_metrics['loss_icd']:.4f}, tau "
                     f"{train_metrics['tau']:.3f}), eval top-1 {metrics['top1']:.2f}%, top-5 "
                     f"{metrics['top5']:.2f}% on {metrics['count']} images"
                     + (f"; EMA top-1 {ema_metrics['eval_ema_top1']:.2f}%" if ema_metrics else '')
                     + f" ({epoch_seconds[-1]:.1f}s)")
        if state['best_top1'] is None or metrics['top1'] > state['best_top1']:
            state['best_top1'], state['best_epoch'] = metrics['top1'], epoch
            if args.save_best and accelerator.is_main_process:
                save_student(task.student, r.output / 'student_best', r.data_config, r.data.label_names,
                             run_record(r, argv, last))
        state.update(epoch=epoch + 1, step_in_epoch=0, epoch_sums=[0.0] * (len(LOSS_PARTS) + 1))
        checkpoint(r, state)
        if accelerator.is_main_process:
            if epoch + 1 < r.num_epochs:
                write_text_atomic(r.output / 'summary.csv', _summary_csv(state['history']))
            plot_run(state['history'], r.output / CURVES, f'{args.student} ({task.method})')

    result = {'output': str(r.output), 'student': str(r.output / 'student'), 'method': task.method,
              'teacher': state['teacher'], 'top1': last.get('eval_top1'), 'top5': last.get('eval_top5'),
              'best_top1': state['best_top1'], 'best_epoch': state['best_epoch'], 'epochs': r.num_epochs,
              'model': task.student, 'epoch_seconds': epoch_seconds, 'input_pipeline': r.pipeline.kind}
    if accelerator.is_main_process:
        write_text_atomic(r.output / 'summary.csv', _summary_csv(state['history']))  # also after a resume at the end
        save_student(task.student, r.output / 'student', r.data_config, r.data.label_names, run_record(r, argv, last))
        if r.model_ema is not None:  # the ICD heads are not part of it: the EMA holds the bare student only
            save_student(r.model_ema.module, r.output / 'student_ema', r.data_config, r.data.label_names,
                         run_record(r, argv, last, ema=True))
    accelerator.wait_for_everyone()
    if args.push_to_hub and accelerator.is_main_process:  # after the barrier: the others need not wait for it
        from .hub import push_student
        folder = r.output / ('student_ema' if args.push_ema else 'student')
        result['hub_url'] = push_student(folder, args.push_to_hub, private=args.hub_private,
                                         revision=args.hub_revision)
    return result


def create_accelerator(args) -> Accelerator:
    """The run's Accelerator, logging set up on every process, the watchdog started and the seed set."""
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.grad_accum_steps, log_with=args.log_with,
        # trackers write into the run folder, which is settled later (start() sets the final logging_dir)
        project_config=ProjectConfiguration(logging_dir=str(Path(args.output or 'output') / 'logs')),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=data_seed(args),
                                                  non_blocking=torch.cuda.is_available()))
    start_watchdog(accelerator)  # multi-process runs: a dead peer stops the others at once, with one line
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format='%(message)s', force=True)
    logging.getLogger('accelerate').setLevel(logging.WARNING)  # one INFO line per checkpoint file otherwise
    set_seed(args.seed)
    return accelerator


def run(args, argv: Optional[List[str]] = None) -> dict:
    """Train a student as ``args`` say (see train_icd.py --help) and return its results and the model.

    Every check runs before the run folder changes. If the run fails before its first checkpoint, a run it was
    replacing with --overwrite is put back.
    """
    accelerator = create_accelerator(args)
    started = time.time()
    if accelerator.num_processes > 1:
        _logger.info(f'Training on {accelerator.num_processes} processes ({accelerator.distributed_type}).')
    r = build(args, accelerator)
    try:
        start(r)
        result = fit(r, argv)
    except BaseException as e:
        if accelerator.is_main_process:
            settle_overwrite(r.output, keep_new=False)
        if isinstance(e, UserError) and accelerator.process_index > 0:
            e.rank = accelerator.process_index  # may be this process's alone (e.g. a bad image in its shard)
        raise
    finally:
        r.task.remove_hooks()
    result['seconds'] = time.time() - started
    accelerator.end_training()
    return result

