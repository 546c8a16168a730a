"""Teacher adaptation: a teacher of other classes gets a head for the dataset's classes before distillation.

``linear`` (``--teacher-adapt``, what ``auto`` does for a teacher of other classes) fits a linear probe
(``distill.probe``) on the teacher's frozen pooled features (the classifier's input, which the ICD hook reads too) of
the training split, seen through the student's eval transform re-normalised and resized for the teacher
(``ICDTeacher.prepare_input``), as CLIP's linear evaluation does: one teacher forward per training image, no
augmentation, so the features are a pure function of the data and the fit is deterministic. ``--teacher-adapt-augment
N`` uses N passes of the run's training augmentation instead (N teacher forwards per image; features nearer to what
the teacher sees while distilling). The L2 strength is chosen on a hold-out of the TRAINING split, never the eval
split.

Every process computes the features of its own rows (``row % world == rank``); they are gathered, the main process
fits and writes the adapted teacher as a plain timm folder (``model.safetensors``, ``config.json`` with the dataset's
classes and label names) with ``adaptation.json`` written last (what the folder is valid for, and what the fit chose),
and every process then loads that folder, so all hold identical weights. A folder whose ``adaptation.json`` matches
the run's teacher weights, data and settings is reused instead of refitted (a resumed run, or another run pointing
``--teacher-adapt-dir`` at it); one without it (a run killed while writing) is never read.
"""
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
from accelerate import Accelerator
from timm.data import create_transform, resolve_data_config

from ..base import UserError, replace_dir, write_text_atomic
from ..data import AugmentConfig, ImageClassificationDataset, ImageData, InputStage
from ..data.decode import collate_images, create_train_transform
from ..distill import ICDTeacher, load_checkpoint_into, set_classifier
from ..distill.label_space import LabelSpace
from ..distill.probe import L2_GRID, fit_linear_probe
from ..publish import save_student
from ..teacher_cache.storage import dataset_fingerprint, weights_hash
from .events import emit

_logger = logging.getLogger(__name__)

ADAPT_MODES = ('auto', 'linear', 'finetune', 'off')
ADAPTED_DIR = 'teacher_adapted'
MANIFEST = 'adaptation.json'
HOLDOUT = 0.1  # of the training split, per class, to choose the probe's L2 strength


def adaptation_mode(mode: str, space: LabelSpace) -> Optional[str]:
    """What ``--teacher-adapt MODE`` does for a teacher whose label space is ``space``: 'linear', 'finetune' or
    None."""
    if mode == 'off' or (mode == 'auto' and space.predicts_dataset):
        return None
    if space.predicts_dataset:
        _logger.info(f'--teacher-adapt {mode}: the teacher predicts the dataset\'s classes already ({space.why}); '
                     f'its head is fitted again, as asked.')
    return mode if mode != 'auto' else 'linear'


def _read_manifest(folder: Path) -> Optional[dict]:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


@torch.no_grad()
def extract_features(teacher: ICDTeacher, data: ImageData, data_config: dict, accelerator: Accelerator,
                     batch_size: int, workers: int = 0, passes: int = 0, augment: Optional[AugmentConfig] = None,
                     seed: int = 0):
    """Pooled teacher features and labels of every training row, gathered on every process in row order.

    With ``passes`` 0 each row is seen once through the eval transform; with N > 0, N times through the training
    augmentation (seeded per (seed, pass, row), as training draws it).
    """
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    rows = list(range(rank, len(data.train), world))
    stage = InputStage(data_config['mean'], data_config['std']).to(device)
    views = [(None, create_transform(**data_config, is_training=False, use_prefetcher=True))] if passes == 0 else [
        (p, create_train_transform(data_config, augment or AugmentConfig(), 'off', jitter_in_workers=True))
        for p in range(passes)]
    features, labels = [], []
    for view, transform in views:
        dataset = ImageClassificationDataset(data.train, data.image_column, data.label_column, transform,
                                             seed=None if view is None else seed, split_name=data.train_split)
        dataset.set_epoch(view or 0)
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, rows), batch_size=batch_size,
                                             num_workers=workers, collate_fn=collate_images)
        for batch in loader:
            x, y = stage([t.to(device) for t in batch])
            with accelerator.autocast():
                _, feats = teacher(teacher.prepare_input(x))
            features.append(feats.float())
            labels.append(y)
            emit('adapt_batch')
    features, labels = torch.cat(features), torch.cat(labels)
    order = torch.as_tensor(rows, device=device).repeat(len(views)) * len(views) + torch.arange(
        len(views), device=device).repeat_interleave(len(rows))  # (row, pass): one order whatever the process count
    if world > 1:
        mine = torch.ones(len(order), dtype=torch.bool, device=device)
        features, labels, order, mine = (accelerator.gather(accelerator.pad_across_processes(t, dim=0))
                                         for t in (features, labels, order, mine))
        features, labels, order = features[mine], labels[mine], order[mine]
    order = torch.argsort(order)
    return features[order], labels[order]


def adapt_teacher(
        teacher: nn.Module,
        data: ImageData,
        data_config: dict,
        accelerator: Accelerator,
        folder: Path,
        teacher_input_size: Optional[Sequence[int]] = None,
        teacher_dtype: Optional[torch.dtype] = None,
        batch_size: int = 64,
        workers: int = 0,
        passes: int = 0,
        augment: Optional[AugmentConfig] = None,
        seed: int = 0,
        overwrite: bool = False,
        mode: str = 'linear',
        finetune: Optional[Callable[[Path, Path], dict]] = None,
        finetune_settings: Optional[dict] = None,
) -> dict:
    """Give ``teacher`` a head for the dataset's classes, fitted here or read from a matching ``folder``.

    ``mode`` 'linear' fits a linear probe; 'finetune' fits one (LP, kept in ``FOLDER-stages/linear``) and then
    trains the whole teacher from it (FT, Kumar et al., ICLR 2022: a fitted head keeps the features from being
    distorted by a random head's early gradients) with ``finetune(start_folder, run_folder)``, the caller's plain
    ``--method vanilla`` training (run in ``FOLDER-stages/finetune``, resumable like any run).

    Args:
        teacher: The frozen teacher (changed in place: its classifier becomes the dataset's).
        data, data_config: The run's data and the student's data config (the eval transform the features see).
        accelerator: The run's Accelerator.
        folder: Where the adapted teacher lives (``--teacher-adapt-dir``, else ``OUT/teacher_adapted``).
        teacher_input_size, teacher_dtype: How the teacher runs (as in distillation).
        batch_size, workers: Of the feature pass.
        passes, augment, seed: ``passes`` 0: the eval transform once; N: N passes of ``augment`` seeded by ``seed``.
        overwrite: Replace a folder fitted for other settings (else refused).
        mode, finetune, finetune_settings: 'linear' or 'finetune'; for the latter, the training function and its
            settings (epochs, lr: what the adapted folder is keyed on).

    Returns:
        The adaptation's record (``adaptation.json``): what it is valid for, what the fit chose, its cost.
    """
    if data.streaming:
        raise UserError('--teacher-adapt fits the teacher\'s head on the training split, which --streaming does not '
                        'hold: adapt it on a map-style copy of the data first (the folder it writes can then be '
                        'passed with --teacher local-dir:DIR), or pass --teacher-adapt off.')
    started = time.perf_counter()
    valid_for = {
        'version': 1, 'mode': 'linear', 'teacher_weights': weights_hash(teacher), 'dataset': data.name,
        'train_split': data.train_split,
        'dataset_fingerprint': dataset_fingerprint(data.train, data.image_column, data.label_column),
        'num_classes': data.num_classes, 'label_names': hashlib.sha1('\n'.join(data.label_names).encode()).hexdigest(),
        'transform': {k: data_config.get(k) for k in ('input_size', 'mean', 'std', 'interpolation', 'crop_pct',
                                                      'crop_mode')},
        'teacher_input_size': list(teacher_input_size) if teacher_input_size else None,
        'augment_passes': passes, 'augment': augment.per_sample() if passes and augment else None,
        'seed': seed if passes else None, 'l2_grid': list(L2_GRID), 'holdout': HOLDOUT,
    }
    if mode == 'finetune':
        valid_for = {**valid_for, 'mode': 'finetune', 'finetune': finetune_settings}
    valid_for = json.loads(json.dumps(valid_for))
    saved = _read_manifest(folder)
    if saved is not None and saved.get('valid_for') == valid_for:
        _logger.info(f"Teacher adaptation: reusing {folder} (fitted for this teacher, data and settings; hold-out "
                     f"top-1 {saved['fit']['holdout_top1']:.2f}%).")
    else:
        if saved is not None and not overwrite:
            changed = sorted(k for k in valid_for if saved.get('valid_for', {}).get(k) != valid_for[k])
            raise UserError(f'{folder} holds a teacher adapted with other {", ".join(changed)}; point '
                            f'--teacher-adapt-dir elsewhere, or pass --overwrite to replace it.')
        if mode == 'finetune':
            saved = _fine_tune(teacher, data, data_config, accelerator, folder, valid_for, teacher_input_size,
                               teacher_dtype, batch_size, workers, passes, augment, seed, finetune)
        else:
            saved = _fit_and_save(teacher, data, data_config, accelerator, folder, valid_for, teacher_input_size,
                                  teacher_dtype, batch_size, workers, passes, augment, seed, started)
    accelerator.wait_for_everyone()
    load_checkpoint_into(teacher, str(folder), 'adapted teacher')
    teacher.pretrained_cfg = {**teacher.pretrained_cfg, 'num_classes': data.num_classes,
                              'label_names': list(data.label_names)}
    teacher.eval().requires_grad_(False)
    return {**saved, 'folder': str(folder)}


def _fit_and_save(teacher: nn.Module, data: ImageData, data_config: dict, accelerator: Accelerator, folder: Path,
                  valid_for: dict, teacher_input_size, teacher_dtype, batch_size: int, workers: int, passes: int,
                  augment: Optional[AugmentConfig], seed: int, started: float) -> dict:
    """Compute the features (all processes), fit the probe and write the folder (main process)."""
    wrapped = ICDTeacher(teacher, teacher_input_size, need_features=True, dtype=teacher_dtype)
    wrapped.set_student_norm(torch.tensor(data_config['mean']), torch.tensor(data_config['std']))
    wrapped.to(accelerator.device)
    try:
        features, labels = extract_features(wrapped, data, data_config, accelerator, batch_size, workers, passes,
                                            augment, seed)
    finally:
        wrapped.remove_hooks()
    if teacher_dtype is not None:
        teacher.float()
    forward_seconds = time.perf_counter() - started
    manifest = None
    if accelerator.is_main_process:
        fit_started = time.perf_counter()
        try:
            fit = fit_linear_probe(features, labels, data.num_classes, L2_GRID, HOLDOUT)
        except FloatingPointError as e:
            raise UserError(f'teacher adaptation failed: {e}; the teacher\'s features may hold NaN/Inf (check its '
                            f'weights) .') from e
        fit_seconds = time.perf_counter() - fit_started
        set_classifier(teacher, fit.weight.cpu(), fit.bias.cpu(), list(data.label_names))
        teacher_config = resolve_data_config(
            {'input_size': tuple(teacher_input_size)} if teacher_input_size else {}, model=teacher)
        save_student(teacher, folder, teacher_config, data.label_names)
        manifest = {
            'valid_for': valid_for,
            'fit': {'l2': fit.l2, 'holdout_top1': fit.holdout_top1.get(fit.l2, fit.train_top1),
                    'holdout_top1_by_l2': {f'{k:g}': v for k, v in fit.holdout_top1.items()},
                    'holdout_rows': fit.holdout_rows, 'train_top1': fit.train_top1},
            'features': {'rows': int(features.shape[0]), 'dim': int(features.shape[1]),
                         'view': 'eval transform, one pass' if not passes else f'{passes} augmented passes'},
            'seconds': {'features': round(forward_seconds, 3), 'fit': round(fit_seconds, 3),
                        'total': round(time.perf_counter() - started, 3)},
            'processes': accelerator.num_processes,
        }
        emit('adapt_saved')  # the folder is in place; adaptation.json, which makes it valid, is not yet
        write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=2))
        _logger.info(
            f"Teacher adaptation (linear probe): {manifest['features']['rows']} x {manifest['features']['dim']} "
            f"features of split '{data.train_split}' ({manifest['features']['view']}) in {forward_seconds:.1f}s, fit "
            f"in {fit_seconds:.1f}s (L2 {fit.l2:g} chosen on a {HOLDOUT:.0%} hold-out of the training split: top-1 "
            f"{manifest['fit']['holdout_top1']:.2f}%); saved to {folder}.")
    accelerator.wait_for_everyone()
    return manifest if manifest is not None else _read_manifest(folder)


def _fine_tune(teacher: nn.Module, data: ImageData, data_config: dict, accelerator: Accelerator, folder: Path,
               valid_for: dict, teacher_input_size, teacher_dtype, batch_size: int, workers: int, passes: int,
               augment: Optional[AugmentConfig], seed: int, finetune: Optional[Callable[[Path, Path], dict]]) -> dict:
    """LP-FT: the linear probe (reused when its stage folder matches), then ``finetune`` from it; the fine-tuned
    teacher is copied into ``folder`` with its ``adaptation.json`` written last."""
    if finetune is None:
        raise UserError('--teacher-adapt finetune trains the teacher with train_icd.py\'s own loop: run it from '
                        'train_icd.py (or pass --teacher-adapt linear).')
    started = time.perf_counter()
    stages = folder.with_name(f'{folder.name}-stages')
    linear = adapt_teacher(teacher, data, data_config, accelerator, stages / 'linear', teacher_input_size,
                           teacher_dtype, batch_size, workers, passes, augment, seed, overwrite=True)
    tuned = finetune(stages / 'linear', stages / 'finetune')
    manifest = None
    if accelerator.is_main_process:
        tmp = folder.with_name(f'.tmp-{folder.name}')
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(tuned['folder'], tmp)
        replace_dir(tmp, folder)
        manifest = {**{k: v for k, v in linear.items() if k != 'folder'}, 'valid_for': valid_for,
                    'finetune': {k: v for k, v in tuned.items() if k != 'folder'},
                    'seconds': {**linear['seconds'], 'finetune': tuned['seconds'],
                                'total': round(time.perf_counter() - started, 3)},
                    'processes': accelerator.num_processes}
        emit('adapt_saved')
        write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=2))
        _logger.info(f"Teacher adaptation (linear probe, then {tuned['epochs']} epochs of fine-tuning): eval top-1 "
                     f"{tuned['top1']:.2f}% at the last epoch; saved to {folder}.")
    accelerator.wait_for_everyone()
    return manifest if manifest is not None else _read_manifest(folder)
