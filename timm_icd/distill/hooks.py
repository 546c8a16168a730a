"""Feature capture by hooks, for any timm model.

By default forward pre-hooks on the model's classifier (``get_classifier()``) capture the classifier's input: the
exact pre-logit vector the logits are computed from, for CNNs, ViTs and hybrids alike (mobilenetv3_small_100 gives
1024 wide, not its ``num_features`` of 576). Head structures handled:

* one classifier module (Linear, a 1x1 conv on a pooled map, a norm + Linear);
* a pooling head (timm's ``ClassifierHead``, ``NormMlpClassifierHead``: anything with ``global_pool`` and ``fc``):
  the input of its ``fc``, after its own pooling, whatever the layout (NCHW, NHWC) it pools;
* several heads in a ``ModuleList`` (crossvit's branches, efficientvim's stages): their inputs concatenated;
* a ``(head, head_dist)`` tuple (distilled DeiT, LeViT, ...): the mean of the two heads' inputs.

``probe_feature_dim`` checks the capture once, before training, against ``forward_head(forward_features(x),
pre_logits=True)``: a feature of another width is refused with a one-line ``UserError`` naming the
``--student-layer``/``--teacher-layer`` flag and a module to hook instead, never passed on silently.

A named module can be hooked instead; its output is then pooled: 4-D maps by global average pooling (NHWC where the
module's ``feature_info`` channel count or the model's ``output_fmt`` says so), 3-D token sequences by the mean over
tokens. Of a tuple output, the first tensor with one row per image is taken.

Hooks hold a reference to the tensor the model computed anyway, never a copy, and leave the model's code and
state_dict untouched: removing them leaves a plain timm model.
"""
import difflib
import logging
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from ..base import UserError, first_line

_logger = logging.getLogger(__name__)

_LAYER_FLAGS = {'student': '--student-layer', 'teacher': '--teacher-layer'}
_HEAD_WORDS = ('head', 'fc', 'classifier', 'pool', 'drop', 'flatten')


def pool_features(x: torch.Tensor, channels_last: bool = False, channels: Optional[int] = None) -> torch.Tensor:
    """Pool a captured activation to B x C.

    Args:
        x: 2-D (B x C, returned as is), 3-D tokens (B x N x C, mean over N) or 4-D maps (global average pool).
        channels_last: 4-D maps are B x H x W x C rather than B x C x H x W (unless ``channels`` tells).
        channels: The activation's channel count where known (``feature_info``): if exactly one of dims 1 and -1
            has it, that dim is the channel dim (so B x C x N tokens and NHWC maps are pooled right too).
    """
    if x.ndim == 2:
        return x
    if x.ndim not in (3, 4):
        raise ValueError(f'Cannot pool a {x.ndim}-D activation of shape {tuple(x.shape)} to a feature vector.')
    if channels is not None and (x.shape[1] == channels) != (x.shape[-1] == channels):
        channels_last = x.shape[-1] == channels
    elif x.ndim == 3:
        channels_last = True  # tokens: B x N x C
    if x.ndim == 3:
        return x.mean(dim=1) if channels_last else x.mean(dim=2)
    return x.mean(dim=(1, 2)) if channels_last else x.mean(dim=(2, 3))


def get_classifier_module(model: nn.Module) -> nn.Module:
    """The module whose input is the model's pre-logit feature (the first head of models with two)."""
    if not hasattr(model, 'get_classifier'):
        raise UserError(f'{type(model).__name__} has no get_classifier(); name a layer to hook with --*-layer.')
    classifier = model.get_classifier()
    if isinstance(classifier, (tuple, list)):  # e.g. distilled DeiT returns (head, head_dist)
        classifier = classifier[0]
    return classifier


def classifier_groups(model: nn.Module) -> List[List[nn.Module]]:
    """The modules whose inputs make the pre-logit feature: the mean over groups of the concatenation within each.

    ``[[fc]]`` for one head, ``[[head0, head1]]`` for a ``ModuleList`` of heads, ``[[head], [head_dist]]`` for a
    distilled pair. A pooling head is replaced by its ``fc``, whose input is already pooled.
    """
    if not hasattr(model, 'get_classifier'):
        raise UserError(f'{type(model).__name__} has no get_classifier() to take the pre-logit feature from; '
                        f'pass --student-layer/--teacher-layer NAME to hook another module (e.g. '
                        f'{suggest_layer(model)}).')
    classifier = model.get_classifier()
    members = list(classifier) if isinstance(classifier, (tuple, list)) else [classifier]
    return [[_feature_input(h) for h in (m if isinstance(m, nn.ModuleList) else [m])] for m in members]


def _feature_input(head: nn.Module) -> nn.Module:
    if isinstance(getattr(head, 'fc', None), nn.Module) and hasattr(head, 'global_pool'):
        return head.fc
    return head


def suggest_layer(model: nn.Module) -> str:
    """A module worth hooking when the classifier cannot be: the last ``feature_info`` block, or the last body part."""
    modules = dict(model.named_modules())
    for name in reversed(feature_info_modules(model)):
        module = modules.get(name)
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)) and len(module._modules):  # never called itself
            return f'{name}.{list(module._modules)[-1]}'
        if module is not None:
            return name
    body = [n for n, _ in model.named_children() if not any(w in n.lower() for w in _HEAD_WORDS)]
    return body[-1] if body else 'NAME'


def _feature_info(model: nn.Module) -> List[dict]:
    info = getattr(model, 'feature_info', None)
    info = getattr(info, 'info', info)  # a FeatureInfo object, or timm's usual list of dicts
    return [e for e in (info or []) if isinstance(e, dict) and e.get('module')]


def feature_info_modules(model: nn.Module) -> List[str]:
    """The module names of the model's ``feature_info`` entries, in order."""
    return [e['module'] for e in _feature_info(model)]


def _layer_channels(model: nn.Module, layer: str) -> Optional[int]:
    return next((e.get('num_chs') for e in _feature_info(model) if e['module'] == layer), None)


def find_module(model: nn.Module, name: str) -> nn.Module:
    """Look up a submodule by its dotted name, with close matches in the error when it does not exist."""
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.5)
    hint = f" Close names: {', '.join(close)}." if close else ''
    raise UserError(f"{type(model).__name__} has no module named '{name}'.{hint}")


class FeatureHook:
    """Capture the pooled pre-logit feature (or a named layer's pooled output) of every forward pass.

    Args:
        model: The timm model to watch.
        layer: Dotted module name to hook; None hooks the classifier's input (see ``classifier_groups``).

    Example:
        >>> hook = FeatureHook(model)
        >>> logits = model(images)
        >>> features = hook.pop()   # B x D, from the same forward pass
        >>> hook.remove()
    """

    def __init__(self, model: nn.Module, layer: Optional[str] = None):
        self.layer = layer
        self.channels_last = getattr(model, 'output_fmt', 'NCHW') == 'NHWC'
        self._captured: Dict[int, torch.Tensor] = {}
        self._batch: Optional[int] = None
        if layer is None:
            self.groups = classifier_groups(model)
            self.channels = None
            heads = [h for group in self.groups for h in group]
            self.head_nhwc = [getattr(h, 'input_fmt', 'NCHW') == 'NHWC' for h in heads]  # as timm's heads declare
            self.handles = [h.register_forward_pre_hook(self._pre_hook_for(i)) for i, h in enumerate(heads)]
        else:
            self.groups = None
            self.channels = _layer_channels(model, layer)
            self.handles = [find_module(model, layer).register_forward_hook(self._hook),
                            model.register_forward_pre_hook(self._batch_hook)]

    def _pre_hook_for(self, index: int):
        def pre_hook(module, args):
            self._captured[index] = args[0]
        return pre_hook

    def _batch_hook(self, module, args):
        if args and isinstance(args[0], torch.Tensor):
            self._batch = args[0].shape[0]

    def _hook(self, module, args, output):
        if isinstance(output, (tuple, list)):  # e.g. TNT blocks: (pixel tokens, patch tokens)
            tensors = [t for t in output if isinstance(t, torch.Tensor)]
            output = next((t for t in tensors if t.shape[0] == self._batch), tensors[0] if tensors else output)
        self._captured[0] = output

    def pop(self) -> torch.Tensor:
        """Return the pooled feature of the last forward pass and release it."""
        captured, self._captured = self._captured, {}
        if self.layer is not None:
            if 0 not in captured:
                raise RuntimeError(f"No feature was captured at layer '{self.layer}': the model did not run it in "
                                   f"its forward pass.")
            return pool_features(captured[0], self.channels_last, self.channels)
        sizes = [len(group) for group in self.groups]
        if len(captured) != sum(sizes):
            raise RuntimeError('No feature was captured at the classifier: the model did not run it in its forward '
                               'pass.')
        flat = [pool_features(captured[i], self.head_nhwc[i]).flatten(1) for i in range(sum(sizes))]
        starts = [sum(sizes[:g]) for g in range(len(sizes))]
        groups = [torch.cat(flat[s:s + n], dim=1) if n > 1 else flat[s] for s, n in zip(starts, sizes)]
        return groups[0] if len(groups) == 1 else torch.stack(groups).mean(dim=0)

    def remove(self) -> None:
        """Remove the hooks from the model."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self._captured = {}

    def __enter__(self) -> 'FeatureHook':
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def pre_logits_reference(model: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """``forward_head(forward_features(x), pre_logits=True)`` flattened, or None where the model has no such API."""
    if not (hasattr(model, 'forward_features') and hasattr(model, 'forward_head')):
        return None
    try:
        reference = model.forward_head(model.forward_features(x), pre_logits=True)
    except Exception as e:  # a custom model without timm's API: nothing to check against
        _logger.debug(f'no pre_logits reference for {type(model).__name__}: {first_line(e)}')
        return None
    return reference.flatten(1) if isinstance(reference, torch.Tensor) and reference.ndim >= 2 else None


INPUT_SIZE_FLAGS = {'student': '--input-size', 'teacher': '--teacher-input-size'}


def _input_size_error(model: nn.Module, input_size: Sequence[int], role: str, error: BaseException) -> UserError:
    """The one line for a model that refuses ``input_size``: what it needs, and the flag and size to use."""
    flag = INPUT_SIZE_FLAGS.get(role, '--input-size')
    name = getattr(model, 'default_cfg', {}).get('architecture') or type(model).__name__
    size = 'x'.join(map(str, input_size))
    patch = getattr(getattr(model, 'patch_embed', None), 'patch_size', None)
    if patch is not None:
        patch = tuple(patch) if isinstance(patch, (tuple, list)) else (patch, patch)
        if input_size[-2] % patch[0] or input_size[-1] % patch[1]:
            fixed = [input_size[0]] + [-(-s // p) * p for s, p in zip(input_size[-2:], patch)]
            return UserError(f"{role} {name} needs an input size divisible by its patch size "
                             f"{'x'.join(map(str, patch))}, not {size}: use {flag} {' '.join(map(str, fixed))}.")
    return UserError(f'{role} {name} cannot run on {size} inputs ({first_line(error, 160)}): choose another {flag}.')


@torch.no_grad()
def check_input_size(model: nn.Module, input_size: Sequence[int], role: str = 'student') -> None:
    """Run one image of ``input_size`` through ``model`` (eval mode, restored after), so that a size the model
    refuses (a ViT's patch size, too many downsamplings) is one line before training, not a traceback in it."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device('cpu')
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, *input_size, device=device, dtype=dtype))
    except Exception as e:  # timm asserts, and raises RuntimeError for shapes, depending on the model
        raise _input_size_error(model, input_size, role, e) from e
    finally:
        model.train(was_training)


@torch.no_grad()
def probe_feature_dim(
        model: nn.Module,
        input_size: Sequence[int],
        layer: Optional[str] = None,
        role: str = 'model',
) -> int:
    """Width of the pooled feature ``FeatureHook(model, layer)`` gives, checked on a dry run of two images.

    The classifier's input must be as wide as ``forward_head(pre_logits=True)``; either capture must give one row
    per image. Otherwise a ``UserError`` names the ``--{role}-layer`` flag and a module to hook instead.

    Args:
        model: The model, in any mode (restored afterwards).
        input_size: (C, H, W) of its input.
        layer: As in ``FeatureHook``.
        role: 'student' or 'teacher', for the flag the error names.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device('cpu')
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    generator = torch.Generator().manual_seed(0)  # the global RNG stays untouched
    x = torch.randn(2, *input_size, generator=generator).to(device=device, dtype=dtype)
    if layer is None and not hasattr(model, 'get_classifier'):
        _refuse(model, role, None, 'it has no get_classifier() to take it from')
    was_training = model.training
    model.eval()
    try:
        with FeatureHook(model, layer) as hook:
            try:
                model(x)
            except Exception as e:  # a size the model refuses: one line, as check_input_size gives it
                raise _input_size_error(model, input_size, role, e) from e
            try:
                features = hook.pop()
            except RuntimeError:
                _refuse(model, role, layer, 'the model did not run it in its forward pass')
        if features.ndim != 2 or features.shape[0] != x.shape[0]:
            _refuse(model, role, layer, f'it gives a feature of shape {tuple(features.shape)} for 2 images, not one '
                                        f'row per image')
        if layer is None:
            _check_pre_logits(model, x, features, role)
        return features.shape[1]
    finally:
        model.train(was_training)


def _check_pre_logits(model: nn.Module, x: torch.Tensor, features: torch.Tensor, role: str) -> None:
    reference = pre_logits_reference(model, x)
    if reference is None:
        return
    if reference.shape != features.shape:
        _refuse(model, role, None, f'its classifier input is {features.shape[1]} wide where forward_head('
                                   f'pre_logits=True) gives {reference.shape[1]}')
    if not torch.allclose(features.float(), reference.float(), rtol=1e-3, atol=1e-5):
        _logger.info(f'{role} {type(model).__name__}: the captured classifier input differs in value from '
                     f'forward_head(pre_logits=True) (e.g. a norm inside the head); the classifier input is '
                     f'used.')


def _refuse(model: nn.Module, role: str, layer: Optional[str], why: str) -> None:
    flag = _LAYER_FLAGS.get(role, '--student-layer/--teacher-layer')
    where = f"layer '{layer}'" if layer else 'pre-logit feature'
    raise UserError(f'cannot take the {role} {type(model).__name__}\'s {where}: {why}; pass {flag} NAME to hook '
                    f'another module (e.g. {flag} {suggest_layer(model)}).')
