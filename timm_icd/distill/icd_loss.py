"""Invariant Consistency Distillation (ICD) loss: a contrast between projected student and teacher features.

ICD (Giakoumoglou & Stathaki, arXiv 2407.11802) contrasts projected student and teacher pre-logit features:

    z_s = normalize(W_s f_s + c_s),  z_t = normalize(W_t f_t + c_t)
    tau = clamp(exp(t), max=max_tau),  L = tau * z_s @ z_t.T                      (B x B)
    icd = CE(L, arange(B)) + alpha * KL(softmax(L.T, 1) || softmax(L, 1)) / B

Both heads and t are trained with the student. Everything here is written from the formulas in the paper, not
from the authors' code.
"""
import logging
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .gather import gather_with_grad

_logger = logging.getLogger(__name__)

ICD_NEGATIVES = ('local', 'global')


def icd_terms(logits: torch.Tensor):
    """Contrastive and invariance terms of ICD for a B x B similarity matrix.

    Args:
        logits: ``L = tau * z_s @ z_t.T``; row i compares student sample i with every teacher sample.

    Returns:
        (contrastive, invariance): ``CE(L, arange(B))`` and ``KL(softmax(L.T, 1) || softmax(L, 1))`` summed per row
        and divided by B. The KL target is not detached, as in the paper.
    """
    labels = torch.arange(logits.shape[0], device=logits.device)
    contrastive = F.cross_entropy(logits, labels)
    # log_softmax(L, 0).T is log softmax(L.T, 1); log_target keeps the target in log space for stability
    invariance = F.kl_div(
        F.log_softmax(logits, dim=1), F.log_softmax(logits, dim=0).T, reduction='batchmean', log_target=True)
    return contrastive, invariance


class ICDLoss(nn.Module):
    """ICD loss with its two projection heads and learnable temperature.

    The authors' code also adds a learnable scalar bias to L. Row and column softmax are shift-invariant, so that
    bias receives exactly zero gradient and is left out here.

    The B x B logits and both softmaxes are computed in float32 with autocast disabled, so the loss is safe under
    bf16 / fp16 mixed precision.

    Args:
        student_dim: Width of the student's pooled feature.
        teacher_dim: Width of the teacher's pooled feature.
        feat_dim: Width of the shared embedding space (paper: 128).
        alpha: Weight of the invariance term (paper: 0.5).
        init_t: Initial value of t; tau starts at exp(init_t) (paper: 1.0, so tau0 = e).
        max_tau: Upper clamp of tau = exp(t) (paper: 10).
        negatives: 'local' contrasts within the process's batch (the paper); 'global' gathers the embeddings of all
            processes so every process contrasts against the global batch.
    """

    def __init__(
            self,
            student_dim: int,
            teacher_dim: int,
            feat_dim: int = 128,
            alpha: float = 0.5,
            init_t: float = 1.0,
            max_tau: float = 10.0,
            negatives: str = 'local',
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        if negatives not in ICD_NEGATIVES:
            raise ValueError(f"negatives must be one of {ICD_NEGATIVES}, got {negatives!r}")
        factory = dict(device=device, dtype=dtype)
        self.student_head = nn.Linear(student_dim, feat_dim, **factory)
        self.teacher_head = nn.Linear(teacher_dim, feat_dim, **factory)
        self.t = nn.Parameter(torch.tensor(float(init_t), **factory))
        self.alpha = alpha
        self.max_tau = max_tau
        self.negatives = negatives

    @property
    def tau(self) -> torch.Tensor:
        """The current temperature ``clamp(exp(t), max=max_tau)``."""
        return torch.exp(self.t.float()).clamp(max=self.max_tau)

    def embed(self, features: torch.Tensor, head: nn.Linear) -> torch.Tensor:
        """Project a pooled feature with ``head`` in float32 and L2-normalise it."""
        return F.normalize(F.linear(features.float(), head.weight.float(), head.bias.float()), dim=1)

    def forward(self, student_features: torch.Tensor, teacher_features: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Compute the ICD loss.

        Args:
            student_features: Pooled student feature, B x student_dim.
            teacher_features: Pooled teacher feature, B x teacher_dim; it should carry no gradient.

        Returns:
            Dict with 'loss_icd' (contrastive + alpha * invariance), 'loss_contrast', 'loss_invariance' and 'tau'.
        """
        with torch.autocast(device_type=student_features.device.type, enabled=False):
            z_s = self.embed(student_features, self.student_head)
            z_t = self.embed(teacher_features, self.teacher_head)
            if self.negatives == 'global':
                z_s, z_t = gather_with_grad(z_s), gather_with_grad(z_t)
            tau = self.tau
            contrastive, invariance = icd_terms(tau * z_s @ z_t.T)
        return {
            'loss_icd': contrastive + self.alpha * invariance,
            'loss_contrast': contrastive,
            'loss_invariance': invariance,
            'tau': tau,
        }

    def extra_repr(self) -> str:
        return f'alpha={self.alpha}, max_tau={self.max_tau}, negatives={self.negatives!r}'
