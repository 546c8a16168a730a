"""Feature capture by forward hooks, for any timm model.

By default a forward pre-hook on the model's classifier (``get_classifier()``) captures the classifier's input:
the exact pre-logit vector the logits are computed from, for CNNs, ViTs and hybrids alike (mobilenetv3_small_100
gives 1024 wide, not its ``num_features`` of 576). A named module can be hooked instead; its output is then pooled:
4-D feature maps by global average pooling (NCHW, or NHWC where the model says so with ``output_fmt``), 3-D token
sequences by the mean over tokens.

Hooks hold a reference to the tensor the model computed anyway, never a copy, and leave the model's code and
state_dict untouched: removing them leaves a plain timm model.
"""
import difflib
import logging
from typing import Optional, Tuple

import torch
import torch.nn as nn

from .errors import UserError

_logger = logging.getLogger(__name__)


def pool_features(x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """Pool a captured activation to B x C.

    Args:
        x: 2-D (B x C, returned as is), 3-D tokens (B x N x C, mean over N) or 4-D maps (global average pool).
        channels_last: The 4-D layout is B x H x W x C rather than B x C x H x W.
    """
    if x.ndim == 2:
        return x
    if x.ndim == 3:
        return x.mean(dim=1)
    if x.ndim == 4:
        return x.mean(dim=(1, 2)) if channels_last else x.mean(dim=(2, 3))
    raise ValueError(f'Cannot pool a {x.ndim}-D activation of shape {tuple(x.shape)} to a feature vector.')


def get_classifier_module(model: nn.Module) -> nn.Module:
    """The module whose input is the model's pre-logit feature (the first head of models with two)."""
    if not hasattr(model, 'get_classifier'):
        raise UserError(f'{type(model).__name__} has no get_classifier(); name a layer to hook with --*-layer.')
    classifier = model.get_classifier()
    if isinstance(classifier, (tuple, list)):  # e.g. distilled DeiT returns (head, head_dist)
        classifier = classifier[0]
    return classifier


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
        layer: Dotted module name to hook; None hooks the classifier's input.

    Example:
        >>> hook = FeatureHook(model)
        >>> logits = model(images)
        >>> features = hook.pop()   # B x D, from the same forward pass
        >>> hook.remove()
    """

    def __init__(self, model: nn.Module, layer: Optional[str] = None):
        self.layer = layer
        self.channels_last = getattr(model, 'output_fmt', 'NCHW') == 'NHWC'
        self._features: Optional[torch.Tensor] = None
        if layer is None:
            self.handle = get_classifier_module(model).register_forward_pre_hook(self._pre_hook)
        else:
            self.handle = find_module(model, layer).register_forward_hook(self._hook)

    def _pre_hook(self, module, args):
        self._features = args[0]

    def _hook(self, module, args, output):
        if isinstance(output, (tuple, list)):
            output = output[0]
        self._features = output

    def pop(self) -> torch.Tensor:
        """Return the pooled feature of the last forward pass and release it."""
        if self._features is None:
            where = f"layer '{self.layer}'" if self.layer else 'the classifier'
            raise RuntimeError(f'No feature was captured at {where}: the model did not run it in its forward pass.')
        features, self._features = self._features, None
        return pool_features(features, self.channels_last and self.layer is not None)

    def remove(self) -> None:
        """Remove the hook from the model."""
        self.handle.remove()
        self._features = None

    def __enter__(self) -> 'FeatureHook':
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@torch.no_grad()
def probe_feature_dim(model: nn.Module, input_size: Tuple[int, int, int], layer: Optional[str] = None) -> int:
    """Width of the pooled feature ``FeatureHook(model, layer)`` gives, from a dry run on one zero image."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device('cpu')
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = model.training
    model.eval()
    try:
        with FeatureHook(model, layer) as hook:
            model(torch.zeros(1, *input_size, device=device, dtype=dtype))
            return hook.pop().shape[1]
    finally:
        model.train(was_training)
