"""Logit distillation terms: Hinton's KD, with optional logit standardisation (Sun et al., CVPR 2024).

Every term takes B x C student and teacher logits, computes in float32 whatever the autocast dtype, and returns the
batch mean.
"""
import torch
import torch.nn.functional as F

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
