"""Any teacher, any dataset: label spaces matched by name (timm's ImageNet tables), teachers re-indexed, and a teacher
of other classes adapted with a linear probe (``distill/label_space.py``, ``distill/probe.py``, ``run/adapt.py``)."""
import csv
import json
import random
import shutil

import datasets
import pytest
import safetensors.torch
import timm
import torch
from timm.data import ImageNetInfo

from helpers import FAST, HELPERS, accelerate_launch, eval_with_timm, offline_env, read_summary, run_cli
from timm_icd.base import UserError
from timm_icd.publish import save_student
from timm_icd.distill import (
    LabelSpace, fit_linear_probe, match_label_space, read_label_map, reindex_classes, resolve_method, set_classifier)

SYNSETS, DESCRIPTIONS = ImageNetInfo().label_names(), ImageNetInfo().label_descriptions()
CIFAR10 = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']


def test_imagenet_synsets_are_the_descriptions_a_datasets_imagenet_uses():
    space = match_label_space(1000, 1000, SYNSETS, DESCRIPTIONS)
    assert space.kind == 'same' and space.index is None
    assert resolve_method('auto', 1000, 1000, SYNSETS, DESCRIPTIONS).name == 'icd+kd'  # was vanilla in v0.3
    assert resolve_method('kd', 1000, 1000, [d.upper() for d in DESCRIPTIONS], SYNSETS).kd_loss_weight > 0
    shouting = match_label_space(1000, 1000, SYNSETS, [f'  {d.upper()} ' for d in DESCRIPTIONS])
    assert shouting.kind == 'same'


def test_a_permuted_label_list_is_re_indexed_and_a_true_mismatch_is_not():
    order = list(range(10))
    random.Random(3).shuffle(order)
    space = match_label_space(10, 10, CIFAR10, [CIFAR10[i].title() for i in order])
    assert space.kind == 'reindexed' and space.index == order
    with pytest.raises(UserError, match="in another order.*re-index the teacher first"):
        resolve_method('kd', 10, 10, CIFAR10, [CIFAR10[i] for i in order])
    other = match_label_space(10, 10, CIFAR10, [f'fashion_{i}' for i in range(10)])
    assert other.kind == 'other' and "are not the dataset's (fashion_0" in other.why
    assert match_label_space(1000, 10, SYNSETS, CIFAR10).kind == 'other'  # no ImageNet class is called 'cat'
    # ImageNet's two 'crane' classes keep their order; a subset by lemma picks the one class it names
    imagenette = ['tench', 'English springer', 'cassette player', 'chain saw', 'church', 'French horn',
                  'garbage truck', 'gas pump', 'golf ball', 'parachute']
    subset = match_label_space(1000, 10, SYNSETS, imagenette)
    assert subset.kind == 'reindexed' and subset.index == [0, 217, 482, 491, 497, 566, 569, 571, 574, 701]
    assert match_label_space(1000, 2, SYNSETS, ['crane', 'crane']).index == [134, 517]
    assert match_label_space(1000, 1, SYNSETS, ['crane']).kind == 'other'  # which crane? names cannot tell


def test_auto_with_an_adapted_teacher_uses_its_own_constant_and_says_why(monkeypatch):
    from timm_icd.distill import methods
    adapted = LabelSpace('adapted', None, "the teacher was adapted to the dataset's classes (other names)")
    assert adapted.predicts_dataset and adapted.in_dataset_order
    chosen = resolve_method('auto', 4, 6, label_space=adapted)
    assert chosen.name == methods.AUTO_ADAPTED and chosen.reason.startswith(
        f"auto chose {methods.AUTO_ADAPTED}: the teacher was adapted to the dataset's classes (other names), and ")
    assert resolve_method('dist', 4, 6, label_space=adapted).logit_loss == 'dist'  # a logit term may use the head
    other = LabelSpace('other', None, "the teacher's classes (a, b, ...) are not the dataset's (c, d, ...)")
    assert resolve_method('auto', 4, 6, label_space=other).name == methods.AUTO_ACROSS_SPACES
    with pytest.raises(UserError, match="needs a teacher that predicts the dataset's classes"):
        resolve_method('dist', 4, 6, label_space=other)
    monkeypatch.setattr(methods, 'AUTO_ADAPTED', 'vanilla')  # a study that finds adapting does not pay
    assert not methods.auto_adapts()
    assert resolve_method('auto', 4, 6, label_space=adapted).name == 'vanilla'
    monkeypatch.setattr(methods, 'AUTO_ADAPTED', 'dist')
    assert methods.auto_adapts() and resolve_method('auto', 4, 6, label_space=adapted).logit_loss == 'dist'


def test_label_maps_and_the_users_word(tmp_path):
    names = ['cat', 'dog', 'bird']
    (tmp_path / 'list.json').write_text(json.dumps([2, 'dog', 0]))
    (tmp_path / 'dict.json').write_text(json.dumps({'bird': 0, 'cat': 2, 'dog': 1}))
    assert read_label_map(str(tmp_path / 'list.json'), ['a', 'b', 'c'], names) == [2, 1, 0]
    assert read_label_map(str(tmp_path / 'dict.json'), names, None) == [2, 1, 0]
    space = match_label_space(3, 3, None, None, label_map=[2, 1, 0])
    assert space.kind == 'reindexed' and space.index == [2, 1, 0]
    assert match_label_space(5, 3, None, None, label_map=[4, 0, 1]).index == [4, 0, 1]
    assert match_label_space(3, 3, ['x', 'y', 'z'], names, same_label_space=True).kind == 'same'
    (tmp_path / 'bad.json').write_text('{"cat": 0')
    for path, message in (('bad.json', 'is not valid JSON'), ('dict.json', "'bird' is not one of the dataset's")):
        with pytest.raises(UserError, match=message):
            read_label_map(str(tmp_path / path), ['cat', 'dog'], None)
    with pytest.raises(UserError, match='must give 3 distinct teacher outputs'):
        match_label_space(3, 3, None, None, label_map=[0, 0, 1])
    with pytest.raises(UserError, match='--same-label-space: the teacher predicts 5 classes but the dataset has 3'):
        match_label_space(5, 3, None, None, same_label_space=True)


@pytest.mark.parametrize('name', ['test_resnet', 'test_vit', 'test_efficientnet'])
def test_reindexed_and_replaced_heads_compute_what_they_should(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7, img_size=32) if 'vit' in name else timm.create_model(
        name, num_classes=7)
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        features = model.forward_head(model.forward_features(x), pre_logits=True)
    reindex_classes(model, [6, 2, 4], ['a', 'b', 'c'])
    with torch.no_grad():
        torch.testing.assert_close(model(x), before[:, [6, 2, 4]], rtol=1e-6, atol=1e-6)
    weight, bias = torch.randn(5, features.shape[1], dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    set_classifier(model, weight.float(), bias.float(), list('vwxyz'))
    with torch.no_grad():
        torch.testing.assert_close(model(x).double(), features.double() @ weight.t() + bias, rtol=1e-5, atol=1e-5)
    assert model.num_classes == 5 and model.pretrained_cfg['label_names'] == list('vwxyz')
    headless = timm.create_model(name, num_classes=0, **({'img_size': 32} if 'vit' in name else {})).eval()
    set_classifier(headless, weight.float(), bias.float())  # a teacher without a classifier gets one
    with torch.no_grad():
        torch.testing.assert_close(headless(x).double(), headless.forward_head(
            headless.forward_features(x), pre_logits=True).double() @ weight.t() + bias, rtol=1e-5, atol=1e-5)


def test_the_linear_probe_is_the_regularised_optimum_chosen_on_the_training_hold_out():
    torch.manual_seed(0)
    centers = torch.randn(4, 16)
    labels = torch.randint(0, 4, (400,))
    features = 3 + 2 * (centers[labels] + 0.8 * torch.randn(400, 16))
    fit = fit_linear_probe(features, labels, 4, l2_grid=(1e-1, 1e-3), holdout=0.1)
    assert fit.holdout_rows == 40 and set(fit.holdout_top1) == {1e-1, 1e-3}
    assert fit.l2 == max(fit.holdout_top1, key=lambda l2: (fit.holdout_top1[l2], l2))
    # the returned head, mapped back to standardised features, has a zero gradient of the objective (float64)
    x = features.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    w = (fit.weight.double() * std).requires_grad_(True)
    b = (fit.bias.double() + fit.weight.double() @ mean).requires_grad_(True)
    z = (x - mean) / std
    loss = torch.nn.functional.cross_entropy(z @ w.t() + b, labels) + fit.l2 * w.pow(2).sum()
    loss.backward()
    assert max(w.grad.abs().max().item(), b.grad.abs().max().item()) < 1e-4


def _teacher_of_other_classes(teacher_run, folder):
    """The teacher_run fixture's teacher, its ten classes renamed: a teacher of ten other classes."""
    shutil.copytree(teacher_run / 'student', folder)
    config = json.loads((folder / 'config.json').read_text())
    config['label_names'] = [f'fashion_{i}' for i in range(10)]
    (folder / 'config.json').write_text(json.dumps(config))
    return folder


def test_a_permuted_teacher_is_re_indexed_and_scores_as_the_original(teacher_run, digits_small, tmp_path):
    order = [3, 1, 4, 0, 5, 9, 2, 6, 8, 7]  # the dataset's class i is the permuted teacher's output order[i]
    teacher = tmp_path / 'permuted'
    shutil.copytree(teacher_run / 'student', teacher)
    weights = safetensors.torch.load_file(teacher / 'model.safetensors')
    inverse = [order.index(j) for j in range(10)]
    for key in ('fc.weight', 'fc.bias'):
        weights[key] = weights[key][inverse].contiguous()
    safetensors.torch.save_file(weights, teacher / 'model.safetensors')
    config = json.loads((teacher / 'config.json').read_text())
    config['label_names'] = [f' Digit {inverse[j]}' for j in range(10)]
    (teacher / 'config.json').write_text(json.dumps(config))
    labels = tmp_path / 'labels'
    datasets_dir = shutil.copytree(digits_small, labels)
    names = [f'digit {i}' for i in range(10)]
    for split in ('train', 'test'):
        path = datasets_dir / split / 'dataset_info.json'
        info = json.loads(path.read_text())
        info['features']['label']['names'] = names
        path.write_text(json.dumps(info))
    out = tmp_path / 'run'
    result = run_cli('--teacher', f'local-dir:{teacher}', '--student', 'test_resnet', '--dataset', labels,
                     '--method', 'kd', '--epochs', '1', '-b', '32', '--output', out, *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the dataset's 10 classes are the teacher's in another order: its logits are re-indexed" in result.stderr
    record = json.loads((out / 'student' / 'distillation.json').read_text())
    original, _, _ = eval_with_timm(teacher_run / 'student', digits_small, data_config_of=out / 'student')
    assert record['teacher']['top1'] == pytest.approx(original, abs=1e-9) and record['teacher']['adapted'] is None
    assert not (out / 'teacher_adapted').exists()


@pytest.mark.long
def test_two_processes_fit_the_head_one_does_and_hold_it_alike(teacher_run, digits_small, tmp_path):
    teacher = _teacher_of_other_classes(teacher_run, tmp_path / 'teacher')
    common = ['--teacher', f'local-dir:{teacher}', '--student', 'test_efficientnet', '--dataset', digits_small,
              '--epochs', '1', '-b', '16', *FAST]
    one = run_cli(*common, '--output', tmp_path / 'one')
    assert one.returncode == 0, one.stderr[-3000:]
    dumps = tmp_path / 'dumps'
    dumps.mkdir()
    two = accelerate_launch(str(HELPERS / 'dist_worker.py'), dumps, *common, '--output',
                            tmp_path / 'two')
    assert two.returncode == 0, two.stderr[-4000:]
    heads = [safetensors.torch.load_file(dumps / f'teacher{rank}.safetensors') for rank in (0, 1)]
    saved = safetensors.torch.load_file(tmp_path / 'two' / 'teacher_adapted' / 'model.safetensors')
    single = safetensors.torch.load_file(tmp_path / 'one' / 'teacher_adapted' / 'model.safetensors')
    for key in ('fc.weight', 'fc.bias'):
        assert torch.equal(heads[0][key], heads[1][key]) and torch.equal(heads[0][key], saved[key])
        torch.testing.assert_close(saved[key], single[key], rtol=1e-3, atol=1e-4)  # features batched otherwise
    manifests = [json.loads((tmp_path / run / 'teacher_adapted' / 'adaptation.json').read_text())
                 for run in ('one', 'two')]
    assert [m['processes'] for m in manifests] == [1, 2] and manifests[0]['fit']['l2'] == manifests[1]['fit']['l2']
    assert manifests[0]['features'] == manifests[1]['features'] == {'rows': 256, 'dim': 96,
                                                                    'view': 'eval transform, one pass'}


def test_a_kill_during_adaptation_leaves_nothing_half_read_and_resume_reuses_the_fit(
        teacher_run, digits_small, tmp_path):
    teacher = _teacher_of_other_classes(teacher_run, tmp_path / 'teacher')
    out = tmp_path / 'run'
    args = ['--teacher', f'local-dir:{teacher}', '--student', 'test_resnet', '--dataset', digits_small, '--epochs',
            '2', '-b', '32', '--output', out, *FAST]
    killed = run_cli(*args, script='tests/helpers/train_crash.py', env=offline_env(TIMM_ICD_CRASH_AT='adapt_saved:1'))
    assert killed.returncode == -9 and (out / 'teacher_adapted' / 'model.safetensors').exists()
    assert not (out / 'teacher_adapted' / 'adaptation.json').exists()  # the folder is not valid without it
    killed = run_cli(*args, '--resume', 'auto', script='tests/helpers/train_crash.py',
                     env=offline_env(TIMM_ICD_CRASH_AT='step:10'))  # refits, then dies in epoch 1
    assert killed.returncode == -9 and 'Teacher adaptation (linear probe)' in killed.stderr
    fitted = (out / 'teacher_adapted' / 'model.safetensors').read_bytes()
    resumed = run_cli(*args, '--resume', 'auto')
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'Teacher adaptation: reusing' in resumed.stderr and 'Linear probe' not in resumed.stderr
    assert (out / 'teacher_adapted' / 'model.safetensors').read_bytes() == fitted
    record = json.loads((out / 'student' / 'distillation.json').read_text())
    assert record['method'] == 'icd+kd' and record['teacher']['adapted']['mode'] == 'linear'


def test_finetune_trains_the_whole_teacher_from_its_probe(teacher_run, digits_small, tmp_path):
    teacher = _teacher_of_other_classes(teacher_run, tmp_path / 'teacher')
    out = tmp_path / 'run'
    result = run_cli('--teacher', f'local-dir:{teacher}', '--student', 'test_resnet', '--dataset', digits_small,
                     '--method', 'dist', '--teacher-adapt', 'finetune', '--teacher-adapt-epochs', '1', '--epochs', '1',
                     '-b', '32', '--output', out, *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    stages = out / 'teacher_adapted-stages'
    probe = safetensors.torch.load_file(stages / 'linear' / 'model.safetensors')
    tuned = safetensors.torch.load_file(out / 'teacher_adapted' / 'model.safetensors')
    original = safetensors.torch.load_file(teacher / 'model.safetensors')
    trained = [k for k in tuned if k.startswith('layer') and k.endswith('weight')]
    assert trained and all(torch.equal(probe[k], original[k]) for k in trained)  # the probe trains the head alone
    assert all(not torch.equal(tuned[k], probe[k]) for k in trained)  # fine-tuning trains every layer
    manifest = json.loads((out / 'teacher_adapted' / 'adaptation.json').read_text())
    assert manifest['valid_for']['mode'] == 'finetune' and manifest['valid_for']['finetune']['epochs'] == 1
    rows = list(csv.DictReader(open(stages / 'finetune' / 'summary.csv')))
    assert manifest['finetune']['top1'] == pytest.approx(float(rows[-1]['eval_top1'])) and len(rows) == 1
    assert manifest['finetune']['lr'] == pytest.approx(0.05 / 10)  # a tenth of the run's lr
    record = json.loads((out / 'student' / 'distillation.json').read_text())
    assert record['method'] == 'dist' and record['teacher']['adapted']['mode'] == 'finetune'
    assert float(read_summary(out)[0]['train_loss_kd']) > 0
    checkpoint = next((out / 'checkpoints').iterdir())
    assert not any('teacher' in p.name for p in checkpoint.iterdir())  # the run's checkpoints hold the student alone


def test_adaptation_bad_inputs_end_in_one_line(teacher_run, digits_small, tmp_path):
    teacher = _teacher_of_other_classes(teacher_run, tmp_path / 'teacher')
    common = ['--teacher', f'local-dir:{teacher}', '--student', 'test_resnet', '--dataset', digits_small,
              '--epochs', '1', '-b', '32', *FAST]
    shared = tmp_path / 'shared'
    first = run_cli(*common, '--teacher-adapt-dir', shared, '--output', tmp_path / 'a')
    assert first.returncode == 0, first.stderr[-3000:]
    (tmp_path / 'map.json').write_text('[0, 1, 2]')
    headless = tmp_path / 'headless'
    save_student(timm.create_model('test_resnet', num_classes=0), headless, {'input_size': (3, 16, 16)})
    unlabelled = tmp_path / 'unlabelled'
    datasets.load_from_disk(digits_small).remove_columns('label').save_to_disk(unlabelled)
    cases = [
        (['--teacher-adapt-dir', shared, '--teacher-adapt-augment', '1'],
         f'error: {shared} holds a teacher adapted with other augment, augment_passes, seed; point --teacher-adapt-dir '
         f'elsewhere, or pass --overwrite to replace it.'),
        (['--teacher-label-map', tmp_path / 'nothing.json'], f'error: --teacher-label-map: no file '
                                                             f'{tmp_path / "nothing.json"}.'),
        (['--teacher-label-map', tmp_path / 'map.json'], 'error: --teacher-label-map must give 10 distinct teacher '
                                                         'outputs (0 to 9), one per dataset class; it gives 3.'),
        (['--teacher-adapt-augment', '-1'], 'error: --teacher-adapt-augment must be >= 0, got -1.'),
        (['--teacher-adapt', 'probe'], "error: argument --teacher-adapt: invalid choice: 'probe'"),
        (['--teacher', f'local-dir:{headless}', '--teacher-adapt', 'off', '--method', 'kd'],
         "error: --method kd needs a teacher that predicts the dataset's classes, but the teacher predicts 0 classes, "
         "the dataset has 10: adapt the teacher"),
        (['--label-column', 'image'], "error: column 'image' of split 'train' is not a label column: it holds Image "
                                      "values, not class indices; name the label column with --label-column."),
        (['--dataset', unlabelled], 'error: cannot find a label column among: image; name it with --label-column.'),
    ]
    for extra, message in cases:
        result = run_cli(*common, *extra, '--output', tmp_path / 'b')
        assert result.returncode == 2, (extra, result.stderr[-2000:])
        assert result.stderr.strip().splitlines()[-1].startswith(message), (extra, result.stderr[-500:])
        assert not (tmp_path / 'b').exists()
    # another student on the same shared adaptation reuses it; a teacher cache keys on the adapted head
    cache = tmp_path / 'cache'
    second = run_cli(*common, '--teacher-adapt-dir', shared, '--teacher-cache', cache, '--output', tmp_path / 'c')
    assert second.returncode == 0 and 'Teacher adaptation: reusing' in second.stderr, second.stderr[-3000:]
    other = run_cli(*common, '--teacher-adapt', 'off', '--method', 'icd', '--teacher-cache', cache, '--output',
                    tmp_path / 'd')
    assert other.returncode == 2 and 'teacher_weights' in other.stderr.strip().splitlines()[-1], other.stderr[-2000:]
