"""Write a teacher cache ahead of the training runs that will read it (``python -m timm_icd cache``).

The cache is valid for the data settings the training runs will use: the same --dataset, --data-seed (default
--seed), --input-size, augmentation flags and input pipeline; so it is built from the same flags, by the same
``build`` a run uses, and every epoch such a run trains is computed and stored. Under ``accelerate launch`` every
process writes its share of the rows. Epochs other runs are computing are left to them first and waited for last, so
writers started together on one folder share the epochs.
"""
import torch
from timm.scheduler import create_scheduler_v2

from ..base import UserError
from ..teacher_cache import acquire_epoch, finish_epoch, release_claims
from .build import build
from .config import RunConfigOrFlags, run_config
from .loop import evaluate
from .train import create_accelerator, teacher_fine_tuner


def write_ahead(config: RunConfigOrFlags) -> dict:
    """Write the cache for ``config`` (a ``RunConfig`` or the parsed flags: every epoch a run with these settings
    trains), using every process."""
    config = run_config(config)
    accelerator = create_accelerator(config)
    r = build(config, accelerator, finetune=teacher_fine_tuner(config, accelerator))
    if r.cache is None:
        raise UserError(f'--method {config.method.method} uses no teacher outputs to cache.')
    r.task.to(accelerator.device)
    r.pipeline.to(accelerator.device)
    r.task.eval()
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.train.lr)
    _, epochs = create_scheduler_v2(optimizer, **config.train.scheduler, updates_per_epoch=1)
    metrics = r.cache.manifest.get('teacher_metrics')
    if metrics is None and r.task.teacher_classes == r.data.num_classes:
        metrics = evaluate(accelerator, r.task.teacher_logits, accelerator.prepare(r.eval_loader), False,
                           r.pipeline.eval_stage)
    rows, busy = 0, []
    try:
        for epoch in [*range(epochs), None]:  # None: now wait for the epochs other writers were computing
            for e in (busy if epoch is None else [epoch]):
                got = acquire_epoch(r.cache, e, accelerator, wait=epoch is None)
                if got == 'busy':
                    busy.append(e)
                elif got == 'record':
                    rows += finish_epoch(r.cache, r.task.teacher, r.pipeline, e, accelerator,
                                         config.data.eval_batch_size, config.data.workers, metrics)
    finally:
        release_claims(r.cache)
        r.task.remove_hooks()
    return {'epochs': epochs, 'rows_written': rows, 'cache': r.cache}
