"""Write the trained student in timm's Hub format: ``model.safetensors`` + ``config.json``.

The folder is what ``timm.models.save_for_hf(..., safe_serialization=True)`` writes, with the dataset's number of
classes, label names and preprocessing, so ``timm.create_model('local-dir:FOLDER')`` rebuilds the exact model.
``distillation.json`` beside it records how the student was made (no weights, no tokens).
"""
import json
import logging
import shutil
from pathlib import Path
from typing import Optional, Sequence

import safetensors.torch
import torch.nn as nn
from timm.models._hub import save_config_for_hf

from .checkpoint import replace_dir
from .errors import UserError, first_line

_logger = logging.getLogger(__name__)

DISTILLATION_JSON = 'distillation.json'
DATA_CONFIG_KEYS = ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode')


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
        save_config_for_hf(
            model, tmp / 'config.json', model_config=model_config,
            data_config={k: data_config[k] for k in DATA_CONFIG_KEYS if data_config.get(k) is not None})
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
