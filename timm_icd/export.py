"""Write the trained student in timm's Hub format: ``model.safetensors`` + ``config.json``.

The folder is what ``timm.models.save_for_hf(..., safe_serialization=True)`` writes, with the dataset's number of
classes, label names and preprocessing, so ``timm.create_model('local-dir:FOLDER')`` rebuilds the exact model.
``distillation.json`` beside it records how the student was made (no weights, no tokens).
"""
import copy
import json
import logging
import shlex
import shutil
from pathlib import Path
from typing import List, Optional, Sequence

import safetensors.torch
import torch.nn as nn
from timm.models._hub import save_config_for_hf

from .checkpoint import replace_dir
from .errors import UserError, first_line

_logger = logging.getLogger(__name__)

DISTILLATION_JSON = 'distillation.json'
DATA_CONFIG_KEYS = ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode')
# what a model's pretrained_cfg says about the weights it was registered with, not about a student trained here
PROVENANCE_KEYS = ('tag', 'paper_ids', 'paper_name', 'origin_url', 'license', 'notes', 'description')
LOCAL_PREFIXES = ('local-dir:', 'imagefolder:')


def public_name(name: str) -> str:
    """A model or dataset name fit to publish: Hub ids and timm names as they are, a local path by its last part."""
    if not name:
        return name
    prefix = next((p for p in LOCAL_PREFIXES if name.startswith(p)), '')
    path = name[len(prefix):]
    if prefix or path.startswith(('/', '.', '~')) or path.count('/') > 1:
        return prefix + (Path(path).name or path)
    return name


def _public_token(token: str) -> str:
    """A command-line token with any local path shortened to its last part (``--flag=PATH`` too)."""
    if token.startswith('--') and '=' in token:
        flag, value = token.split('=', 1)
        return f'{flag}={_public_token(value)}'
    return public_name(token) if token.startswith(LOCAL_PREFIXES + ('/', '~', './', '../')) else token


def public_record(record: dict) -> dict:
    """``record`` as published (model card, pushed distillation.json): local paths shortened to their last part.

    The run folder keeps the full record, which is what reproduces the run on this machine.
    """
    out = copy.deepcopy(record)
    out['student'] = public_name(out.get('student', ''))
    if out.get('teacher'):
        out['teacher']['name'] = public_name(out['teacher']['name'])
        source = out['teacher'].get('source') or ''
        prefix = 'checkpoint:' if source.startswith('checkpoint:') else ''
        out['teacher']['source'] = prefix + public_name(source[len(prefix):])
    if out.get('dataset'):
        out['dataset']['name'] = public_name(out['dataset']['name'])
    if out.get('command'):
        out['command'] = shlex.join(_public_token(t) for t in shlex.split(out['command']))
    return out


def describe(record: dict) -> str:
    """One line on how this student was made, for its config's pretrained_cfg['description']."""
    teacher = record.get('teacher') or {}
    made = f"distilled with timm_icd ({record['method']}) from {public_name(teacher['name'])}" if teacher else \
        f"trained with timm_icd ({record['method']})"
    return f"{public_name(record['student'])} {made} on {public_name(record['dataset']['name'])}; see distillation.json"


def save_student(
        model: nn.Module,
        folder: Path,
        data_config: dict,
        label_names: Optional[Sequence[str]] = None,
        record: Optional[dict] = None,
) -> Path:
    """Save ``model`` (a bare timm model, no hooks or wrappers needed) to ``folder``, replacing it atomically.

    Args:
        model: The student.
        folder: Destination; written as ``.tmp-NAME`` beside it first.
        data_config: The preprocessing the student was trained with (timm data config keys).
        label_names: Class names, index i for output i.
        record: Written as ``distillation.json`` when given.
    """
    folder = Path(folder)
    tmp = folder.with_name(f'.tmp-{folder.name}')
    model_config = {'label_names': list(label_names)} if label_names else None
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        # what timm's save_for_hf(safe_serialization=True) writes, but with tensors that share storage (tied
        # weights, e.g. coat's) copied apart: safetensors refuses to write shared tensors
        tmp.mkdir(parents=True)
        safetensors.torch.save_file(_unshared(model.state_dict()), tmp / 'model.safetensors')
        # the config describes this student: no tag, paper or origin borrowed from the architecture's default weights
        source_cfg = model.pretrained_cfg
        model.pretrained_cfg = {k: v for k, v in source_cfg.items() if k not in PROVENANCE_KEYS}
        if record is not None:
            model.pretrained_cfg['description'] = describe(record)
        try:
            save_config_for_hf(
                model, tmp / 'config.json', model_config=model_config,
                data_config={k: data_config[k] for k in DATA_CONFIG_KEYS if data_config.get(k) is not None})
        finally:
            model.pretrained_cfg = source_cfg
        if record is not None:
            (tmp / DISTILLATION_JSON).write_text(json.dumps(record, indent=2))
        replace_dir(tmp, folder)
    except Exception as e:  # safetensors reports a failed write with its own exception type
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f'cannot save the student to {folder} ({getattr(e, "strerror", None) or first_line(e)}; '
                        f'a full disk?); the checkpoints are intact: rerun with --resume auto to write it.') from e
    return folder


def _unshared(state_dict: dict) -> dict:
    """``state_dict`` with every tensor that shares storage with an earlier one replaced by a contiguous copy."""
    seen, out = set(), {}
    for name, tensor in state_dict.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.device) if tensor.numel() else None
        out[name] = tensor.clone().contiguous() if key in seen else tensor.contiguous()
        if key is not None:
            seen.add(key)
    return out


def read_record(folder: Path) -> dict:
    """The ``distillation.json`` of a student folder ({} when absent)."""
    path = Path(folder) / DISTILLATION_JSON
    return json.loads(path.read_text()) if path.is_file() else {}


def run_record(r, argv: Optional[List[str]], metrics: dict, ema: bool = False) -> dict:
    """What distillation.json says about how run ``r`` (a ``train.Run``) made the student; every number comes from it.

    With ``ema`` it describes the EMA student: its own accuracy, and which weights the folder holds.
    """
    import sys

    import timm
    import torch

    from . import __version__
    from .models import is_hub_or_local, teacher_source
    args, task, data, state = r.args, r.task, r.data, r.state
    icd = task.icd
    teacher = None
    if task.teacher is not None:
        hub_id = None  # the Hub repository the teacher's weights came from
        if args.teacher.startswith('hf-hub:'):
            hub_id = args.teacher[len('hf-hub:'):]
        elif args.teacher_pretrained and not args.teacher_checkpoint and not is_hub_or_local(args.teacher):
            hub_id = task.teacher.model.pretrained_cfg.get('hf_hub_id')
        teacher = {
            'name': args.teacher, 'source': teacher_source(args.teacher, args.teacher_pretrained,
                                                           args.teacher_checkpoint),
            'hf_hub_id': hub_id, 'num_classes': task.teacher.num_classes,
            'top1': (state['teacher'] or {}).get('top1'), 'top5': (state['teacher'] or {}).get('top5'),
            'measured_with': "the student's eval preprocessing" if state['teacher'] else None,
        }
    return {
        'student': args.student,
        'teacher': teacher,
        'method': task.method,
        'loss_weights': {'task': task.task_loss_weight, 'kd': task.kd_loss_weight, 'icd': task.icd_loss_weight},
        'kd_temperature': task.kd_temperature if task.kd_loss_weight > 0 else None,
        'kd_standardize': task.kd_standardize if task.kd_loss_weight > 0 else None,
        'icd': None if icd is None else {
            'feat_dim': icd.student_head.out_features, 'alpha': icd.alpha, 'negatives': icd.negatives,
            'max_tau': icd.max_tau, 'tau_final': float(icd.tau.item()),
            'student_layer': args.student_layer, 'teacher_layer': args.teacher_layer},
        'dataset': {'name': data.name, 'train_split': data.train_split, 'eval_split': data.eval_split,
                    'num_classes': data.num_classes, 'train_rows': data.train_rows, 'eval_rows': data.eval_rows,
                    'streamed': data.streaming or None,
                    'skipped_images': data.skipped_images or None},
        'epochs': r.num_epochs,
        'epoch': metrics.get('epoch'),
        'weights': f'EMA of the student (decay {args.model_ema_decay})' if ema else 'the student at the final epoch',
        'top1': metrics.get('eval_ema_top1' if ema else 'eval_top1'),
        'top5': metrics.get('eval_ema_top5' if ema else 'eval_top5'),
        'best_top1': None if ema else state['best_top1'],
        'best_epoch': None if ema else state['best_epoch'],
        'wall_seconds': state.get('seconds'),
        'command': 'train_icd.py ' + shlex.join(sys.argv[1:] if argv is None else argv),
        'versions': {'timm_icd': __version__, 'timm': timm.__version__, 'torch': torch.__version__},
    }
