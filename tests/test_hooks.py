"""Feature capture by hooks: exact pre-logits for every family, pooling of named layers, clean removal."""
import pytest
import timm
import torch

from timm_icd import FeatureHook, UserError, pool_features, probe_feature_dim

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
