"""ICDLoss and kd_loss against float64 references written here from the paper's formulas."""
import math

import pytest
import torch
import torch.nn.functional as F

from timm_icd import ICDLoss, icd_terms, kd_loss
from timm_icd.distill import standardize_logits


def reference_icd(f_s, f_t, w_s, c_s, w_t, c_t, t, alpha=0.5, max_tau=10.0):
    """ICD in float64, spelled out element by element from the formula."""
    z_s = f_s @ w_s.T + c_s
    z_t = f_t @ w_t.T + c_t
    z_s = z_s / z_s.norm(dim=1, keepdim=True)
    z_t = z_t / z_t.norm(dim=1, keepdim=True)
    tau = torch.minimum(torch.exp(t), torch.tensor(max_tau, dtype=t.dtype))
    logits = tau * z_s @ z_t.T
    b = logits.shape[0]
    row_log = logits - torch.logsumexp(logits, dim=1, keepdim=True)   # log softmax(L, 1)
    col_log = (logits.T - torch.logsumexp(logits.T, dim=1, keepdim=True))  # log softmax(L.T, 1)
    contrastive = -sum(row_log[i, i] for i in range(b)) / b
    invariance = sum((col_log[i].exp() * (col_log[i] - row_log[i])).sum() for i in range(b)) / b
    return contrastive + alpha * invariance, contrastive, invariance


def _params64(loss: ICDLoss):
    return [p.detach().double().clone().requires_grad_(True) for p in (
        loss.student_head.weight, loss.student_head.bias, loss.teacher_head.weight, loss.teacher_head.bias, loss.t)]


@pytest.mark.parametrize('batch,d_s,d_t,feat', [(2, 8, 8, 4), (7, 16, 24, 128), (33, 96, 64, 32)])
def test_icd_matches_float64_reference_values_and_gradients(batch, d_s, d_t, feat):
    torch.manual_seed(batch)
    loss = ICDLoss(d_s, d_t, feat_dim=feat)
    with torch.no_grad():
        loss.t.fill_(0.3 + 0.1 * batch / 7)
    f_s = torch.randn(batch, d_s, requires_grad=True)
    f_t = torch.randn(batch, d_t)
    out = loss(f_s, f_t)
    out['loss_icd'].backward()

    params = _params64(loss)
    f_s64 = f_s.detach().double().requires_grad_(True)
    ref, ref_c, ref_i = reference_icd(f_s64, f_t.double(), *params)
    ref.backward()

    assert out['loss_icd'].item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    assert out['loss_contrast'].item() == pytest.approx(ref_c.item(), rel=1e-5, abs=1e-6)
    assert out['loss_invariance'].item() == pytest.approx(ref_i.item(), rel=1e-4, abs=1e-6)
    assert out['tau'].item() == pytest.approx(math.exp(loss.t.item()), rel=1e-6)
    grads = [loss.student_head.weight.grad, loss.student_head.bias.grad, loss.teacher_head.weight.grad,
             loss.teacher_head.bias.grad, loss.t.grad]
    for got, want in zip(grads, params):
        torch.testing.assert_close(got.double(), want.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(f_s.grad.double(), f_s64.grad, rtol=1e-4, atol=1e-6)


def test_parameters_are_heads_and_t_only_no_dead_bias():
    names = sorted(n for n, _ in ICDLoss(10, 20, feat_dim=5).named_parameters())
    assert names == ['student_head.bias', 'student_head.weight', 't', 'teacher_head.bias', 'teacher_head.weight']
    loss = ICDLoss(10, 20)
    assert loss.student_head.out_features == 128 and loss.alpha == 0.5
    assert loss.tau.item() == pytest.approx(math.e)


def test_tau_is_clamped_at_max_and_t_then_gets_no_gradient():
    loss = ICDLoss(4, 4, feat_dim=3)
    with torch.no_grad():
        loss.t.fill_(5.0)  # exp(5) = 148 > 10
    out = loss(torch.randn(6, 4), torch.randn(6, 4))
    assert out['tau'].item() == 10.0
    out['loss_icd'].backward()
    assert loss.t.grad.item() == 0.0
    assert ICDLoss(4, 4, max_tau=2.0, init_t=0.5).tau.item() == pytest.approx(math.exp(0.5))


def test_invariance_is_zero_for_symmetric_logits():
    a = torch.randn(9, 9, dtype=torch.float64)
    _, invariance = icd_terms(a + a.T)
    assert abs(invariance.item()) < 1e-12
    _, invariance = icd_terms(a)
    assert invariance.item() > 1e-3


def test_constant_shift_of_logits_changes_nothing():
    logits = torch.randn(12, 12, dtype=torch.float64) * 3
    for got, want in zip(icd_terms(logits + 17.5), icd_terms(logits)):
        assert got.item() == pytest.approx(want.item(), abs=1e-10)


def test_safe_under_bf16_autocast():
    torch.manual_seed(0)
    loss = ICDLoss(32, 48, feat_dim=16)
    with torch.no_grad():
        loss.t.fill_(math.log(10.0))  # the sharpest allowed logits
    f_s, f_t = torch.randn(64, 32) * 50, torch.randn(64, 48) * 50
    ref = loss(f_s, f_t)['loss_icd']
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = loss(f_s.bfloat16(), f_t.bfloat16())
    assert out['loss_icd'].dtype == torch.float32
    assert torch.isfinite(out['loss_icd'])
    assert out['loss_icd'].item() == pytest.approx(ref.item(), rel=2e-2)


def test_identical_embeddings_give_the_minimum_contrastive_loss_direction():
    """With a perfect student (z_s == z_t on a batch of orthogonal embeddings) the loss is near its floor."""
    b = 8
    logits = 10.0 * torch.eye(b, dtype=torch.float64)
    contrastive, invariance = icd_terms(logits)
    assert contrastive.item() == pytest.approx(-math.log(math.exp(10) / (math.exp(10) + b - 1)), rel=1e-9)
    assert invariance.item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize('temperature', [1.0, 4.0])
def test_kd_loss_matches_float64_reference(temperature):
    torch.manual_seed(1)
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    p_t = F.softmax(t.double() / temperature, dim=1)
    log_p_s = F.log_softmax(s.double() / temperature, dim=1)
    ref = (p_t * (p_t.log() - log_p_s)).sum() / 5 * temperature ** 2
    assert kd_loss(s, t, temperature).item() == pytest.approx(ref.item(), rel=1e-5)
    assert kd_loss(t, t, temperature).item() == pytest.approx(0.0, abs=1e-6)


def reference_kd_standardized(s, t, temperature):
    """KD on Z-scored logits (Sun et al., CVPR 2024) in float64, spelled out per sample from the formula.

    z_k <- (z_k - mean) / (std + 1e-7), std = sqrt(sum_k (z_k - mean)^2 / (C - 1)), for student and teacher rows;
    then KL(softmax(t / T) || softmax(s / T)) * T^2, averaged over the batch.
    """
    b, c = s.shape
    total = s.new_zeros(())
    for i in range(b):
        rows = []
        for z in (s[i], t[i]):
            mean = z.sum() / c
            std = (((z - mean) ** 2).sum() / (c - 1)).sqrt()
            rows.append((z - mean) / (std + 1e-7) / temperature)
        log_p_s = rows[0] - torch.logsumexp(rows[0], dim=0)
        log_p_t = rows[1] - torch.logsumexp(rows[1], dim=0)
        total = total + sum(log_p_t[k].exp() * (log_p_t[k] - log_p_s[k]) for k in range(c))
    return total / b * temperature ** 2


def _affine_logits(batch, classes, seed):
    """Logits with very different per-sample scales and offsets, as real teachers and students give."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(batch, 1, generator=g) * 9.9 + 0.1
    shift = torch.randn(batch, 1, generator=g) * 20
    return torch.randn(batch, classes, generator=g) * scale + shift


@pytest.mark.parametrize('batch,classes,temperature', [(1, 2, 1.0), (5, 7, 2.0), (16, 100, 4.0), (3, 1000, 2.0),
                                                        (9, 10, 0.5)])
def test_kd_standardize_matches_float64_reference_values_and_gradients(batch, classes, temperature):
    s, t = _affine_logits(batch, classes, seed=classes), _affine_logits(batch, classes, seed=classes + 1)
    s = s.requires_grad_(True)
    got = kd_loss(s, t, temperature, standardize=True)
    got.backward()
    s64 = s.detach().double().requires_grad_(True)
    ref = reference_kd_standardized(s64, t.double(), temperature)
    ref.backward()
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)
    # the reference is not just plain KD: standardising changes these logits' loss
    assert ref.item() != pytest.approx(kd_loss(s.detach(), t, temperature).item(), rel=1e-3)


@pytest.mark.parametrize('temperature', [1.0, 2.0, 4.0])
def test_kd_standardize_is_invariant_to_per_sample_affine_changes(temperature):
    torch.manual_seed(3)
    s, t = torch.randn(8, 50), torch.randn(8, 50)
    g = torch.Generator().manual_seed(4)
    a, c = torch.rand(8, 1, generator=g) * 10 + 0.05, torch.rand(8, 1, generator=g) * 10 + 0.05
    b, d = torch.randn(8, 1, generator=g) * 30, torch.randn(8, 1, generator=g) * 30
    base = kd_loss(s, t, temperature, standardize=True).item()
    moved = kd_loss(a * s + b, c * t + d, temperature, standardize=True).item()
    assert moved == pytest.approx(base, rel=1e-4, abs=1e-6)
    assert base == pytest.approx(reference_kd_standardized(s.double(), t.double(), temperature).item(), rel=1e-5)
    # without standardisation the same change moves the loss a lot
    assert kd_loss(a * s + b, c * t + d, temperature).item() != pytest.approx(kd_loss(s, t, temperature).item(),
                                                                           rel=1e-2)
    # a student that is any positive affine map of the teacher is perfect under LS
    assert kd_loss(a * t + b, t, temperature, standardize=True).item() == pytest.approx(0.0, abs=1e-5)


def test_standardize_logits_is_the_unbiased_z_score():
    z = torch.randn(6, 11, dtype=torch.float64) * 5 + 3
    out = standardize_logits(z)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double().mean(dim=1), torch.zeros(6, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.double().std(dim=1, correction=1), torch.ones(6, dtype=torch.float64),
                               atol=1e-6, rtol=0)
    constant = standardize_logits(torch.full((2, 5), 7.0))  # std 0: eps keeps it finite
    assert torch.equal(constant, torch.zeros(2, 5))


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_kd_without_standardize_is_bit_identical_to_plain_kd(dtype):
    torch.manual_seed(5)
    s, t = (torch.randn(7, 13) * 3).to(dtype), (torch.randn(7, 13) * 3).to(dtype)
    for temperature in (1.0, 4.0):
        plain = F.kl_div(F.log_softmax(s.float() / temperature, dim=-1), F.log_softmax(t.float() / temperature, dim=-1),
                         reduction='batchmean', log_target=True) * (temperature ** 2)
        assert torch.equal(kd_loss(s, t, temperature), plain)
        assert torch.equal(kd_loss(s, t, temperature, standardize=False), plain)
        assert not torch.equal(kd_loss(s, t, temperature, standardize=True), plain)


def test_unknown_negatives_mode_is_rejected():
    with pytest.raises(ValueError, match='negatives'):
        ICDLoss(4, 4, negatives='everything')
