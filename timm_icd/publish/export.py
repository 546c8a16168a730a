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
from typing import Optional, Sequence

import safetensors.torch
import torch.nn as nn
from timm.models._hub import save_config_for_hf

from ..base import UserError, first_line, replace_dir

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
        if out['teacher'].get('adapted'):
            out['teacher']['adapted']['folder'] = public_name(out['teacher']['adapted']['folder'])
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
