"""Logit distillation terms: Hinton's KD, DKD and DIST, with optional logit standardisation (Sun et al., CVPR 2024).

The table of terms (``terms.py``) declares each with its parameters, weights, temperature and citation.

Every term takes B x C student and teacher logits, computes in float32 whatever the autocast dtype, and returns the
batch mean.
"""
import torch
import torch.nn.functional as F

# Logit standardisation (Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024)
LS_EPS = 1e-7
LS_TEMPERATURE = 2.0  # standardised logits have unit std, so Sun et al.'s base temperature is 2
KD_TEMPERATURE = 4.0  # Hinton KD's usual temperature, and DKD's authors' CIFAR-100 setting
DIST_TEMPERATURE = 1.0  # selected on validation by the study (benchmarks/results/study_tuning.md); DIST's ImageNet T


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


def _as_float32(student_logits: torch.Tensor, teacher_logits: torch.Tensor, standardize: bool):
    """Both logits in float32, Z-scored per sample when ``standardize`` (every logit term starts here)."""
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
    if standardize:
        return standardize_logits(student_logits), standardize_logits(teacher_logits)
    return student_logits, teacher_logits


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
    student_logits, teacher_logits = _as_float32(student_logits, teacher_logits, standardize)
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction='batchmean', log_target=True) * (temperature ** 2)


def dkd_loss(
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        target: torch.Tensor,
        temperature: float = 4.0,
        alpha: float = 1.0,
        beta: float = 8.0,
        standardize: bool = False,
) -> torch.Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022): ``T^2 * (alpha * TCKD + beta * NCKD)``, averaged over the batch.

    With ``p = softmax(z / T)`` and ``y`` the label, TCKD is the KL between the teacher's and the student's binary
    distributions ``[p_y, 1 - p_y]`` (target against all others), NCKD the KL between their distributions over the
    non-target classes alone (``softmax`` of the other C - 1 logits). Every term is computed from log-sum-exps in
    float32, never as ``log(1 - p_y)``: ``log(1 - p_y) = logsumexp(z_other / T) - logsumexp(z / T)``, so a confident
    teacher (``p_y`` within float32's epsilon of 1) gives exact finite values where the naive form (and the authors'
    code, which takes the log of summed probabilities) gives ``log 0``. The non-target classes are gathered, not
    masked with a large negative constant, so the non-target softmax is exact too.

    Args:
        student_logits, teacher_logits: B x C logits.
        target: B class indices (hard labels: the decoupling needs the target class).
        temperature: T (the authors' 4).
        alpha, beta: Weights of TCKD and NCKD (the authors' CIFAR-100 settings: 1 and 8; ImageNet: 1 and 0.5). The
            function keeps the authors' 8; ``train_icd.py --dkd-beta`` defaults to 2, what the study's tuning
            chose on validation data (``benchmarks/results/study_tuning.md``).
        standardize: Z-score both logits per sample first (``standardize_logits``).

    Returns:
        The scalar loss, float32.
    """
    s, t = _as_float32(student_logits, teacher_logits, standardize)
    s, t = s / temperature, t / temperature
    target = target.long()
    others = torch.ones_like(s, dtype=torch.bool).scatter_(1, target[:, None], False)  # B x C, False at the target

    def binary_and_rest(z: torch.Tensor):
        rest = z[others].view(z.shape[0], -1)  # the non-target logits, B x (C - 1)
        lse_all, lse_rest = torch.logsumexp(z, dim=1), torch.logsumexp(rest, dim=1)
        log_binary = torch.stack([z.gather(1, target[:, None])[:, 0] - lse_all, lse_rest - lse_all], dim=1)
        return log_binary, rest - lse_rest[:, None]  # log [p_y, 1 - p_y], log softmax over the non-targets

    log_bs, log_qs = binary_and_rest(s)
    log_bt, log_qt = binary_and_rest(t)
    tckd = F.kl_div(log_bs, log_bt, reduction='batchmean', log_target=True)
    nckd = F.kl_div(log_qs, log_qt, reduction='batchmean', log_target=True)
    return (alpha * tckd + beta * nckd) * temperature ** 2


def _pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of the rows of ``a`` and ``b``: the cosine of the centred rows (eps in the norms)."""
    return F.cosine_similarity(a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True), dim=1, eps=eps)


def dist_loss(
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        temperature: float = 4.0,
        beta: float = 2.0,
        gamma: float = 2.0,
        standardize: bool = False,
) -> torch.Tensor:
    """DIST (Huang et al., NeurIPS 2022): match relations of the probabilities, not their values.

    ``Y = softmax(z / T)``; inter-class: ``1 - mean_i pearson(Y_s[i, :], Y_t[i, :])`` (each sample's ranking of the
    classes); intra-class: ``1 - mean_c pearson(Y_s[:, c], Y_t[:, c])`` (each class's ranking of the samples in the
    batch). Loss: ``T^2 * (beta * inter + gamma * intra)``, in float32.

    The intra-class term depends on the whole batch: pass the logits of every process (``gather_logits``) to compute
    it over the global batch; with a process's own logits it is the per-process term (what the authors' DDP code
    computes).

    Args:
        student_logits, teacher_logits: B x C logits.
        temperature: T (the authors' 4 on CIFAR-100, 1 on ImageNet).
        beta, gamma: Weights of the inter- and intra-class terms (the authors' CIFAR-100 settings: 2 and 2).
        standardize: Z-score both logits per sample first (``standardize_logits``).

    Returns:
        The scalar loss, float32.
    """
    s, t = _as_float32(student_logits, teacher_logits, standardize)
    ys, yt = F.softmax(s / temperature, dim=1), F.softmax(t / temperature, dim=1)
    inter = 1 - _pearson(ys, yt).mean()
    intra = 1 - _pearson(ys.T, yt.T).mean()
    return (beta * inter + gamma * intra) * temperature ** 2
