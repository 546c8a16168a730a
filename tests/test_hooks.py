"""Feature capture by hooks: exact pre-logits for every family, pooling of named layers, clean removal."""
import pytest
import timm
import torch
import torch.nn as nn

from timm_icd import FeatureHook, ICDDistillationTask, UserError, pool_features, probe_feature_dim

FAMILIES = ['test_resnet', 'test_efficientnet', 'test_vit', 'test_convnext', 'test_byobnet', 'test_mambaout',
            'test_coatnet']


@pytest.mark.parametrize('name', FAMILIES)
def test_classifier_prehook_captures_exact_pre_logits(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7).eval()
    x = torch.randn(2, *model.pretrained_cfg['input_size'])
    with FeatureHook(model) as hook, torch.no_grad():
        logits = model(x)
        features = hook.pop()
        expected = model.forward_head(model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(features, expected, rtol=0, atol=0)
    # the captured vector is what the classifier turned into the logits
    torch.testing.assert_close(model.get_classifier()(features), logits, rtol=1e-5, atol=1e-5)


def test_mobilenetv3_pre_logits_are_1024_wide_not_num_features():
    model = timm.create_model('mobilenetv3_small_100', num_classes=10)
    assert model.num_features == 576
    assert probe_feature_dim(model, (3, 64, 64)) == 1024
    assert model.training  # the dry run restores the mode


def test_named_layer_4d_output_is_average_pooled():
    torch.manual_seed(0)
    model = timm.create_model('test_resnet', num_classes=5).eval()
    seen = {}
    model.layer3.register_forward_hook(lambda m, a, out: seen.setdefault('out', out))
    with FeatureHook(model, 'layer3') as hook, torch.no_grad():
        model(torch.randn(3, 3, 48, 48))
        features = hook.pop()
    assert seen['out'].ndim == 4
    torch.testing.assert_close(features, seen['out'].mean(dim=(2, 3)))


def test_named_layer_3d_tokens_are_averaged():
    torch.manual_seed(0)
    model = timm.create_model('test_vit', num_classes=5).eval()
    seen = {}
    model.blocks[0].register_forward_hook(lambda m, a, out: seen.setdefault('out', out))
    with FeatureHook(model, 'blocks.0') as hook, torch.no_grad():
        model(torch.randn(2, *model.pretrained_cfg['input_size']))
        features = hook.pop()
    assert seen['out'].ndim == 3
    torch.testing.assert_close(features, seen['out'].mean(dim=1))


def test_nhwc_models_are_pooled_over_space():
    model = timm.create_model('test_mambaout', num_classes=5).eval()
    assert model.output_fmt == 'NHWC'
    seen = {}
    model.stages[1].register_forward_hook(lambda m, a, out: seen.setdefault('out', out))
    with FeatureHook(model, 'stages.1') as hook, torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
        features = hook.pop()
    torch.testing.assert_close(features, seen['out'].mean(dim=(1, 2)))
    assert features.shape[1] == seen['out'].shape[-1]


def test_hooks_leave_model_untouched_after_removal():
    torch.manual_seed(0)
    model = timm.create_model('test_efficientnet', num_classes=4).eval()
    keys = list(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    hook = FeatureHook(model)
    hook2 = FeatureHook(model, 'blocks.1')
    with torch.no_grad():
        during = model(x)
    hook.remove()
    hook2.remove()
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(during, before, rtol=0, atol=0)


def test_unknown_layer_names_close_matches():
    model = timm.create_model('test_resnet')
    with pytest.raises(UserError, match="no module named 'layer9'.*layer"):
        FeatureHook(model, 'layer9')


def test_pop_without_forward_is_an_error_and_pool_rejects_5d():
    hook = FeatureHook(timm.create_model('test_resnet'))
    with pytest.raises(RuntimeError, match='No feature was captured'):
        hook.pop()
    with pytest.raises(ValueError, match='5-D'):
        pool_features(torch.zeros(1, 2, 3, 4, 5))


# one tiny model per distinct head structure: (timm name, kwargs shrinking it, input side)
HEAD_STRUCTURES = {
    'linear': ('test_resnet', {}, 32),
    'norm-mlp-head': ('test_convnext', {}, 32),  # NormMlpClassifierHead: get_classifier() is its fc
    'nhwc-classifier-head': ('sequencer2d_s', dict(  # ClassifierHead pooling an NHWC map
        layers=(1, 1, 1, 1), embed_dims=(16, 32, 32, 32), hidden_sizes=(8, 16, 16, 16), img_size=32), 32),
    'tokens': ('test_vit', dict(img_size=32), 32),
    'two-heads': ('crossvit_tiny_240', dict(img_size=120, depth=((1, 1, 0),)), 120),  # ModuleList: concatenated
    'distilled-pair': ('deit_tiny_distilled_patch16_224', dict(img_size=32, depth=1, embed_dim=32, num_heads=2), 32),
    'conv': ('dla46_c', {}, 32),  # a 1x1 conv on the pooled B x C x 1 x 1 map
}


def _distill_step(student, teacher, side):
    size = (3, side, side)
    task = ICDDistillationTask(student, teacher, method='icd+kd', student_input_size=size, teacher_input_size=size,
                               verbose=False)
    out = task(torch.randn(2, *size), torch.tensor([0, 1]))
    out['loss'].backward()
    task.remove_hooks()
    return task, out


@pytest.mark.parametrize('structure', HEAD_STRUCTURES)
def test_every_head_structure_gives_the_pre_logits_and_distills(structure):
    name, kwargs, side = HEAD_STRUCTURES[structure]
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, **kwargs).eval()
    x = torch.randn(2, 3, side, side)
    with FeatureHook(model) as hook, torch.no_grad():
        model(x)
        features = hook.pop()
        reference = model.forward_head(model.forward_features(x), pre_logits=True).flatten(1)
    torch.testing.assert_close(features, reference)
    width = reference.shape[1]
    assert probe_feature_dim(model, (3, side, side), role='student') == width

    task, out = _distill_step(model.train(), timm.create_model('test_resnet', num_classes=5), side)
    assert task.icd.student_head.in_features == width and torch.isfinite(out['loss'])
    assert task.icd.student_head.weight.grad is not None
    model.zero_grad(set_to_none=True)
    task, out = _distill_step(timm.create_model('test_resnet', num_classes=5), model, side)
    assert task.icd.teacher_head.in_features == width and torch.isfinite(out['loss'])
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def _refusal(student, role='student') -> str:
    other = timm.create_model('test_resnet', num_classes=5)
    student, teacher = (student, other) if role == 'student' else (other, student)
    with pytest.raises(UserError) as info:
        ICDDistillationTask(student, teacher, method='icd+kd', student_input_size=(3, 32, 32),
                            teacher_input_size=(3, 32, 32), verbose=False)
    message = str(info.value)
    assert '\n' not in message
    return message


@pytest.mark.parametrize('role', ['student', 'teacher'])
def test_classifier_input_of_another_width_is_refused_before_training(role):
    model = timm.create_model('test_resnet', num_classes=5)
    model.get_classifier = lambda: model.layer4  # its input: layer3's 192-channel map, not the 96-wide pre-logits
    message = _refusal(model, role)
    assert message.startswith(f"cannot take the {role} ResNet's pre-logit feature: its classifier input is 192 wide "
                              f"where forward_head(pre_logits=True) gives 96;")
    assert f'pass --{role}-layer NAME' in message and f'--{role}-layer layer4' in message  # a module to hook


def test_classifier_that_never_runs_and_model_without_classifier_are_refused():
    model = timm.create_model('test_resnet', num_classes=5)
    model.get_classifier = lambda: nn.Linear(96, 5)  # not part of the forward pass
    assert 'the model did not run it' in _refusal(model) and '--student-layer' in _refusal(model)

    class Plain(nn.Module):  # no get_classifier(), no timm API
        num_classes = 5

        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            return self.fc(self.body(x))

    message = _refusal(Plain())
    assert 'no get_classifier()' in message
    assert message.endswith('pass --student-layer NAME to hook another module (e.g. --student-layer body).')
    size = (3, 32, 32)  # a named layer works on the same model
    task = ICDDistillationTask(Plain(), timm.create_model('test_resnet', num_classes=5), method='icd+kd',
                               student_layer='body', student_input_size=size, teacher_input_size=size, verbose=False)
    assert task.icd.student_head.in_features == 8


def test_layer_with_a_row_per_token_is_refused_and_tuple_outputs_pick_the_per_image_tensor():
    class Pair(nn.Module):  # like TNT's blocks: (B*N rows of pixel tokens, B rows of patch tokens)
        def __init__(self):
            super().__init__()
            self.pixels = nn.Flatten(0, 1)  # B x N x C -> B*N x C

        def forward(self, x):
            tokens = x.flatten(2).transpose(1, 2)
            return self.pixels(tokens), tokens

    model = timm.create_model('test_resnet', num_classes=5).eval()
    model.layer2 = nn.Sequential(model.layer2, Pair())
    model.layer3 = nn.Sequential(_First(), model.layer3)
    with FeatureHook(model, 'layer2.1') as hook, torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
        assert hook.pop().shape == (2, 48)
    with pytest.raises(UserError, match=r"student ResNet's layer 'layer2.1.pixels': .* \(32, 48\) for 2 images"):
        probe_feature_dim(model, (3, 32, 32), 'layer2.1.pixels', role='student')


class _First(nn.Module):
    """Rebuild the NCHW map from the (pixel, patch) pair, for the rest of the ResNet."""

    def forward(self, pair):
        tokens = pair[1]
        side = int(tokens.shape[1] ** 0.5)
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)
