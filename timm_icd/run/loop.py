"""One training epoch and one evaluation pass, on Accelerate.

The step keeps to one host sync (the finite-loss check that decides whether to apply the update); loss meters stay
on the device until they are logged.
"""
import logging
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..base import UserError
from ..data import batch_seed
from ..distill import DistillationTask
from ..teacher_cache import sample_indices
from .events import emit
from .preempt import Preempted
from .state import LOSS_PARTS, RunState

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopConfig:
    """How ``train_one_epoch`` runs a step (timm train.py's flags of the same names).

    Attributes:
        data_seed: Seed of the batch-level draws (Mixup/CutMix).
        channels_last: Feed the batch in channels_last memory layout.
        clip_grad: Clip the gradient norm to this (None: off).
        skip_nonfinite: Steps with a NaN/Inf loss to skip before the run stops.
        log_interval: Steps between progress updates (and tracker logs).
        log_to_trackers: Log step metrics to Accelerate's trackers.
    """
    data_seed: int = 0
    channels_last: bool = False
    clip_grad: Optional[float] = None
    skip_nonfinite: int = 0
    log_interval: int = 20
    log_to_trackers: bool = False


class NonFiniteLoss(UserError):
    """The loss became NaN or Inf more often than --skip-nonfinite allows."""


def _agree(accelerator, loss: torch.Tensor, stop: bool) -> Tuple[bool, bool]:
    """Whether the loss is finite on every process (they must agree to step or to skip), and whether any process
    asks to stop (``preempt``). The step's one sync: one reduce of one small tensor, one host read."""
    flags = torch.stack([torch.isfinite(loss.detach()).to(torch.int32),
                         torch.tensor(int(stop), dtype=torch.int32, device=loss.device)])
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, reduction='sum')
    finite, stops = flags.tolist()
    return finite == accelerator.num_processes, stops > 0


def _skip_nonfinite(state: RunState, out: Dict[str, torch.Tensor], allowed: int) -> None:
    """Count a non-finite step; stop the run, naming the step and the loss parts, past ``allowed`` of them."""
    state.nonfinite_steps += 1
    parts = ', '.join(f'{k}={out[k].item():.4g}' for k in LOSS_PARTS if k != 'tau' and k in out)
    if state.nonfinite_steps > allowed:
        raise NonFiniteLoss(
            f"non-finite loss at epoch {state.epoch} step {state.step_in_epoch} (global step "
            f"{state.global_step}): {parts}; lower --lr, add --clip-grad, or allow skips with --skip-nonfinite N. "
            f"No checkpoint was written from this state.")
    _logger.warning(f"Skipped step {state.global_step} with a non-finite loss ({parts}); "
                    f"{state.nonfinite_steps} of {allowed} allowed skips used.")


def train_one_epoch(
        accelerator,
        task: DistillationTask,
        loader,
        optimizer,
        scheduler,
        state: RunState,
        config: LoopConfig = LoopConfig(),
        mixup_fn: Optional[Callable] = None,
        on_step: Optional[Callable[[RunState], None]] = None,
        prepare: Optional[Callable] = None,
        model_ema=None,
        select: Optional[Callable] = None,
        wants_stop: Optional[Callable[[bool], bool]] = None,
) -> Dict[str, float]:
    """Train for the rest of epoch ``state.epoch``, starting after ``state.step_in_epoch`` batches.

    Works with any task that satisfies ``DistillationTask``; loss parts a task does not return are logged as 0.

    Args:
        state: Run state, updated in place (step counters, loss sums, non-finite count).
        config: How a step runs (``LoopConfig``).
        on_step: Called after every batch but the epoch's last (e.g. to write step checkpoints).
        prepare: The device stage that turns a loader batch into ``(x, y)`` (``pipeline.InputStage``); None when the
            loader yields normalised ``(x, y)`` itself.
        model_ema: A timm ``ModelEmaV3`` of the task's student, updated after every optimizer update.
        select: Told (epoch, the batch's dataset rows) before each step (``CachedTeacher.select``).
        wants_stop: Asked once per step whether this process wants to stop (``Preemption.wants_stop``; its
            argument says whether the next step is the epoch's last). When any process does, every process
            finishes the step, reaches the next optimizer update (never stopping inside an accumulation cycle),
            calls ``on_step`` and raises ``Preempted``; the epoch's last step never stops (the epoch's checkpoint
            follows it).

    Returns:
        Mean of each loss part over the epoch's applied steps, and the last learning rate.
    """
    task.train()
    set_epoch = getattr(task, 'set_epoch', None)  # timm's own tasks (in the benchmarks) have none
    if set_epoch is not None:
        set_epoch(state.epoch)
    module, seed = task.trainable_module, config.data_seed
    sums = torch.tensor(state.epoch_sums, dtype=torch.float64, device=accelerator.device)
    zero, one = torch.zeros((), device=accelerator.device), torch.ones((), device=accelerator.device)
    total = len(loader) + state.step_in_epoch
    stopping = False
    # a bar on the main process's terminal only (disable=None: off when stderr is not a terminal, e.g. in logs)
    log_mark = (time.perf_counter(), state.global_step)  # (time, step) of the last tracker log
    bar = tqdm(total=total, initial=state.step_in_epoch, desc=f'epoch {state.epoch}', leave=False,
               disable=None if accelerator.is_local_main_process else True, dynamic_ncols=True)
    try:
        for batch in loader:
            if select is not None:
                select(state.epoch, sample_indices(batch))
            x, y = batch if prepare is None else prepare(
                batch, state.epoch, state.step_in_epoch, accelerator.process_index)
            if config.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if mixup_fn is not None:
                np.random.seed(batch_seed(seed, state.epoch, state.step_in_epoch, accelerator.process_index))
                x, y = mixup_fn(x, y)
            with accelerator.accumulate(module):
                with accelerator.autocast():
                    out = task(x, y)
                accelerator.backward(out['loss'])
                emit('step')
                asks = wants_stop is not None and not stopping and wants_stop(state.step_in_epoch + 2 == total)
                finite, agreed = _agree(accelerator, out['loss'], asks)
                stopping = stopping or agreed
                if finite:
                    if config.clip_grad is not None and accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(module.parameters(), config.clip_grad)
                    optimizer.step()
                    optimizer.zero_grad()
                    parts = [out[k].detach().float() if k in out else zero for k in LOSS_PARTS]
                    sums += torch.stack(parts + [one]).double()
                else:
                    module.zero_grad(set_to_none=True)  # also mid-accumulation, where optimizer.zero_grad() waits
                    _skip_nonfinite(state, out, config.skip_nonfinite)
            if accelerator.sync_gradients:
                state.num_updates += 1
                scheduler.step_update(num_updates=state.num_updates)
                if model_ema is not None:
                    model_ema.update(task.student, step=state.num_updates)
            state.global_step += 1
            state.step_in_epoch += 1
            state.epoch_sums = sums  # a device tensor until it is logged or checkpointed
            bar.update(1)
            if state.step_in_epoch % config.log_interval == 0:  # the only other host sync: every log_interval
                means = (sums[:-1] / sums[-1].clamp(min=1)).tolist()
                lr = optimizer.param_groups[0]['lr']
                bar.set_postfix(loss=f'{means[0]:.4f}', lr=f'{lr:.3g}')
                if config.log_to_trackers:  # running means over the epoch so far, as the bar shows
                    now = time.perf_counter()
                    images = (state.global_step - log_mark[1]) * x.shape[0] * accelerator.num_processes
                    accelerator.log({**{f'step/{k}': v for k, v in zip(LOSS_PARTS, means)}, 'step/lr': lr,
                                     'step/images_per_second': images / max(now - log_mark[0], 1e-9)},
                                    step=state.global_step)
                    log_mark = (now, state.global_step)
            if on_step is not None and state.step_in_epoch < total:
                on_step(state)
            if stopping and accelerator.sync_gradients and state.step_in_epoch < total:
                raise Preempted(state.epoch, state.step_in_epoch, 'stop requested')
    finally:
        bar.close()  # before any error is printed, so the error gets a line of its own
    sums = accelerator.reduce(sums, reduction='sum') if accelerator.num_processes > 1 else sums
    values = sums.tolist()
    count = max(values[-1], 1.0)
    metrics = {k: v / count for k, v in zip(LOSS_PARTS, values[:-1])}
    metrics['lr'] = optimizer.param_groups[0]['lr']
    return metrics


@torch.no_grad()
def evaluate(accelerator, model_fn: Callable, loader, channels_last: bool = False,
             prepare: Optional[Callable] = None, sharded: bool = False) -> Dict[str, float]:
    """Top-1 / top-5 (%) and CE loss of ``model_fn`` (in eval mode) over the eval split, each sample counted once.

    ``gather_for_metrics`` drops the samples Accelerate repeats to even out the last batch across processes. A
    ``sharded`` loader (a stream) gives each process its own samples, in however many batches: the counts are summed
    across processes once, at the end. Counts stay on the device until the end.
    """
    totals = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # top-1, top-5, loss sum, count
    for batch_index, batch in enumerate(loader):
        x, y = batch if prepare is None else prepare(batch)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with accelerator.autocast():
            logits = model_fn(x)
        logits = logits.float()
        if not sharded:
            logits, y = accelerator.gather_for_metrics((logits, y))
        if batch_index == 0:
            emit('eval')
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(y[:, None])
        totals += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(),
                               F.cross_entropy(logits, y, reduction='sum'), totals.new_tensor(y.numel())]).double()
    if sharded and accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, reduction='sum')
    correct1, correct5, loss_sum, count = totals.tolist()
    return {'top1': 100.0 * correct1 / count, 'top5': 100.0 * correct5 / count, 'loss': loss_sum / count,
            'count': int(count)}
