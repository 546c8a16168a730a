"""Student/teacher creation and safe weight loading."""
import json
import os
import subprocess
import sys

import pytest
import safetensors.torch
import timm
import torch

from timm_icd import UserError, create_student, create_teacher, load_weights_file
from timm_icd.publish.export import save_student


class NotAWeight:
    pass


def test_teacher_from_safetensors_takes_the_checkpoint_label_space(tmp_path):
    source = timm.create_model('test_resnet', num_classes=7)
    safetensors.torch.save_file(source.state_dict(), tmp_path / 'w.safetensors')
    teacher = create_teacher('test_resnet', num_classes=3, checkpoint=str(tmp_path / 'w.safetensors'))
    assert teacher.num_classes == 7 and not teacher.training
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), source.state_dict().values()))
    assert all(not p.requires_grad for p in teacher.parameters())


def test_teacher_from_wrapped_torch_checkpoint(tmp_path):
    source = timm.create_model('test_resnet', num_classes=4)
    torch.save({'epoch': 3, 'state_dict': {f'module.{k}': v for k, v in source.state_dict().items()}},
               tmp_path / 'ckpt.pth.tar')
    teacher = create_teacher('test_resnet', checkpoint=str(tmp_path / 'ckpt.pth.tar'))
    torch.testing.assert_close(teacher.fc.weight, source.fc.weight)


def test_timm_training_checkpoint_with_args_namespace_loads(tmp_path):
    import argparse
    source = timm.create_model('test_resnet', num_classes=3)
    torch.save({'epoch': 9, 'arch': 'test_resnet', 'state_dict': source.state_dict(),
                'args': argparse.Namespace(lr=0.1, model='test_resnet')}, tmp_path / 'model_best.pth.tar')
    teacher = create_teacher('test_resnet', checkpoint=str(tmp_path / 'model_best.pth.tar'))
    torch.testing.assert_close(teacher.fc.weight, source.fc.weight)


def test_pickle_that_needs_code_is_refused(tmp_path):
    torch.save({'state_dict': {'w': torch.zeros(1)}, 'extra': NotAWeight()}, tmp_path / 'evil.pth')
    with pytest.raises(UserError, match='refusing to load.*arbitrary code'):
        load_weights_file(str(tmp_path / 'evil.pth'))


def test_truncated_and_missing_and_mismatched_checkpoints(tmp_path):
    source = timm.create_model('test_resnet', num_classes=4)
    safetensors.torch.save_file(source.state_dict(), tmp_path / 'w.safetensors')
    data = (tmp_path / 'w.safetensors').read_bytes()
    (tmp_path / 'cut.safetensors').write_bytes(data[:len(data) // 2])
    with pytest.raises(UserError, match='corrupt or truncated'):
        create_teacher('test_resnet', checkpoint=str(tmp_path / 'cut.safetensors'))
    with pytest.raises(UserError, match='checkpoint not found'):
        create_teacher('test_resnet', checkpoint=str(tmp_path / 'nope.safetensors'))
    with pytest.raises(UserError, match='does not fit EfficientNet: .* missing keys'):
        create_teacher('test_efficientnet', checkpoint=str(tmp_path / 'w.safetensors'))
    bigger = {k: (torch.zeros(v.shape[0] + 1, *v.shape[1:]) if k == 'layer1.0.bn1.weight' else v)
              for k, v in source.state_dict().items()}
    safetensors.torch.save_file(bigger, tmp_path / 'bigger.safetensors')
    with pytest.raises(UserError, match=r'1 wrongly shaped keys \(e\.g\. layer1\.0\.bn1\.weight\)'):
        create_teacher('test_resnet', checkpoint=str(tmp_path / 'bigger.safetensors'))


def test_unknown_names_suggest_close_timm_names():
    with pytest.raises(UserError, match="unknown teacher model 'resnet5O'.*resnet50"):
        create_teacher('resnet5O')
    with pytest.raises(UserError, match='no config.json'):
        create_student('local-dir:/nonexistent', 10)


def test_student_gets_dataset_classes_and_pretrained_defaults(tmp_path):
    student = create_student('test_vit', 5)
    assert student.num_classes == 5
    source = timm.create_model('test_vit', num_classes=5)
    timm.models.save_for_hf(source, tmp_path / 's', safe_serialization=True)
    loaded = create_student(f'local-dir:{tmp_path / "s"}', 5)  # hub/local students load their weights
    torch.testing.assert_close(loaded.head.weight, source.head.weight)
    resized = create_student(f'local-dir:{tmp_path / "s"}', 3)
    assert resized.num_classes == 3
    torch.testing.assert_close(resized.blocks[0].mlp.fc1.weight, source.blocks[0].mlp.fc1.weight)


def test_missing_pretrained_weights_name_the_checkpoint_flag():
    code = ("from timm_icd import create_teacher\n"
            "try:\n    create_teacher('resnet18')\nexcept Exception as e:\n    print(type(e).__name__, e)")
    env = {**os.environ, 'HF_HUB_OFFLINE': '1'}
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.startswith('UserError cannot load pretrained weights for teacher')
    assert '--teacher-checkpoint' in out.stdout


def test_save_student_failure_is_one_user_error_and_leaves_the_old_folder(tmp_path):
    model = timm.create_model('test_resnet', num_classes=3)
    config = {'input_size': (3, 16, 16), 'mean': (0.5,) * 3, 'std': (0.5,) * 3}
    folder = save_student(model, tmp_path / 'student', config, ['a', 'b', 'c'])
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    (tmp_path / '.tmp-student').write_text('a file where the temporary folder must go')
    tmp_path.chmod(0o500)  # nothing new can be created beside the folder
    try:
        with pytest.raises(UserError, match=r'cannot save the student to .*student .*rerun with --resume auto'):
            save_student(model, folder, config, ['a', 'b', 'c'])
    finally:
        tmp_path.chmod(0o700)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_tensors_sharing_storage_are_saved_apart_so_safetensors_accepts_them(tmp_path):
    """coat ties weights: safetensors refuses shared tensors, so the student folder writes them as copies."""
    import safetensors.torch
    from timm_icd.publish.export import _unshared
    weight = torch.randn(4, 3)
    state = {'a': weight, 'b': weight, 'c': weight[1:], 'd': torch.randn(2), 'e': torch.empty(0)}
    with pytest.raises(RuntimeError):
        safetensors.torch.save_file(state, tmp_path / 'shared.safetensors')
    safetensors.torch.save_file(_unshared(state), tmp_path / 'apart.safetensors')
    back = safetensors.torch.load_file(tmp_path / 'apart.safetensors')
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor)
    assert _unshared(state)['a'] is weight  # the first holder of a storage is kept as it is


def test_a_saved_student_describes_itself_not_the_architectures_default_weights(tmp_path):
    """No borrowed tag, paper or origin in config.json; the description names the run without local paths."""
    model = timm.create_model('resnet18', num_classes=3)
    assert model.pretrained_cfg['tag'] and model.pretrained_cfg['paper_ids']  # timm's default weights' provenance
    record = {'student': 'resnet18', 'method': 'icd+kd', 'teacher': {'name': 'local-dir:/home/someone/runs/t/student'},
              'dataset': {'name': 'imagefolder:/home/someone/data/flowers'}}
    save_student(model, tmp_path / 'student', {'input_size': (3, 32, 32), 'mean': (0.5,) * 3, 'std': (0.5,) * 3},
                 ['a', 'b', 'c'], record)
    cfg = json.loads((tmp_path / 'student' / 'config.json').read_text())['pretrained_cfg']
    assert not {'tag', 'paper_ids', 'origin_url', 'license'} & set(cfg)
    assert cfg['description'] == ('resnet18 distilled with timm_icd (icd+kd) from local-dir:student on '
                                  'imagefolder:flowers; see distillation.json')
    assert model.pretrained_cfg['tag'] == 'a1_in1k'  # the model itself is left as it was
    reloaded = timm.create_model(f'local-dir:{tmp_path / "student"}', pretrained=True)
    assert reloaded.pretrained_cfg['description'] == cfg['description'] and not reloaded.pretrained_cfg.get('tag')


def test_public_record_shortens_every_local_path_and_keeps_the_rest():
    from timm_icd.publish.export import public_record
    record = {'student': 'local-dir:/home/u/runs/a/student', 'method': 'icd',
              'teacher': {'name': 'resnet50', 'source': 'checkpoint:/home/u/w/teacher.safetensors', 'top1': 80.0},
              'dataset': {'name': '/home/u/data/flowers', 'train_rows': 10},
              'command': "train_icd.py --dataset imagefolder:/home/u/data/flowers --output=/home/u/runs/a "
                         "--teacher resnet50 --student 'local-dir:/home/u/my runs/s' --dataset-x uoft-cs/cifar100"}
    public = public_record(record)
    assert public['student'] == 'local-dir:student' and public['dataset']['name'] == 'flowers'
    assert public['teacher'] == {'name': 'resnet50', 'source': 'checkpoint:teacher.safetensors', 'top1': 80.0}
    assert public['command'] == ("train_icd.py --dataset imagefolder:flowers --output=a --teacher resnet50 --student "
                                 "local-dir:s --dataset-x uoft-cs/cifar100")
    assert '/home/u' not in json.dumps(public) and record['dataset']['name'] == '/home/u/data/flowers'
