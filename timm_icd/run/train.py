"""A distillation run from its config (``config.RunConfig``): build it (``build.py``), then claim the run folder,
train epoch by epoch, checkpoint, and write the student (and push it).

If the run fails before its first checkpoint, a run it was replacing with ``--overwrite`` is put back.
"""
import csv
import io
import logging
import os
import time
from pathlib import Path
from typing import Callable, List, Optional

import torch
import torch.distributed as dist
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import ProjectConfiguration, gather_object, set_seed
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import distribute_bn

from ..base import UserError, write_text_atomic
from ..distill import create_student_ema
from ..publish import CURVES, plot_run, push_student, save_student
from ..teacher_cache import acquire_epoch, release_claims
from ..teacher_cache import finish_epoch as finish_cache_epoch
from .build import Run, build, fingerprint
from .checkpoint import claim_output_dir, load_first, save_checkpoint, settle_overwrite
from .config import RunConfig, RunConfigOrFlags, run_config
from .loop import evaluate, train_one_epoch
from .preempt import Preempted, Preemption, job_deadline, parse_signals, parse_time_limit
from .record import run_record
from .state import RunState
from .watchdog import start_watchdog

_logger = logging.getLogger(__name__)


def _summary_csv(history: List[dict]) -> str:
    buf = io.StringIO()
    if history:
        writer = csv.DictWriter(buf, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    return buf.getvalue()


def start(r: Run) -> None:
    """Claim the run folder, move everything onto the device(s), and restore a checkpoint or measure the teacher."""
    config, accelerator, task = r.config, r.accelerator, r.task
    train, out = config.train, config.output
    if accelerator.is_main_process:
        claim_output_dir(r.output, out.overwrite)
        write_text_atomic(r.output / 'args.yaml', config.flags_yaml())
    accelerator.wait_for_everyone()
    if out.log_with:  # into the run folder (OUT/logs/<project>), on the main process (Accelerate decides)
        accelerator.project_configuration.logging_dir = str(r.output / 'logs')
        accelerator.init_trackers(out.tracker_project, config=config.tracker_hyperparameters())

    if train.grad_checkpointing:
        task.student.set_grad_checkpointing(True)
    if train.sync_bn:
        task.convert_sync_batchnorm()
    task.to(accelerator.device)
    r.pipeline.to(accelerator.device)
    if train.channels_last:
        task.to(memory_format=torch.channels_last)
    optimizer = create_optimizer_v2(task.trainable_module, **train.optimizer)
    if train.model_ema:  # on the device, before DDP or compile wrap the student (as timm's train.py)
        r.model_ema = create_student_ema(task.student, decay=train.model_ema_decay, warmup=train.model_ema_warmup)
        accelerator.register_for_checkpointing(r.model_ema)
    if train.compile:  # student + heads and teacher, with their hooks, before DDP wraps the student (as timm)
        task.compile()
    if r.pipeline.kind == 'stream':  # each process streams its own part: Accelerate must not shard it again
        task.trainable_module, r.optimizer = accelerator.prepare(task.trainable_module, optimizer)
    else:
        task.trainable_module, r.optimizer, r.train_loader, r.eval_loader = accelerator.prepare(
            task.trainable_module, optimizer, r.train_loader, r.eval_loader)
    updates_per_epoch = -(-len(r.train_loader) // config.data.grad_accum_steps)
    r.scheduler, r.num_epochs = create_scheduler_v2(r.optimizer, **train.scheduler, updates_per_epoch=updates_per_epoch)

    r.state = RunState(fingerprint=fingerprint(config, accelerator, task.method, r.pipeline))
    if r.resume_from:
        path, saved = load_first(accelerator, r.resume_from, r.scheduler)
        r.state = RunState.from_json(saved)
        if accelerator.process_index > 0:  # the saved loss sums are all processes' (see checkpoint): count them once
            r.state.epoch_sums = [0.0] * len(r.state.epoch_sums)
        _logger.info(f'Resumed from {path}: epoch {r.state.epoch}, step {r.state.step_in_epoch}.')
    elif r.cache is not None and r.cache.manifest.get('teacher_metrics'):  # measured by the run that wrote it
        r.state.teacher = r.cache.manifest['teacher_metrics']
    elif task.teacher is not None and task.teacher_classes == r.data.num_classes:
        task.eval()
        r.state.teacher = evaluate(accelerator, task.teacher_logits, r.eval_loader, train.channels_last,
                                   r.pipeline.eval_stage, sharded=r.pipeline.kind == 'stream')
        _logger.info(f"Teacher on '{r.data.eval_split}': top-1 {r.state.teacher['top1']:.2f}%, "
                     f"top-5 {r.state.teacher['top5']:.2f}% (with the student's eval preprocessing)")


def checkpoint(r: Run, state: RunState) -> None:
    """Save a checkpoint; the first one also lets go of a run replaced with --overwrite.

    Mid-epoch, a streaming run also records where each process's stream goes on (``StreamLoader.position``).
    """
    accelerator, preemption, started = r.accelerator, r.preemption, time.perf_counter()
    if preemption is not None:  # a signal now is only noted: the save completes (it is atomic either way)
        preemption.saving = True
    state.stream = None
    if r.pipeline.kind == 'stream' and state.step_in_epoch:
        positions = [r.train_loader.position]
        state.stream = gather_object(positions) if accelerator.num_processes > 1 else positions
    snapshot = state.to_json()
    if accelerator.num_processes > 1 and state.step_in_epoch:  # the epoch's loss sums of all processes so far
        sums = torch.as_tensor(snapshot['epoch_sums'], dtype=torch.float64, device=accelerator.device)
        snapshot['epoch_sums'] = accelerator.reduce(sums, reduction='sum').tolist()
    save_checkpoint(accelerator, r.output, snapshot, r.scheduler, r.config.output.keep_checkpoints)
    if r.accelerator.is_main_process:
        settle_overwrite(r.output, keep_new=True)
    if preemption is not None:
        preemption.saving, preemption.saved_step = False, state.global_step
        preemption.save_seconds = time.perf_counter() - started


def stop_here(r: Run, state: RunState, agree: bool) -> None:
    """Save a checkpoint at this step boundary (unless one was just saved here) and raise ``Preempted``.

    Args:
        agree: The processes have not agreed yet (the end of an epoch): reduce the flag first and return when no
            process wants to stop. Within an epoch, the step's sync has agreed already.
    """
    preemption, accelerator = r.preemption, r.accelerator
    if agree:
        preemption.restart_clock()  # the evaluation and the save are not a step
        wants = preemption.wants_stop(last=False)
        if accelerator.num_processes > 1:
            flag = torch.tensor(int(wants), device=accelerator.device)
            wants = accelerator.reduce(flag, reduction='max').item() > 0
        if not wants:
            return
    _logger.info(f'Stopping at epoch {state.epoch} step {state.step_in_epoch} '
                 f'({preemption.requested or "another process asked"}).')
    if preemption.saved_step != state.global_step:
        checkpoint(r, state)
    preemption.stopped = True
    raise Preempted(state.epoch, state.step_in_epoch, preemption.requested or 'another process')


def fit(r: Run, argv: Optional[List[str]]) -> dict:
    """The epoch loop from the current state, then the student folder (and the Hub push)."""
    config, accelerator, task, state = r.config, r.accelerator, r.task, r.state
    train, out, every = config.train, config.output, config.output.checkpoint_steps

    def step_checkpoint(current: RunState) -> None:
        # every N optimizer updates, so never in the middle of a gradient accumulation cycle
        if every and accelerator.sync_gradients and current.num_updates % every == 0:
            checkpoint(r, current)

    last = state.history[-1] if state.history else {}
    epoch_seconds = []  # wall time of each epoch this process ran (train + eval), for the log and benchmarks
    preemption = r.preemption
    wants_stop = None
    if preemption is not None:  # bytes a checkpoint holds, for the time limit until a save is timed (x3: moments)
        state_bytes = 3 * sum(t.numel() * t.element_size() for t in task.trainable_module.state_dict().values())
        wants_stop = lambda next_is_last: preemption.wants_stop(next_is_last, state_bytes)  # noqa: E731
    for epoch in range(state.epoch, r.num_epochs):
        started = time.perf_counter()
        state.epoch = epoch
        r.train_loader.set_epoch(epoch)
        r.train_loader.dataset.set_epoch(epoch)
        loader = r.train_loader
        if state.step_in_epoch and r.pipeline.kind == 'stream':
            loader.resume_from(state.stream[accelerator.process_index])
        elif state.step_in_epoch:
            loader = accelerator.skip_first_batches(r.train_loader, state.step_in_epoch)
        # this epoch runs the teacher and records it, unless it is cached (or another run is computing it: waited for)
        recording = r.cache is not None and acquire_epoch(r.cache, epoch, accelerator) == 'record'
        if preemption is not None:
            preemption.restart_clock()
        try:
            train_metrics = train_one_epoch(accelerator, task, loader, r.optimizer, r.scheduler, state, train.loop,
                                            r.mixup_fn, on_step=step_checkpoint, prepare=r.pipeline.train_stage,
                                            model_ema=r.model_ema, select=task.teacher.select if r.cache else None,
                                            wants_stop=wants_stop)
        except Preempted:  # every process finished the step and agreed: checkpoint here
            stop_here(r, state, agree=False)
        evaluated = time.perf_counter()
        if recording:
            finish_cache_epoch(r.cache, task.teacher, r.pipeline, epoch, accelerator,
                               config.data.eval_batch_size, config.data.workers, state.teacher)
        if accelerator.num_processes > 1 and train.dist_bn in ('reduce', 'broadcast'):
            distribute_bn(task.student, accelerator.num_processes, reduce=train.dist_bn == 'reduce')
        task.eval()
        sharded = r.pipeline.kind == 'stream'
        metrics = evaluate(accelerator, task.get_eval_model(), r.eval_loader, train.channels_last,
                           r.pipeline.eval_stage, sharded)
        ema_metrics = {}
        if r.model_ema is not None:
            ema_metrics = evaluate(accelerator, r.model_ema.module, r.eval_loader, train.channels_last,
                                   r.pipeline.eval_stage, sharded)
            ema_metrics = {'eval_ema_top1': ema_metrics['top1'], 'eval_ema_top5': ema_metrics['top5']}
        r.scheduler.step(epoch + 1, metrics['top1'])
        if preemption is not None:
            preemption.eval_seconds = time.perf_counter() - evaluated
        epoch_seconds.append(time.perf_counter() - started)
        state.seconds += epoch_seconds[-1]  # over resumes too
        last = {'epoch': epoch, **{f'train_{k}': v for k, v in train_metrics.items() if k != 'lr'},
                **{f'eval_{k}': v for k, v in metrics.items()}, **ema_metrics, 'lr': train_metrics['lr']}
        state.history.append(last)
        if out.log_with:  # the summary.csv row, as epoch/<column>
            accelerator.log({f'epoch/{k}': v for k, v in {**last, 'seconds': epoch_seconds[-1]}.items()},
                            step=state.global_step)
        _logger.info(f"Epoch {epoch}: loss {train_metrics['loss']:.4f} (ce {train_metrics['loss_ce']:.4f}, "
                     f"kd {train_metrics['loss_kd']:.4f}, icd {train_metrics['loss_icd']:.4f}, tau "
                     f"{train_metrics['tau']:.3f}), eval top-1 {metrics['top1']:.2f}%, top-5 "
                     f"{metrics['top5']:.2f}% on {metrics['count']} images"
                     + (f"; EMA top-1 {ema_metrics['eval_ema_top1']:.2f}%" if ema_metrics else '')
                     + f" ({epoch_seconds[-1]:.1f}s)")
        if state.best_top1 is None or metrics['top1'] > state.best_top1:
            state.best_top1, state.best_epoch = metrics['top1'], epoch
            if out.save_best and accelerator.is_main_process:
                save_student(task.student, r.output / 'student_best', r.data_config, r.data.label_names,
                             run_record(r, argv, last))
        state.end_epoch()
        checkpoint(r, state)
        if preemption is not None and epoch + 1 < r.num_epochs:  # a signal during the evaluation or the save
            stop_here(r, state, agree=True)
        if accelerator.is_main_process:
            if epoch + 1 < r.num_epochs:
                write_text_atomic(r.output / 'summary.csv', _summary_csv(state.history))
            plot_run(state.history, r.output / CURVES, f'{config.model.student} ({task.method})')

    if r.pipeline.kind == 'stream' and config.data.skip_bad_images:  # what the streams skipped (last epoch, eval)
        counts = torch.tensor([r.train_loader.skipped, r.eval_loader.skipped], device=accelerator.device)
        counts = (accelerator.reduce(counts, reduction='sum') if accelerator.num_processes > 1 else counts).tolist()
        r.data.skipped_images = {'train': int(counts[0]), 'eval': int(counts[1])}
    result = {'output': str(r.output), 'student': str(r.output / 'student'), 'method': task.method,
              'teacher': state.teacher, 'top1': last.get('eval_top1'), 'top5': last.get('eval_top5'),
              'best_top1': state.best_top1, 'best_epoch': state.best_epoch, 'epochs': r.num_epochs,
              'model': task.student, 'epoch_seconds': epoch_seconds, 'input_pipeline': r.pipeline.kind,
              'teacher_model': getattr(task.teacher, 'model', None)}
    if accelerator.is_main_process:
        write_text_atomic(r.output / 'summary.csv', _summary_csv(state.history))  # also after a resume at the end
        save_student(task.student, r.output / 'student', r.data_config, r.data.label_names, run_record(r, argv, last))
        if r.model_ema is not None:  # the ICD heads are not part of it: the EMA holds the bare student only
            save_student(r.model_ema.module, r.output / 'student_ema', r.data_config, r.data.label_names,
                         run_record(r, argv, last, ema=True))
    accelerator.wait_for_everyone()
    if out.push_to_hub and accelerator.is_main_process:  # after the barrier: the others need not wait for it
        folder = r.output / ('student_ema' if out.push_ema else 'student')
        result['hub_url'] = push_student(folder, out.push_to_hub, private=out.hub_private,
                                         revision=out.hub_revision, collection=out.hub_collection,
                                         license=out.hub_license)
    return result


def teacher_fine_tuner(config: RunConfig, accelerator: Accelerator) -> Callable[[Path, Path], dict]:
    """``--teacher-adapt finetune``'s training: the teacher from its linear-probe folder trained as a ``--method
    vanilla`` student with the run's data, optimizer, schedule and augmentation, for ``--teacher-adapt-epochs`` at
    ``--teacher-adapt-lr``, in its own run folder (resumed where a killed run left it), at the teacher's own input
    size and normalisation; the Accelerator is cleared of it afterwards, so the distillation's checkpoints hold the
    student alone. Its config is the run's with those flags changed (``RunConfig.with_flags``)."""
    def fine_tune(start_folder: Path, output: Path) -> dict:
        settings = {
            'student': f'local-dir:{start_folder}', 'pretrained': True, 'student_checkpoint': None,
            'method': 'vanilla', 'epochs': config.model.teacher_adapt_epochs,
            'lr': config.model.teacher_adapt_lr or config.train.lr / 10,
            'output': str(output), 'experiment': '', 'resume': 'auto', 'overwrite': False, 'teacher_cache': None,
            'input_size': None, 'mean': None, 'std': None, 'interpolation': '', 'crop_pct': None,
            'drop': 0.0, 'drop_path': None, 'model_ema': False, 'save_best': False, 'push_to_hub': None,
            'hub_collection': None, 'log_with': None, 'teacher_adapt': 'off', 'task_loss_weight': None,
            'kd_loss_weight': None, 'icd_loss_weight': None}
        sub = config.with_flags(**settings)
        _logger.info(f'Fine-tuning the teacher: {sub.train.epochs} epochs at lr {sub.train.lr:g} into {output}.')
        r = build(sub, accelerator)
        try:
            start(r)
            result = fit(r, None)
        finally:
            r.task.remove_hooks()
            accelerator.free_memory()
        return {'folder': str(output / 'student'), 'epochs': sub.train.epochs, 'lr': sub.train.lr,
                'top1': result['top1'],
                'top5': result['top5'], 'seconds': round(r.state.seconds, 3)}
    return fine_tune


def join_restarted_group() -> None:
    """After an elastic restart, create the process group under a store prefix of its own attempt.

    The launcher's agent keeps its store across restarts and torch adds no per-attempt prefix to the keys its
    process group exchanges addresses through, so a restarted worker can read the dead attempt's addresses (seen
    here: one 2-process CPU restart in three failed in gloo's connectFullMesh, "Connection refused"). Accelerate
    keeps a group that already exists.
    """
    restart = int(os.environ.get('TORCHELASTIC_RESTART_COUNT', '0'))
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if restart == 0 or world < 2 or dist.is_initialized() or os.environ.get('TORCHELASTIC_USE_AGENT_STORE') != 'True':
        return
    store = dist.TCPStore(os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT']), is_master=False)
    cpu = os.environ.get('ACCELERATE_USE_CPU', '').lower() in ('1', 'true', 'yes') or not torch.cuda.is_available()
    dist.init_process_group('gloo' if cpu else 'nccl', store=dist.PrefixStore(f'timm_icd/attempt-{restart}', store),
                            rank=int(os.environ['RANK']), world_size=world)


def create_accelerator(config: RunConfig) -> Accelerator:
    """The run's Accelerator, logging set up on every process, the watchdog started and the seed set."""
    join_restarted_group()
    accelerator = Accelerator(
        mixed_precision=config.train.mixed_precision, gradient_accumulation_steps=config.data.grad_accum_steps,
        log_with=config.output.log_with,
        # trackers write into the run folder, which is settled later (start() sets the final logging_dir)
        project_config=ProjectConfiguration(logging_dir=str(Path(config.output.output or 'output') / 'logs')),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.data.seed,
                                                  non_blocking=torch.cuda.is_available()))
    start_watchdog(accelerator)  # multi-process runs: a dead peer stops the others at once, with one line
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format='%(message)s', force=True)
    logging.getLogger('accelerate').setLevel(logging.WARNING)  # one INFO line per checkpoint file otherwise
    set_seed(config.train.seed)
    return accelerator


def run(config: RunConfigOrFlags, argv: Optional[List[str]] = None) -> dict:
    """Train a student as ``config`` says (a ``RunConfig``, or the flags ``parse_and_validate`` returns; see
    train_icd.py --help) and return its results and the model.

    Every check runs before the run folder changes. If the run fails before its first checkpoint, a run it was
    replacing with --overwrite is put back.
    """
    config = run_config(config)
    preemption, train = None, config.train
    if train.preempt_signal != 'none' or train.time_limit != 'none':  # before the watchdog: SIGTERM is then ours
        deadline = job_deadline(parse_time_limit(train.time_limit) if train.time_limit else None,
                                use_slurm=train.time_limit != 'none')
        preemption = Preemption(parse_signals(train.preempt_signal), deadline).install()
    try:
        return _run(config, argv, preemption)
    finally:
        if preemption is not None:
            preemption.uninstall()


def _run(config: RunConfig, argv: Optional[List[str]], preemption: Optional[Preemption]) -> dict:
    accelerator = create_accelerator(config)
    started = time.time()
    if accelerator.num_processes > 1:
        _logger.info(f'Training on {accelerator.num_processes} processes ({accelerator.distributed_type}).')
    r = build(config, accelerator, finetune=teacher_fine_tuner(config, accelerator))
    r.preemption = preemption
    try:
        start(r)
        result = fit(r, argv)
    except BaseException as e:
        if isinstance(e, Preempted):  # a checkpoint holds it all: end the trackers as a finished run does
            accelerator.end_training()
        if accelerator.is_main_process:
            settle_overwrite(r.output, keep_new=False)
        if isinstance(e, UserError) and accelerator.process_index > 0:
            e.rank = accelerator.process_index  # may be this process's alone (e.g. a bad image in its shard)
        raise
    finally:
        release_claims(r.cache)  # an epoch this run stopped computing: other runs need not wait for it
        r.task.remove_hooks()
    result['seconds'] = time.time() - started
    accelerator.end_training()
    return result
