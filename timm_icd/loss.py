"""Invariant Consistency Distillation (ICD) loss and Hinton's logit KD loss.

ICD (Giakoumoglou & Stathaki, arXiv 2407.11802) contrasts projected student and teacher pre-logit features:

    z_s = normalize(W_s f_s + c_s),  z_t = normalize(W_t f_t + c_t)
    tau = clamp(exp(t), max=max_tau),  L = tau * z_s @ z_t.T                      (B x B)
    icd = CE(L, arange(B)) + alpha * KL(softmax(L.T, 1) || softmax(L, 1)) / B

Both heads and t are trained with the student. Everything here is written from the formulas in the papers, not
from the authors' code.
"""
import logging
from typing import Dict, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

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


# Logit standardisation (Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024)
LS_EPS = 1e-7
LS_TEMPERATURE = 2.0


def standardize_logits(logits: torch.Tensor, eps: float = LS_EPS) -> torch.Tensor:
    """Z-score each row of ``logits`` over the classes: ``(z - mean(z)) / (std(z) + eps)``, in float32.

    This is the Z-score pre-process of Sun et al., "Logit Standardization in Knowledge Distillation" (CVPR 2024),
    with the settings of their official code (``normalize`` in ``mdistiller/distillers/KD.py`` of
    github.com/sunshangquan/logit-standardization-KD): the standard deviation is the unbiased one
    (``sqrt(sum((z_k - mean)^2) / (C - 1))``, torch's default) and ``eps = 1e-7`` is added to it, not to the
    variance. Rows therefore need at least two classes.

    Args:
        logits: B x C logits (any float dtype).
        eps: Added to the standard deviation so a constant row does not divide by zero.

    Returns:
        B x C float32 logits with zero mean and (up to eps) unit unbiased standard deviation per row.
    """
    logits = logits.float()
    std, mean = torch.std_mean(logits, dim=-1, keepdim=True)
    return (logits - mean) / (std + eps)


def kd_loss(
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        temperature: float = 4.0,
        standardize: bool = False,
) -> torch.Tensor:
    """Hinton's KD: ``KL(softmax(t / T) || softmax(s / T)) * T^2``, averaged over the batch, in float32.

    With ``standardize`` both logits are first Z-scored per sample (see ``standardize_logits``), as in Sun et al.,
    "Logit Standardization in Knowledge Distillation" (CVPR 2024): ``s <- (s - mean(s)) / (std(s) + 1e-7)`` and the
    same for ``t``, over the classes, with the unbiased std of the authors' code. The student then only has to
    match the teacher's logit relations, not their scale or offset: the loss is invariant to ``s -> a * s + b`` and
    ``t -> c * t + d`` per sample (a, c > 0). ``T`` is then the paper's base temperature (2 for KD+LS on CIFAR-100,
    with CE weight 0.1 and KD weight 9 in their code) and the ``T^2`` factor is kept, as theirs is.

    Args:
        student_logits: B x C student logits.
        teacher_logits: B x C teacher logits.
        temperature: Softmax temperature T.
        standardize: Z-score both logits per sample before the temperature softmax.

    Returns:
        The scalar loss, float32.
    """
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
    if standardize:
        student_logits, teacher_logits = standardize_logits(student_logits), standardize_logits(teacher_logits)
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction='batchmean', log_target=True) * (temperature ** 2)


def _gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every process in rank order, keeping the gradient path to each process's slice.

    The gather's backward sums the incoming gradients over processes (a reduce-scatter), so with every process
    computing the same global loss and DDP averaging the parameter gradients, the result is exactly the gradient of
    one process on the concatenated batch. torch deprecates ``torch.distributed.nn.functional.all_gather`` (which
    also refuses to run under torch.compile) in favour of this functional collective, which traces under compile.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed._functional_collectives import all_gather_single_autograd
    return all_gather_single_autograd(x.contiguous(), 0, dist.group.WORLD)


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
                z_s, z_t = _gather_with_grad(z_s), _gather_with_grad(z_t)
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
