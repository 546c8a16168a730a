"""Student and teacher creation on top of ``timm.create_model``, with safe weight loading and clear errors.

Models are named as timm names them: a registered architecture (``resnet50``), ``hf-hub:ORG/NAME`` or
``local-dir:PATH`` (a folder holding timm's ``config.json`` + ``model.safetensors``, as this tool writes students).
"""
import difflib
import logging
import os
from typing import Dict, Optional

import safetensors.torch
import timm
import torch
import torch.nn as nn
from timm.models import get_pretrained_cfg_value, load_state_dict as timm_load_state_dict
from timm.utils import ModelEmaV3

from ..base import UserError, first_line
from .hooks import get_classifier_module

_logger = logging.getLogger(__name__)

_SOURCES = ('hf-hub:', 'local-dir:')
# what torch.load(weights_only=True) says, directly or through timm, when a pickle needs non-allowlisted code
_NEEDS_CODE = ('Weights only load failed', 'weights_only=True blocked', 'Unsupported global')


def is_hub_or_local(name: str) -> bool:
    """True for ``hf-hub:`` and ``local-dir:`` names, whose weights come with their config."""
    return name.startswith(_SOURCES)


def check_model_name(name: str, role: str = 'model') -> None:
    """Fail with close timm names when ``name`` is not a timm architecture (or a missing local-dir folder)."""
    if name.startswith('local-dir:'):
        path = name[len('local-dir:'):]
        if not os.path.isfile(os.path.join(path, 'config.json')):
            raise UserError(f"{role} '{name}': no config.json in {path}; point local-dir: at a folder timm saved.")
        return
    if name.startswith('hf-hub:'):
        return
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else " See timm.list_models() for the names."
        raise UserError(f"unknown {role} model '{name}'.{hint}")


def load_weights_file(path: str) -> Dict[str, torch.Tensor]:
    """Read a state dict with timm's ``load_state_dict``: safetensors, or a timm/PyTorch checkpoint with
    ``weights_only=True`` (timm allows the argparse.Namespace its training checkpoints carry), unwrapping
    ``state_dict_ema``/``state_dict``/``model`` keys and DDP prefixes. A safetensors file is recognised by its
    content, whatever its extension. Pickles that need arbitrary code are refused.
    """
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, 'model.safetensors')):
        path = os.path.join(path, 'model.safetensors')
    if not os.path.isfile(path):
        raise UserError(f'checkpoint not found: {path}')
    with open(path, 'rb') as f:
        head = f.read(9)
    try:
        if head[8:9] == b'{' and not path.endswith('.safetensors'):  # 8-byte header length, then JSON
            return safetensors.torch.load_file(path, device='cpu')
        state_dict = timm_load_state_dict(path, use_ema=True, weights_only=True)
    except Exception as e:
        if any(marker in str(e) for marker in _NEEDS_CODE):
            raise UserError(f'refusing to load {path}: it needs arbitrary code to unpickle (weights_only=True '
                            f'failed). Re-save it as safetensors or a plain state_dict.') from e
        kind = 'safetensors file' if path.endswith('.safetensors') or head[8:9] == b'{' else 'checkpoint'
        raise UserError(f'cannot read {path}: corrupt or truncated {kind} ({first_line(e)}).') from e
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise UserError(f'{path} does not hold a state dict of tensors.')
    return state_dict


def _classifier_key(model: nn.Module) -> Optional[str]:
    classifier = get_classifier_module(model)
    for name, module in model.named_modules():
        if module is classifier and isinstance(getattr(module, 'weight', None), torch.Tensor):
            return f'{name}.weight'
    return None


def load_checkpoint_into(model: nn.Module, path: str, role: str = 'model') -> nn.Module:
    """Load ``path`` strictly into ``model``, resizing its classifier to the checkpoint's number of classes."""
    state_dict = load_weights_file(path)
    key = _classifier_key(model)
    if key is not None and key in state_dict and state_dict[key].shape[0] != model.num_classes:
        model.reset_classifier(state_dict[key].shape[0])
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    resized = [k for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    if missing or unexpected or resized:
        parts = [f'{len(keys)} {what} keys (e.g. {keys[0]})' for what, keys in (
            ('missing', missing), ('unexpected', unexpected), ('wrongly shaped', resized)) if keys]
        raise UserError(f'{role} checkpoint {path} does not fit {type(model).__name__}: {", ".join(parts)}; '
                        f'check the architecture name.')
    model.load_state_dict(state_dict, strict=True)
    return model


def create_student(
        name: str,
        num_classes: int,
        pretrained: Optional[bool] = None,
        checkpoint: Optional[str] = None,
        **kwargs,
) -> nn.Module:
    """Create the student with ``num_classes`` outputs.

    Args:
        name: timm name, ``hf-hub:`` or ``local-dir:``.
        num_classes: Classes of the dataset; a pretrained head of another size is re-initialised by timm.
        pretrained: Load pretrained weights; None means yes for hf-hub:/local-dir: names (a published student to
            start from) and no for architecture names.
        checkpoint: Optional weights file to start from (safetensors or a weights-only torch checkpoint).
        **kwargs: Passed to ``timm.create_model`` (drop_rate, drop_path_rate, ...).
    """
    check_model_name(name, 'student')
    if pretrained is None:
        pretrained = is_hub_or_local(name)
    model = _create(name, 'student', pretrained=pretrained, num_classes=num_classes, **kwargs)
    if checkpoint:
        load_checkpoint_into(model, checkpoint, 'student')
        if model.num_classes != num_classes:
            model.reset_classifier(num_classes)
    return model


def create_teacher(
        name: str,
        num_classes: Optional[int] = None,
        pretrained: bool = True,
        checkpoint: Optional[str] = None,
        **kwargs,
) -> nn.Module:
    """Create the frozen teacher.

    Args:
        name: timm name, ``hf-hub:`` or ``local-dir:``.
        num_classes: Classes to give a randomly initialised teacher (ignored when weights are loaded: the teacher
            keeps the label space of its weights).
        pretrained: Load timm's pretrained weights for ``name``.
        checkpoint: Weights file; its classifier decides the teacher's number of classes.
        **kwargs: Passed to ``timm.create_model`` (e.g. img_size for fixed-size models).
    """
    check_model_name(name, 'teacher')
    if checkpoint:
        model = _create(name, 'teacher', pretrained=False, num_classes=num_classes, **kwargs)
        load_checkpoint_into(model, checkpoint, 'teacher')
    elif pretrained:
        model = _create(name, 'teacher', pretrained=True, **kwargs)
    else:
        model = _create(name, 'teacher', pretrained=False, num_classes=num_classes, **kwargs)
    model.eval()
    model.requires_grad_(False)
    return model


def _create(name: str, role: str, pretrained: bool, **kwargs) -> nn.Module:
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as e:
        if not pretrained:
            raise
        flag = '--teacher-checkpoint FILE or --teacher-pretrained false' if role == 'teacher' \
            else '--student-checkpoint FILE or --no-pretrained'
        raise UserError(f"cannot load pretrained weights for {role} '{name}' ({first_line(e)}); pass {flag}.") from e


def fixed_size_kwargs(name: str, input_size) -> dict:
    """``img_size`` for architectures built for one input size (ViTs), so they accept ``input_size`` images."""
    if input_size and not is_hub_or_local(name) and get_pretrained_cfg_value(name, 'fixed_input_size'):
        return {'img_size': tuple(input_size[-2:])}
    return {}


def teacher_source(name: str, pretrained: bool, checkpoint: Optional[str]) -> str:
    """Where the teacher's weights came from, for records and model cards."""
    if checkpoint:
        return f'checkpoint:{checkpoint}'
    if is_hub_or_local(name):
        return name
    return f'timm:{name}' if pretrained else 'random-init'


def create_student_ema(student: nn.Module, decay: float = 0.9998, warmup: bool = False) -> ModelEmaV3:
    """timm's ``ModelEmaV3`` of the bare student, without the ICD feature hooks its deep copy would carry over."""
    ema = ModelEmaV3(student, decay=decay, use_warmup=warmup)
    for module in ema.module.modules():
        module._forward_pre_hooks.clear()
        module._forward_hooks.clear()
    return ema


def _classifiers(model: nn.Module) -> list:
    """The model's classifier modules (two for distilled DeiT-style models), each a Linear or a 1x1 conv."""
    if not hasattr(model, 'get_classifier'):
        raise UserError(f'{type(model).__name__} has no get_classifier(): its classes cannot be re-indexed or its '
                        f'head replaced.')
    heads = model.get_classifier()
    heads = list(heads) if isinstance(heads, (tuple, list)) else [heads]
    heads = [h.fc if isinstance(getattr(h, 'fc', None), nn.Module) and hasattr(h, 'global_pool') else h for h in heads]
    for head in heads:
        weight = getattr(head, 'weight', None)
        if not isinstance(head, (nn.Linear, nn.Conv2d)) or weight is None or weight.shape[2:] not in ((), (1, 1)):
            raise UserError(f'the classifier of {type(model).__name__} is a {type(head).__name__}, not a Linear or '
                            f'1x1 conv layer: its classes cannot be re-indexed or its head replaced.')
    return heads


def _label_cfg(model: nn.Module, label_names: Optional[list], num_classes: int) -> None:
    cfg = {k: v for k, v in getattr(model, 'pretrained_cfg', {}).items() if k not in ('label_names', 'label_offset')}
    model.pretrained_cfg = {**cfg, 'num_classes': num_classes, **({'label_names': label_names} if label_names else {})}


def reindex_classes(model: nn.Module, index: list, label_names: Optional[list] = None) -> nn.Module:
    """Keep the classifier outputs ``index``, in that order, so output i of the model is its old output ``index[i]``
    (a teacher of the dataset's classes in another order, or of more classes than the dataset's, becomes a model of
    the dataset's classes: ``model(x) == old_model(x)[:, index]``)."""
    rows = torch.as_tensor(index, dtype=torch.long)
    for head in _classifiers(model):
        head.weight = nn.Parameter(head.weight.detach()[rows].clone(), requires_grad=head.weight.requires_grad)
        if head.bias is not None:
            head.bias = nn.Parameter(head.bias.detach()[rows].clone(), requires_grad=head.bias.requires_grad)
        setattr(head, 'out_features' if isinstance(head, nn.Linear) else 'out_channels', len(index))
    model.num_classes = len(index)
    _label_cfg(model, label_names, len(index))
    return model


def set_classifier(model: nn.Module, weight: torch.Tensor, bias: torch.Tensor,
                   label_names: Optional[list] = None) -> nn.Module:
    """Replace the model's classifier by a new one of ``weight.shape[0]`` classes holding ``weight`` and ``bias`` (a
    fitted linear probe). Every head of a two-head model gets them: its eval output, the mean of the two, is then the
    probe applied to the mean of their inputs, which is the pre-logit feature the hooks read."""
    num_classes = weight.shape[0]
    model.reset_classifier(num_classes)
    for head in _classifiers(model):
        with torch.no_grad():
            head.weight.copy_(weight.reshape(head.weight.shape).to(head.weight))
            head.bias.copy_(bias.to(head.bias))
    model.requires_grad_(False)
    _label_cfg(model, label_names, num_classes)
    return model
