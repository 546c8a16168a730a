"""The teacher cache in a run: open (or start) it for the run's settings, and complete the epochs the teacher ran.

``python -m timm_icd cache`` writes a cache ahead (``run/cache_writer.py``); what the cache holds and how:
``storage.py``.
"""
import json
import logging
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from ..base import UserError
from ..data import AugmentConfig, ImageData, Pipeline
from ..distill import ICDTeacher, probe_feature_dim
from .claims import describe
from .integrity import check_epoch, drop_epoch, read_manifest
from .storage import MANIFEST, CachedTeacher, TeacherCache, dataset_fingerprint, sample_indices, weights_hash

_logger = logging.getLogger(__name__)

POLL_S = 1.0  # how often a run waiting for another run's epoch looks again


def open_for_run(
        root: str,
        teacher: ICDTeacher,
        data: ImageData,
        data_config: dict,
        accelerator: Accelerator,
        augment: AugmentConfig,
        pipeline_kind: str,
        data_seed: int,
        epochs: int,
        teacher_name: str,
        teacher_dtype: str = 'float32',
        mixed_precision: str = 'no',
        features: str = 'fp16',
        topk: int = 0,
        views: Optional[dict] = None,
) -> TeacherCache:
    """The run's cache at ``root``, opened if valid for its settings (else refused in one line), or started.

    Args:
        root: The cache folder (``--teacher-cache``).
        teacher: The live teacher whose outputs are cached.
        data, data_config: The run's data and the student's data config.
        accelerator: The run's Accelerator (processes, main-process-first).
        augment, pipeline_kind, data_seed: What decides each sample's view (the cache is keyed on them).
        epochs: The run's epochs (a multi-machine run needs them all cached).
        teacher_name: As given (``--teacher``), for the manifest.
        teacher_dtype, mixed_precision: How the teacher runs (``--teacher-dtype``, ``--mixed-precision``).
        features, topk: Storage (``--cache-features``, ``--cache-topk``).
        views: The pipeline's other settings that decide each sample's view (``Pipeline.views``: the decode scale
            and where the colour jitter runs); the cache is keyed on them too.
    """
    if accelerator.num_processes > int(os.environ.get('LOCAL_WORLD_SIZE', accelerator.num_processes)):
        manifest = Path(root) / MANIFEST
        if not manifest.exists() or len(json.loads(manifest.read_text())['epochs']) < epochs:
            raise UserError('a --teacher-cache is written by the processes of one machine (they share its memory '
                            'maps): write it first with python -m timm_icd cache on one machine, then train on many.')
    valid_for = {
        'teacher_weights': weights_hash(teacher.model), 'teacher_layer': teacher.layer,
        'teacher_input_size': list(teacher.input_size or data_config['input_size']),
        'teacher_dtype': teacher_dtype, 'mixed_precision': mixed_precision,
        'dataset': data.name, 'train_split': data.train_split,
        'dataset_fingerprint': dataset_fingerprint(data.train, data.image_column, data.label_column),
        'data_seed': data_seed, 'input_pipeline': pipeline_kind, 'input_size': list(data_config['input_size']),
        **augment.per_sample(), **(views or {}),
    }
    valid_for = json.loads(json.dumps(valid_for))  # tuples as lists, as the manifest stores them
    storage = {'features': features, 'topk': topk}
    if topk >= teacher.num_classes:
        raise UserError(f'--cache-topk {topk} must be below the teacher\'s {teacher.num_classes} classes '
                        f'(or left out, to store all logits).')
    if topk and topk * 8 + 4 >= 2 * teacher.num_classes:
        _logger.warning(f'--cache-topk {topk} stores {topk * 8 + 4} bytes per row, all '
                        f'{teacher.num_classes} logits would take {2 * teacher.num_classes}: leave it out.')
    feature_dim = probe_feature_dim(teacher.model, teacher.input_size or data_config['input_size'], teacher.layer,
                                    role='teacher')
    with accelerator.main_process_first():  # the main process mends the manifest before the others read it
        cache = TeacherCache.create_or_open(Path(root), valid_for, storage, data.train_rows, feature_dim,
                                            teacher.num_classes, accelerator.is_main_process)
        if accelerator.is_main_process:
            for epoch in [e for e in cache.manifest['epochs'] if e < epochs]:
                reason = check_epoch(cache, epoch)
                if reason:
                    drop_epoch(cache, epoch, reason)
    cache.manifest.setdefault('teacher_name', teacher_name)
    done = len([e for e in range(epochs) if cache.complete(e)])
    _logger.info(f'Teacher cache {root}: {done} of the run\'s {epochs} epochs cached'
                 + (f'; the teacher runs for the other {epochs - done} and records them' if done < epochs
                    else '; the teacher never runs') + f' ({cache.bytes_per_row()} bytes per row, '
                 f'{cache.bytes_per_row() * cache.rows / 2 ** 20:.2f} MiB per epoch).')
    return cache


def ensure_epoch(cache: TeacherCache, epoch: int, accelerator: Accelerator) -> bool:
    """Whether the run can replay ``epoch`` from the cache: it is complete and, the first time this run uses it,
    its checksums match (else the main process drops it, and the epoch is recorded again like a new one)."""
    if cache.complete(epoch) and epoch not in cache.verified:
        damaged = [check_epoch(cache, epoch, checksum=True) if accelerator.is_main_process else None]
        if damaged[0]:
            drop_epoch(cache, epoch, damaged[0])
        if accelerator.num_processes > 1:
            broadcast_object_list(damaged)  # after the main process wrote the manifest
            if damaged[0] and not accelerator.is_main_process:
                cache.reload()
        if not damaged[0]:
            cache.verified.add(epoch)
    return cache.complete(epoch)


def acquire_epoch(cache: TeacherCache, epoch: int, accelerator: Accelerator, wait: bool = True) -> str:
    """Whether this run replays ``epoch`` ('replay') or computes and records it ('record', its files prepared), decided
    by the main process for all. An epoch another live run is computing is waited for, then replayed: the teacher
    runs once per epoch whatever the number of runs (``storage.py`` says why, with measurements); with ``wait`` False
    the answer is then 'busy'. Polls with one small broadcast per ``POLL_S``: no collective blocks for long."""
    announced = False
    while True:
        decision = [cache.claim_epoch(epoch) if accelerator.is_main_process else None]
        if accelerator.num_processes > 1:
            broadcast_object_list(decision)
            if not accelerator.is_main_process:
                cache.reload()
        if decision[0] == 'complete':
            if ensure_epoch(cache, epoch, accelerator):
                return 'replay'
            continue  # damaged and dropped: claim it
        if decision[0] == 'claimed':
            cache.prepare_epoch(epoch, accelerator.is_main_process)
            accelerator.wait_for_everyone()
            return 'record'
        if not wait:
            return 'busy'
        if not announced:
            _logger.info(f'Teacher cache {cache.root}: epoch {epoch} is being computed by another run '
                         f'({describe(decision[0])}); waiting for it.')
            announced = True
        time.sleep(POLL_S)


def release_claims(cache: Optional[TeacherCache]) -> None:
    """Give up the epochs this process claimed and did not complete (a run that stops on an error)."""
    if cache is not None:
        cache.release_claims()


def verify(root: str) -> dict:
    """Check a whole cache folder without changing it: every complete epoch's arrays and checksums, and what a run
    would compute again. Returns {'epochs': complete epochs, 'damaged': {epoch: why}, 'incomplete': [epochs]}."""
    manifest = read_manifest(Path(root))
    if manifest is None:
        raise UserError(f'{root} holds no teacher cache ({MANIFEST} is missing).')
    cache = TeacherCache(Path(root), manifest)
    damaged = {epoch: reason for epoch in manifest['epochs']
               if (reason := check_epoch(cache, epoch, checksum=True))}
    folders = sorted(int(p.name.split('-')[1]) for p in Path(root).glob('epoch-*') if p.name.split('-')[1].isdigit())
    return {'epochs': manifest['epochs'], 'damaged': damaged,
            'incomplete': [e for e in folders if e not in manifest['epochs']], 'rows': cache.rows,
            'bytes_per_row': cache.bytes_per_row()}


def rows_to_fill(cache: TeacherCache, epoch: int, process_index: int, num_processes: int) -> np.ndarray:
    """The rows of ``epoch`` that no training batch wrote and this process fills: those it owns by number
    (``row % num_processes == process_index``). Ownership by row number, not by place in the list of missing rows,
    which shrinks as other processes write theirs: a process that reads it after another has begun writing still
    gets exactly its own rows, and every row has one owner."""
    missing = cache.missing(epoch)
    return missing[missing % num_processes == process_index]


@torch.no_grad()
def fill_missing(cache: TeacherCache, teacher: CachedTeacher, pipeline: Pipeline, epoch: int,
                 accelerator: Accelerator, batch_size: int, workers: int = 0) -> int:
    """Compute and store the rows of ``epoch`` no training batch wrote (the last partial batch the loader drops, or
    every row for ``python -m timm_icd cache``), split across the processes. Returns this process's row count."""
    rows = rows_to_fill(cache, epoch, accelerator.process_index, accelerator.num_processes)
    dataset = pipeline.train_loader.dataset
    dataset.set_epoch(epoch)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, rows.tolist()), batch_size=batch_size,
                                         num_workers=workers if pipeline.kind == 'loader' else 0)
    for batch in loader:
        batch = [t.to(accelerator.device) for t in batch]
        x, _ = pipeline.train_stage(batch, epoch)
        with accelerator.autocast():
            logits, features = teacher.live(teacher.unit_input(len(x)))
        cache.write(epoch, sample_indices(batch), logits, features)
    return len(rows)


def finish_epoch(cache: TeacherCache, teacher: CachedTeacher, pipeline: Pipeline, epoch: int,
                 accelerator: Accelerator, batch_size: int, workers: int = 0,
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
