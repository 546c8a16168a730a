"""The distiller task: loss composition, frozen teacher, heads inside the trainable module, methods."""
import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.task import TrainingTask

from timm_icd import ICDDistillationTask, METHOD_WEIGHTS, UserError, create_distiller, kd_loss
from timm_icd.data import InputStage


def _pair(student_classes=10, teacher_classes=10, seed=0):
    torch.manual_seed(seed)
    student = timm.create_model('test_efficientnet', num_classes=student_classes)
    teacher = timm.create_model('test_resnet', num_classes=teacher_classes)
    return student, teacher


def test_is_a_timm_training_task_and_returns_the_documented_dict():
    student, teacher = _pair()
    task = ICDDistillationTask(student, teacher, method='icd+kd', student_input_size=(3, 32, 32),
                               teacher_input_size=(3, 32, 32))
    assert isinstance(task, TrainingTask)
    out = task(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    assert set(out) == {'loss', 'output', 'loss_ce', 'loss_kd', 'loss_icd', 'tau'}
    assert out['output'].shape == (4, 10)
    assert out['tau'].item() == pytest.approx(math.e, rel=1e-6)


def test_loss_is_the_weighted_sum_of_independently_computed_parts():
    student, teacher = _pair()
    task = ICDDistillationTask(student, teacher, method='icd+kd', task_loss_weight=0.7, kd_loss_weight=0.4,
                               icd_loss_weight=1.3, kd_temperature=3.0, student_input_size=(3, 32, 32),
                               teacher_input_size=(3, 32, 32))
    task.eval()  # deterministic forward (no dropout, BN running stats) so the parts can be recomputed
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 5])
    out = task(x, y)
    with torch.no_grad():
        s_feat = student.forward_head(student.forward_features(x), pre_logits=True)
        s_logits = student.get_classifier()(s_feat)
        xt = (x * task.student_std + task.student_mean - task.teacher.mean_kd) / task.teacher.std_kd
        t_feat = teacher.forward_head(teacher.forward_features(xt), pre_logits=True)
        t_logits = teacher.get_classifier()(t_feat)
        icd = task.icd(s_feat, t_feat)['loss_icd']
    ce = F.cross_entropy(s_logits, y)
    kd = kd_loss(s_logits, t_logits, 3.0)
    assert out['loss_ce'].item() == pytest.approx(ce.item(), rel=1e-5)
    # the task re-normalises for the teacher with one fused affine map: float32 rounding apart from the formula
    # above, which a KD this small (about 4e-3) shows at 1e-4 relative, depending on the thread count
    assert out['loss_kd'].item() == pytest.approx(kd.item(), rel=1e-5, abs=1e-6)
    assert out['loss_icd'].item() == pytest.approx(icd.item(), rel=1e-5)
    assert out['loss'].item() == pytest.approx(0.7 * ce.item() + 0.4 * kd.item() + 1.3 * icd.item(), rel=1e-5,
                                               abs=1e-6)


def test_kd_standardize_gives_the_standardised_kd_loss():
    student, teacher = _pair()
    assert ICDDistillationTask(student, teacher, method='kd', student_input_size=(3, 32, 32),
                               teacher_input_size=(3, 32, 32), verbose=False).kd_standardize is False
    task = ICDDistillationTask(student, teacher, method='kd', kd_temperature=2.0, kd_standardize=True,
                               student_input_size=(3, 32, 32), teacher_input_size=(3, 32, 32))
    assert task.kd_standardize is True
    task.eval()
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 5])
    out = task(x, y)
    with torch.no_grad():
        s_logits = student(x)
        t_logits = task.teacher_logits(x)
    standardized = kd_loss(s_logits, t_logits, 2.0, standardize=True)
    assert out['loss_kd'].item() == pytest.approx(standardized.item(), rel=1e-5)
    assert out['loss_kd'].item() != pytest.approx(kd_loss(s_logits, t_logits, 2.0).item(), rel=1e-3)
    ce = F.cross_entropy(s_logits, y)
    assert out['loss'].item() == pytest.approx(0.1 * ce.item() + 0.9 * standardized.item(), rel=1e-5)


def test_teacher_is_frozen_outside_the_trainable_module_and_heads_are_inside():
    student, teacher = _pair()
    task = ICDDistillationTask(student, teacher, method='icd+kd', student_input_size=(3, 32, 32),
                               teacher_input_size=(3, 32, 32))
    task.train()
    assert not task.teacher.training and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    trainable = {id(p) for p in task.trainable_module.parameters()}
    assert not trainable & {id(p) for p in teacher.parameters()}
    for p in task.icd.parameters():
        assert id(p) in trainable
    before = [p.clone() for p in teacher.parameters()]
    out = task(torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4]))
    out['loss'].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in task.icd.parameters())
    assert task.icd.t.grad.abs().item() > 0
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))


def test_batch_is_renormalised_and_resized_for_the_teacher():
    student, teacher = _pair()
    teacher.pretrained_cfg = {**teacher.pretrained_cfg, 'mean': (0.1, 0.2, 0.3), 'std': (0.4, 0.5, 0.6)}
    task = ICDDistillationTask(student, teacher, method='kd', student_mean=(0.5, 0.5, 0.5),
                               student_std=(0.25, 0.25, 0.25), student_input_size=(3, 24, 24),
                               teacher_input_size=(3, 40, 40))
    x = torch.randn(2, 3, 24, 24)
    prepared = task.teacher.prepare_input(x)
    raw = x * 0.25 + 0.5
    mean, std = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1), torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)
    expected = F.interpolate((raw - mean) / std, size=(40, 40), mode='bilinear', align_corners=False)
    torch.testing.assert_close(prepared, expected)
    assert task.teacher.feature_hook is None  # kd needs no teacher features
    same = ICDDistillationTask(*_pair(), method='kd', student_mean=(0.5, 0.5, 0.5), student_std=(0.5, 0.5, 0.5),
                               student_input_size=(3, 24, 24), teacher_input_size=(3, 24, 24))
    assert not same.teacher.renormalize and same.teacher.prepare_input(x) is x  # same normalisation: no op at all


def test_a_cache_writer_feeds_the_teacher_the_same_bits_whatever_the_student_normalisation():
    """``prepare_unit`` (what a teacher cache records from) normalises the un-normalised batch for the teacher with the
    input stage's own operations: two students of other normalisations give the teacher the same bits, and a student
    of the teacher's normalisation gives exactly what ``prepare_input`` gives."""
    images = torch.randint(0, 256, (2, 3, 24, 24), dtype=torch.uint8)  # a batch from the loader's workers
    unit = images.float() / 255
    inputs = []
    for mean, std in [((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]:
        stage = InputStage(mean, std)
        stage.keep_unit = True
        x, _ = stage((images, torch.zeros(2)), epoch=0)
        assert torch.equal(stage.unit, unit) and torch.equal(x, (unit - stage.mean) / stage.std)
        task = ICDDistillationTask(*_pair(), method='kd', student_mean=mean, student_std=std,
                                   student_input_size=(3, 24, 24), teacher_input_size=(3, 24, 24))
        inputs.append((task.teacher.prepare_unit(stage.unit), task.teacher.prepare_input(x)))
    assert torch.equal(inputs[0][0], inputs[1][0]) and torch.equal(inputs[1][0], inputs[1][1])
    assert not torch.equal(inputs[0][1], inputs[1][1])  # re-normalising the student's batch rounds otherwise


def test_method_weights_and_auto_choice():
    assert METHOD_WEIGHTS == {'vanilla': (1.0, 0.0, 0.0), 'kd': (0.1, 0.9, 0.0), 'dkd': (1.0, 1.0, 0.0),
                              'dist': (1.0, 1.0, 0.0), 'icd': (1.0, 0.0, 1.0), 'icd+kd': (1.0, 1.0, 1.0),
                              'icd+dkd': (1.0, 1.0, 1.0), 'icd+dist': (1.0, 1.0, 1.0)}
    student, teacher = _pair(10, 10)
    assert ICDDistillationTask(student, teacher, method='auto', student_input_size=(3, 32, 32)).method == 'icd+kd'
    student, teacher = _pair(10, 1000)
    plain = ICDDistillationTask(student, teacher, method='auto', student_input_size=(3, 32, 32))
    assert plain.method == 'vanilla' and plain.teacher is None and plain.icd is None  # the study's decision
    assert (plain.task_loss_weight, plain.kd_loss_weight, plain.icd_loss_weight) == (1, 0, 0)
    task = ICDDistillationTask(student, teacher, method='auto', icd_loss_weight=1.0, student_input_size=(3, 32, 32),
                               teacher_input_size=(3, 32, 32))  # an ICD weight asks for ICD
    assert task.method == 'icd' and (task.task_loss_weight, task.kd_loss_weight, task.icd_loss_weight) == (1, 0, 1)
    out = task(torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2]))
    assert out['loss_kd'].item() == 0.0 and out['loss_icd'].item() > 0


@pytest.mark.parametrize('method', ['kd', 'icd+kd'])
def test_logit_kd_with_another_label_space_names_both_counts(method):
    student, teacher = _pair(10, 1000)
    with pytest.raises(UserError, match=r"the teacher predicts 1000 classes, the dataset has 10: adapt the teacher"):
        ICDDistillationTask(student, teacher, method=method)


def test_a_kd_weight_override_needs_the_same_label_space():
    student, teacher = _pair(10, 1000)
    with pytest.raises(UserError, match="KD weight of 0.5 needs a teacher that predicts the dataset's classes, but the "
                                        "teacher predicts 1000 classes, the dataset has 10"):
        ICDDistillationTask(student, teacher, method='icd', kd_loss_weight=0.5)


def test_optimizer_groups_follow_timm_for_the_student_and_heads():
    from timm.optim import create_optimizer_v2
    student, teacher = timm.create_model('test_vit', num_classes=10), timm.create_model('test_resnet', num_classes=10)
    task = ICDDistillationTask(student, teacher, method='icd+kd', teacher_input_size=(3, 32, 32))
    opt = create_optimizer_v2(task.trainable_module, opt='adamw', lr=1e-3, weight_decay=0.05)
    no_decay = {id(p) for g in opt.param_groups if g['weight_decay'] == 0 for p in g['params']}
    assert id(student.pos_embed) in no_decay and id(student.cls_token) in no_decay and id(task.icd.t) in no_decay
    assert id(task.icd.student_head.weight) not in no_decay
    opt = create_optimizer_v2(task.trainable_module, opt='adamw', lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    scale_of = {id(p): g['lr_scale'] for g in opt.param_groups for p in g['params']}
    assert scale_of[id(task.icd.student_head.weight)] == 1.0 == scale_of[id(student.head.weight)]
    assert scale_of[id(student.patch_embed.proj.weight)] < 0.1


def test_vanilla_needs_no_teacher_and_has_no_heads():
    student, _ = _pair()
    task = ICDDistillationTask(student, None, method='vanilla')
    assert task.teacher is None and task.icd is None
    out = task(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    assert out['loss'].item() == pytest.approx(out['loss_ce'].item())
    assert not any(m._forward_pre_hooks for m in student.modules())


def test_task_state_round_trip_and_hook_removal():
    student, teacher = _pair()
    task = ICDDistillationTask(student, teacher, method='icd', student_input_size=(3, 32, 32),
                               teacher_input_size=(3, 32, 32))
    state = copy.deepcopy(task.get_task_state())  # as a checkpoint write would serialise it
    with torch.no_grad():
        task.icd.t.fill_(2.0)
    task.load_task_state(state)
    assert task.icd.t.item() == 1.0
    task.remove_hooks()
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in student.modules())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in teacher.modules())
    assert task.get_eval_model() is student


def test_create_distiller_from_names_and_teacher_dtype():
    task = create_distiller('test_efficientnet', 'test_resnet', num_classes=3, pretrained_teacher=False,
                            teacher_dtype=torch.bfloat16, student_input_size=(3, 32, 32),
                            teacher_input_size=(3, 32, 32))
    assert task.method == 'icd+kd'
    assert next(task.teacher.parameters()).dtype == torch.bfloat16
    out = task(torch.randn(2, 3, 32, 32), torch.tensor([0, 2]))
    assert out['loss'].dtype == torch.float32 and torch.isfinite(out['loss'])


def test_a_few_steps_of_icd_training_raise_teacher_student_agreement():
    """ICD alone (no labels used by the ICD term) pulls matching student/teacher pairs together."""
    student, teacher = _pair(4, 4, seed=3)
    task = ICDDistillationTask(student, teacher, method='icd', task_loss_weight=0.0, icd_feat_dim=16,
                               student_input_size=(3, 16, 16), teacher_input_size=(3, 16, 16))
    opt = torch.optim.Adam(task.trainable_module.parameters(), lr=3e-3)
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 4, (16,))
    first = None
    for _ in range(30):
        out = task(x, y)
        first = first if first is not None else out['loss_icd'].item()
        opt.zero_grad()
        out['loss'].backward()
        opt.step()
    assert out['loss_icd'].item() < 0.5 * first


def test_sync_batchnorm_converts_the_student_only_and_keeps_every_name():
    student = timm.create_model('test_resnet', num_classes=10)
    teacher = timm.create_model('test_resnet', num_classes=10)
    task = ICDDistillationTask(student, teacher, method='icd+kd', student_input_size=(3, 32, 32), verbose=False)
    keys = list(task.trainable_module.state_dict())
    task.convert_sync_batchnorm()
    kinds = [type(m) for m in task.student.modules()]
    assert torch.nn.SyncBatchNorm in kinds and torch.nn.BatchNorm2d not in kinds
    assert any(type(m) is torch.nn.BatchNorm2d for m in task.teacher.model.modules())  # the teacher is untouched
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in task.icd.modules())
    assert list(task.trainable_module.state_dict()) == keys
    task.eval()
    out = task(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))  # hooks still capture after the swap
    assert torch.isfinite(out['loss']) and out['loss_icd'] > 0


def test_feature_task_is_timms_feature_distillation_loss_exactly():
    from timm.task import FeatureDistillationTask
    from timm_icd.distill import FeatureTask
    torch.manual_seed(0)
    student, teacher = timm.create_model('test_efficientnet', num_classes=10), timm.create_model('test_resnet',
                                                                                                num_classes=7)
    ours = FeatureTask(copy.deepcopy(student), copy.deepcopy(teacher), kd_loss_weight=2.0, verbose=False)
    timms = FeatureDistillationTask(copy.deepcopy(student), copy.deepcopy(teacher), distill_loss_weight=2.0,
                                    verbose=False)
    timms.trainable_module.load_state_dict(ours.trainable_module.state_dict())  # the same random projection
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    a, b = ours(x, y), timms(x, y)
    torch.testing.assert_close(a['loss'], b['loss'])
    torch.testing.assert_close(a['loss_kd'], b['kd_loss'].detach())
    assert ours.method == 'feature' and ours.teacher_classes == 7 and ours.student is ours.trainable_module.student
    assert ours.teacher_logits(x).shape == (6, 7)
