"""A loss term registered from outside the package, as a user's ``--loss-plugin FILE.py`` does (tests/test_terms.py).

L1 between the student's and the teacher's class probabilities at temperature T, times ``scale``.
"""
from dataclasses import dataclass, field

import torch

from timm_icd import register_loss


@dataclass(frozen=True)
class L1Params:
    scale: float = field(default=1.0, metadata={'help': 'L1: factor of the term (default: 1)', 'check': '>= 0'})


def l1_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, temperature: float,
            standardize: bool, params: L1Params) -> torch.Tensor:
    """``scale * mean_i sum_c |softmax(s / T) - softmax(t / T)|``, in float32."""
    p_s = torch.softmax(student_logits.float() / temperature, dim=1)
    p_t = torch.softmax(teacher_logits.float() / temperature, dim=1)
    return params.scale * (p_s - p_t).abs().sum(dim=1).mean()


register_loss('l1', l1_loss, L1Params, title='L1 between class probabilities (L1)', temperature=2.0,
              citation='a test term', bibtex='@misc{l1test, title = {A test term}}')
