"""Teacher cache in a run: open or start it, record epochs, and ``python -m timm_icd.cache`` to write one ahead.

    python -m timm_icd.cache TEACHER --teacher-cache DIR --dataset ... --epochs E [train_icd.py's data flags]
    accelerate launch -m timm_icd.cache TEACHER ...      # every process writes its share of the rows

The cache is valid for the data settings the training runs will use: the same --dataset, --data-seed (default
--seed), --input-size, augmentation flags and input pipeline. What it holds and how: ``teacher_cache.py``.
"""
import json
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

import torch

from .errors import UserError
from .teacher_cache import (
    AUGMENT_FLAGS, MANIFEST, CachedTeacher, TeacherCache, dataset_fingerprint, sample_indices, weights_hash)

_logger = logging.getLogger(__name__)


def open_for_run(args, data, data_config: dict, pipeline_kind: str, teacher, accelerator) -> TeacherCache:
    """The run's cache (``args.teacher_cache``), opened if valid for its settings (else refused), or started."""
    from .config import data_seed
    if accelerator.num_processes > int(os.environ.get('LOCAL_WORLD_SIZE', accelerator.num_processes)):
        manifest = Path(args.teacher_cache) / MANIFEST
        if not manifest.exists() or len(json.loads(manifest.read_text())['epochs']) < args.epochs:
            raise UserError('a --teacher-cache is written by the processes of one machine (they share its memory '
                            'maps): write it first with python -m timm_icd.cache on one machine, then train on many.')
    valid_for = {
        'teacher_weights': weights_hash(teacher.model), 'teacher_layer': teacher.layer,
        'teacher_input_size': list(teacher.input_size or data_config['input_size']),
        'teacher_dtype': args.teacher_dtype, 'mixed_precision': args.mixed_precision,
        'dataset': data.name, 'train_split': data.train_split,
        'dataset_fingerprint': dataset_fingerprint(data.train, data.image_column, data.label_column),
        'data_seed': data_seed(args), 'input_pipeline': pipeline_kind, 'input_size': list(data_config['input_size']),
        **{flag: getattr(args, flag) for flag in AUGMENT_FLAGS},
    }
    valid_for = json.loads(json.dumps(valid_for))  # tuples as lists, as the manifest stores them
    storage = {'features': args.cache_features, 'topk': args.cache_topk}
    probe = teacher.live if isinstance(teacher, CachedTeacher) else teacher
    if args.cache_topk >= probe.num_classes:
        raise UserError(f'--cache-topk {args.cache_topk} must be below the teacher\'s {probe.num_classes} classes '
                        f'(or left out, to store all logits).')
    if args.cache_topk and args.cache_topk * 8 + 4 >= 2 * probe.num_classes:
        _logger.warning(f'--cache-topk {args.cache_topk} stores {args.cache_topk * 8 + 4} bytes per row, all '
                        f'{probe.num_classes} logits would take {2 * probe.num_classes}: leave it out.')
    feature_dim = _feature_dim(probe, data_config)
    with accelerator.main_process_first():
        cache = TeacherCache.create_or_open(Path(args.teacher_cache), valid_for, storage, data.train_rows,
                                            feature_dim, probe.num_classes, accelerator.is_main_process)
    cache.manifest.setdefault('teacher_name', args.teacher)
    done = len([e for e in range(args.epochs) if cache.complete(e)])
    _logger.info(f'Teacher cache {args.teacher_cache}: {done} of the run\'s {args.epochs} epochs cached'
                 + (f'; the teacher runs for the other {args.epochs - done} and records them' if done < args.epochs
                    else '; the teacher never runs') + f' ({cache.bytes_per_row()} bytes per row, '
                 f'{cache.bytes_per_row() * cache.rows / 2 ** 20:.2f} MiB per epoch).')
    return cache


def _feature_dim(teacher, data_config: dict) -> int:
    from .hooks import probe_feature_dim
    return probe_feature_dim(teacher.model, teacher.input_size or data_config['input_size'], teacher.layer,
                             role='teacher')


@torch.no_grad()
def fill_missing(cache: TeacherCache, teacher, pipeline, epoch: int, accelerator, batch_size: int,
                 workers: int = 0) -> int:
    """Compute and store the rows of ``epoch`` no training batch wrote (the last partial batch the loader drops, or
    every row for ``python -m timm_icd.cache``), split across the processes. Returns this process's row count."""
    live = teacher.live if isinstance(teacher, CachedTeacher) else teacher
    rows = cache.missing(epoch)[accelerator.process_index::accelerator.num_processes]
    dataset = pipeline.train_loader.dataset
    dataset.set_epoch(epoch)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, rows.tolist()), batch_size=batch_size,
                                         num_workers=workers if pipeline.kind == 'loader' else 0)
    for batch in loader:
        batch = [t.to(accelerator.device) for t in batch]
        x, _ = pipeline.train_stage(batch, epoch)
        with accelerator.autocast():
            logits, features = live(live.prepare_input(x))
        cache.write(epoch, sample_indices(batch), logits, features)
    return len(rows)


def finish_epoch(cache: TeacherCache, teacher, pipeline, epoch: int, accelerator, batch_size: int, workers: int = 0,
                 teacher_metrics: Optional[dict] = None) -> int:
    """After an epoch that ran the teacher: fill its missing rows, flush, and mark it complete on every process.
    Returns the rows this process filled."""
    accelerator.wait_for_everyone()  # every process's training rows are in
    rows = fill_missing(cache, teacher, pipeline, epoch, accelerator, batch_size, workers)
    cache.finish_epoch(epoch, is_main=False)  # flush this process's rows
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        cache.finish_epoch(epoch, is_main=True, teacher_metrics=teacher_metrics)
    accelerator.wait_for_everyone()
    cache.reload()
    return rows


def write_ahead(args) -> dict:
    """Write the cache for ``args`` (every epoch a run with these settings trains), using every process."""
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs
    from .engine import evaluate
    from .train import build, create_accelerator
    accelerator = create_accelerator(args)
    r = build(args, accelerator)
    if r.cache is None:
        raise UserError(f'--method {args.method} uses no teacher outputs to cache.')
    r.task.to(accelerator.device)
    r.pipeline.to(accelerator.device)
    r.task.eval()
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
    _, epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args), updates_per_epoch=1)
    metrics = r.cache.manifest.get('teacher_metrics')
    if metrics is None and r.task.teacher.num_classes == r.data.num_classes:
        metrics = evaluate(accelerator, r.task.teacher_logits, accelerator.prepare(r.eval_loader), False,
                           r.pipeline.eval_stage)
    rows = 0
    for epoch in range(epochs):
        if r.cache.complete(epoch):
            continue
        r.cache.prepare_epoch(epoch, accelerator.is_main_process)
        accelerator.wait_for_everyone()
        rows += finish_epoch(r.cache, r.task.teacher, r.pipeline, epoch, accelerator,
                             args.validation_batch_size or args.batch_size, args.workers, metrics)
    r.task.remove_hooks()
    return {'epochs': epochs, 'rows_written': rows, 'cache': r.cache}


def main(argv: Optional[List[str]] = None) -> int:
    from .cli import error_line
    from .config import parse_and_validate
    argv = sys.argv[1:] if argv is None else argv
    if argv and not argv[0].startswith('-'):  # the teacher, positionally
        argv = ['--teacher', *argv]
    try:
        args = parse_and_validate(argv)
        if not args.teacher_cache:
            raise UserError('name the cache folder with --teacher-cache DIR.')
        result = write_ahead(args)
    except UserError as e:
        if int(os.environ.get('RANK', '0')) == 0:
            print(f'error: {error_line(e)}', file=sys.stderr)
        return 2
    if int(os.environ.get('RANK', '0')) == 0:
        cache = result['cache']
        print(f"done: {args.teacher_cache} holds epochs {cache.manifest['epochs']} of {cache.rows} rows "
              f"({cache.bytes_per_row()} bytes per row, {cache.bytes_per_row() * cache.rows / 2 ** 20:.1f} MiB "
              f"per epoch)")
    return 0


if __name__ == '__main__':
    sys.exit(main())
