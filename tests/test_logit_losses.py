"""DKD and DIST against float64 references written here from the papers' formulas, values and gradients."""
import pytest
import torch
import torch.nn.functional as F

from timm_icd import ICDDistillationTask
from timm_icd.distill import dist_loss, dkd_loss, kd_loss, standardize_logits


def reference_dkd(s, t, y, temperature, alpha, beta):
    """DKD in float64, sample by sample: binary target/other KL and the KL over the non-target classes."""
    total = s.new_zeros(())
    for i in range(s.shape[0]):
        p_s, p_t = F.softmax(s[i] / temperature, 0), F.softmax(t[i] / temperature, 0)
        b_s = torch.stack([p_s[y[i]], 1 - p_s[y[i]]])
        b_t = torch.stack([p_t[y[i]], 1 - p_t[y[i]]])
        tckd = (b_t * (b_t.log() - b_s.log())).sum()
        keep = torch.arange(s.shape[1]) != y[i]
        q_s, q_t = F.softmax(s[i, keep] / temperature, 0), F.softmax(t[i, keep] / temperature, 0)
        nckd = (q_t * (q_t.log() - q_s.log())).sum()
        total = total + alpha * tckd + beta * nckd
    return total / s.shape[0] * temperature ** 2


def reference_dist(s, t, temperature, beta, gamma):
    """DIST in float64 with Pearson's correlation spelled out (no cosine_similarity)."""
    ys, yt = F.softmax(s / temperature, 1), F.softmax(t / temperature, 1)

    def pearson(a, b):
        a, b = a - a.mean(), b - b.mean()
        return (a * b).sum() / ((a * a).sum() * (b * b).sum()).sqrt()

    inter = 1 - sum(pearson(ys[i], yt[i]) for i in range(ys.shape[0])) / ys.shape[0]
    intra = 1 - sum(pearson(ys[:, c], yt[:, c]) for c in range(ys.shape[1])) / ys.shape[1]
    return temperature ** 2 * (beta * inter + gamma * intra)


def _logits(batch, classes, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, classes, generator=g) * scale, torch.randn(batch, classes, generator=g) * scale,
            torch.randint(0, classes, (batch,), generator=g))


def _check(ours_fn, ref_fn, s, t, *args, rtol=1e-5, atol=1e-6):
    s32 = s.clone().requires_grad_(True)
    ours = ours_fn(s32, t, *args)
    ours.backward()
    s64 = s.double().requires_grad_(True)
    ref = ref_fn(s64, t.double(), *args)
    ref.backward()
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(s32.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('batch,classes,temperature,alpha,beta', [
    (1, 3, 1.0, 1.0, 1.0), (8, 10, 4.0, 1.0, 8.0), (32, 100, 4.0, 1.0, 8.0), (16, 1000, 2.0, 1.0, 0.5)])
def test_dkd_matches_float64_reference_values_and_gradients(batch, classes, temperature, alpha, beta):
    s, t, y = _logits(batch, classes, seed=classes)
    _check(lambda a, b, *r: dkd_loss(a, b, y, *r), lambda a, b, *r: reference_dkd(a, b, y, *r), s, t,
           temperature, alpha, beta)


def test_dkd_stays_exact_with_a_confident_teacher_where_the_naive_float32_form_breaks():
    """A teacher 120 logits sure of the target at T 4: 1 - p_t[y] ~ 1e-13 underflows in float32."""
    s, t, y = _logits(6, 10, seed=1)
    t[torch.arange(6), y] += 120.0
    s[torch.arange(3), y[:3]] += 90.0  # half the students are confident too
    p_t = F.softmax(t / 4, 1).gather(1, y[:, None])
    assert (1 - p_t == 0).all()  # the naive binary distribution has an exact 0 in float32 ...
    naive = (torch.stack([p_t[:, 0], 1 - p_t[:, 0]], 1).log()).isinf().any()
    assert naive  # ... whose log is -inf: the naive TCKD is inf or nan
    _check(lambda a, b, *r: dkd_loss(a, b, y, *r), lambda a, b, *r: reference_dkd(a, b, y, *r), s, t,
           4.0, 1.0, 8.0, rtol=1e-4)


def test_dkd_recomposes_kd_as_the_paper_says():
    """KD = TCKD + (1 - p_t[y]) * NCKD (Zhao et al., eq. 7): with alpha 1 and beta 1 - p_t[y], DKD is KD."""
    for seed in range(4):
        s, t, y = _logits(1, 12, seed)
        beta = 1 - F.softmax(t / 4, 1)[0, y[0]].item()
        torch.testing.assert_close(dkd_loss(s, t, y, 4.0, 1.0, beta), kd_loss(s, t, 4.0), rtol=1e-5, atol=1e-6)


def test_dkd_standardize_is_dkd_of_standardised_logits():
    s, t, y = _logits(8, 10, seed=3)
    torch.testing.assert_close(dkd_loss(s, t, y, 2.0, 1.0, 8.0, standardize=True),
                               dkd_loss(standardize_logits(s), standardize_logits(t), y, 2.0, 1.0, 8.0))


@pytest.mark.parametrize('batch,classes,temperature,beta,gamma', [
    (2, 3, 1.0, 1.0, 1.0), (8, 10, 4.0, 2.0, 2.0), (64, 100, 4.0, 2.0, 2.0), (16, 1000, 1.0, 1.0, 1.0)])
def test_dist_matches_float64_reference_values_and_gradients(batch, classes, temperature, beta, gamma):
    s, t, _ = _logits(batch, classes, seed=batch)
    _check(dist_loss, reference_dist, s, t, temperature, beta, gamma)


def test_dist_is_zero_for_a_student_that_matches_the_teacher_and_sees_relations_not_values():
    s, t, _ = _logits(8, 10, seed=5)
    assert dist_loss(t, t, 4.0).item() == pytest.approx(0.0, abs=1e-5)
    # every probability ranking of the teacher, reversed: the worst inter-class relation, a large loss
    assert dist_loss(-t, t, 1.0, beta=1.0, gamma=0.0).item() > 1.0


def _task(method, **kwargs):
    torch.manual_seed(0)
    import timm
    student, teacher = timm.create_model('test_resnet', num_classes=10), timm.create_model('test_resnet',
                                                                                          num_classes=10)
    return ICDDistillationTask(student, teacher, method=method, student_input_size=(3, 24, 24),
                               teacher_input_size=(3, 24, 24), verbose=False, **kwargs)


@pytest.mark.parametrize('method', ['dkd', 'dist', 'icd+dkd', 'icd+dist'])
def test_task_adds_the_logit_term_at_its_weight_and_dkd_ramps_up_by_epoch(method):
    task = _task(method, dkd_warmup_epochs=4, kd_temperature=3.0)
    x, y = torch.randn(6, 3, 24, 24), torch.tensor([0, 1, 2, 3, 4, 5])
    for epoch, ramp in ((0, 0.25), (2, 0.75), (3, 1.0), (9, 1.0)):
        task.set_epoch(epoch)
        expected = ramp if 'dkd' in method else 1.0
        assert task.logit_ramp == expected
        out = task(x, y)
        with torch.no_grad():
            logits = task.student(x)
            teacher_logits = task.teacher(task.teacher.prepare_input(x))[0]
        term = dkd_loss(logits, teacher_logits, y, 3.0, 1.0, 2.0) if 'dkd' in method else \
            dist_loss(logits, teacher_logits, 3.0, 2.0, 2.0)
        torch.testing.assert_close(out['loss_kd'], term)
        torch.testing.assert_close(out['loss'], out['loss_ce'] + expected * term + out['loss_icd'])
    record = task.loss_record()
    assert record['logit_loss'] == method.split('+')[-1] and record['method'] == method
    assert record['kd_temperature'] == 3.0 and (record['dkd'] or record['dist'])['beta'] == 2.0  # beta 2: the study's
    assert (record['dkd'] is None) == ('dkd' not in method) and (record['dist'] is None) == ('dist' not in method)


@pytest.mark.parametrize('method,standardize,temperature', [
    ('kd', False, 4.0), ('icd+kd', False, 4.0), ('dkd', False, 4.0), ('dist', False, 1.0), ('icd+dist', False, 1.0),
    ('kd', True, 2.0), ('dist', True, 2.0)])
def test_an_unset_temperature_is_the_resolved_logit_terms(method, standardize, temperature):
    """4 for KD and DKD, DIST's tuned 1 (study_tuning.md), Sun et al.'s 2 for standardised logits."""
    task = _task(method, kd_standardize=standardize)
    assert task.kd_temperature == temperature and task.loss_record()['kd_temperature'] == temperature
    assert _task(method, kd_standardize=standardize, kd_temperature=3.0).kd_temperature == 3.0


def test_dkd_refuses_soft_labels_in_one_line():
    from timm_icd import UserError
    task = _task('dkd')
    with pytest.raises(UserError, match='needs hard labels'):
        task(torch.randn(2, 3, 24, 24), torch.full((2, 10), 0.1))
