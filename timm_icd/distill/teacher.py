"""The frozen teacher: logits and its pooled feature from one forward pass, re-normalised and resized for it."""
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.task import DistillationTeacher
from timm.utils import unwrap_model

from .hooks import FeatureHook


class ICDTeacher(DistillationTeacher):
    """Frozen teacher that gives logits and its pooled feature from one forward pass.

    Extends timm's ``DistillationTeacher`` (which re-normalises a student-normalised batch to the teacher's
    mean/std) with resizing to the teacher's input size, a feature hook, and an optional compute dtype.

    Args:
        model: The teacher model.
        input_size: (C, H, W) the teacher expects; None uses its ``pretrained_cfg['input_size']``.
        layer: Module to take features from; None takes the classifier's input.
        need_features: Capture features (False for KD alone).
        dtype: Dtype to run the teacher in (e.g. torch.bfloat16); outputs are returned in float32.
    """

    def __init__(
            self,
            model: nn.Module,
            input_size: Optional[Sequence[int]] = None,
            layer: Optional[str] = None,
            need_features: bool = True,
            dtype: Optional[torch.dtype] = None,
    ):
        super().__init__(model)
        model.requires_grad_(False)
        if dtype is not None:
            model.to(dtype=dtype)
        self.input_dtype = next(model.parameters()).dtype
        if input_size is None:
            input_size = getattr(model, 'pretrained_cfg', {}).get('input_size')
        self.input_size = tuple(input_size) if input_size else None
        self.layer = layer
        self.feature_hook = FeatureHook(model, layer) if need_features else None
        self.set_student_norm(self.mean_kd, self.std_kd)

    def set_student_norm(self, student_mean: torch.Tensor, student_std: torch.Tensor) -> None:
        """Precompute the affine map from the student's normalisation to the teacher's.

        ``x_t = (x * std_s + mean_s - mean_t) / std_t = x * scale + shift``: one fused op per step, decided once
        here instead of with ``torch.equal`` (a host sync on GPU) on every batch as ``normalize_input`` does.
        """
        mean_s = torch.as_tensor(student_mean, dtype=torch.float32).reshape(1, -1, 1, 1).to(self.mean_kd.device)
        std_s = torch.as_tensor(student_std, dtype=torch.float32).reshape(1, -1, 1, 1).to(self.mean_kd.device)
        self.renormalize = not (torch.equal(mean_s, self.mean_kd.float()) and torch.equal(std_s, self.std_kd.float()))
        self.register_buffer('scale', std_s / self.std_kd, persistent=False)
        self.register_buffer('shift', (mean_s - self.mean_kd) / self.std_kd, persistent=False)

    @property
    def num_classes(self) -> int:
        return unwrap_model(self.model).num_classes

    def prepare_input(self, input: torch.Tensor) -> torch.Tensor:
        """Re-normalise a student batch for the teacher and resize it to the teacher's input size."""
        return self._resize(torch.addcmul(self.shift, input, self.scale) if self.renormalize else input)

    def prepare_unit(self, unit: torch.Tensor) -> torch.Tensor:
        """The teacher's input from the batch before any normalisation (values in [0, 1]): normalised with the
        teacher's own mean and std, with the same operations as the input pipeline, and resized.

        Unlike ``prepare_input`` the result does not depend on the student's normalisation, to the bit: what a
        teacher cache stores is the same whichever student wrote it. With the teacher's normalisation equal to the
        student's it equals ``prepare_input`` of the student's batch exactly.
        """
        return self._resize((unit - self.mean_kd) / self.std_kd)

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_size is not None and tuple(x.shape[-2:]) != tuple(self.input_size[-2:]):
            x = F.interpolate(x, size=tuple(self.input_size[-2:]), mode='bilinear', align_corners=False)
        return x

    # no_grad rather than inference_mode: the features feed the trainable ICD head, and autograd cannot save
    # inference tensors for backward. Either way the teacher keeps no activations and never runs backward.
    @torch.no_grad()
    def forward(self, input: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Teacher logits and pooled features (None without a feature hook) for an input prepared for it."""
        logits = self.model(input.to(self.input_dtype))
        features = self.feature_hook.pop() if self.feature_hook is not None else None
        return logits.float(), features

    def remove_hooks(self) -> None:
        if self.feature_hook is not None:
            self.feature_hook.remove()
            self.feature_hook = None
