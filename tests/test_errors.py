"""Every bad input is one line on stderr, exit code 2, and leaves an existing run folder byte-for-byte unchanged.

Each case runs train_icd.py against a copy of a finished run with --overwrite, the strongest test that nothing is
touched before the checks pass (and that a run failing later, before its first checkpoint, puts the old run back).
"""
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import safetensors.torch
import timm
import torch
import yaml

from helpers import FAST, REPO, offline_env, run_cli
from timm_icd.data import digits_dataset


class Arbitrary:
    pass


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


@pytest.fixture(scope='module')
def inputs(tmp_path_factory, digits_small):
    """Broken files and datasets, each built from real digits images."""
    root = tmp_path_factory.mktemp('bad')
    dd = digits_dataset()
    train, test = dd['train'].select(range(64)), dd['test'].select(range(16))
    files = {'digits': digits_small}

    safetensors.torch.save_file(timm.create_model('test_resnet', num_classes=1000).state_dict(), root / 'r1000.st')
    files['ckpt1000'] = root / 'r1000.st'
    safetensors.torch.save_file(timm.create_model('test_efficientnet').state_dict(), root / 'eff.safetensors')
    files['wrong_arch'] = root / 'eff.safetensors'
    (root / 'garbage.safetensors').write_bytes(b'\x00\x01not a safetensors file' * 10)
    files['corrupt'] = root / 'garbage.safetensors'
    torch.save(timm.create_model('test_resnet', num_classes=10).state_dict(), root / 'full.pth')
    (root / 'cut.pth').write_bytes((root / 'full.pth').read_bytes()[:5000])
    files['truncated'] = root / 'cut.pth'
    torch.save({'state_dict': {}, 'hook': Arbitrary()}, root / 'code.pth')
    files['needs_code'] = root / 'code.pth'

    def save(name, dd_):
        dd_.save_to_disk(root / name, num_shards={k: 1 for k in dd_})
        files[name] = root / name

    save('no_image', datasets.DatasetDict(
        train=datasets.Dataset.from_dict({'pixels': [[0] * 4] * 8, 'label': [0, 1] * 4})))
    save('no_label', datasets.DatasetDict(train=train.remove_columns('label').add_column('caption', ['x'] * 64)))
    save('bad_label', datasets.DatasetDict(
        train=train.cast_column('label', datasets.Value('int64')).map(
            lambda r, i: {'label': -1 if i == 5 else r['label']}, with_indices=True),
        test=test.cast_column('label', datasets.Value('int64'))))
    save('empty_split', datasets.DatasetDict(train=train, test=test.select([])))

    folder = root / 'imagefolder'
    for split, ds in (('train', train), ('test', test)):
        for i, row in enumerate(ds):
            path = folder / split / str(row['label'])
            path.mkdir(parents=True, exist_ok=True)
            row['image'].save(path / f'{i:03d}.png')
    victim = sorted((folder / 'test').rglob('*.png'))[3]
    victim.write_bytes(victim.read_bytes()[:30])
    files['bad_image'] = f'imagefolder:{folder}'
    files['bad_image_file'] = victim.name

    (root / 'not_yaml.yaml').write_text('epochs: [1\nlr: 0.1\n')
    files['malformed_cfg'] = root / 'not_yaml.yaml'
    (root / 'unknown_key.yaml').write_text(yaml.safe_dump({'epochs': 1, 'learning_rate': 0.1}))
    files['unknown_key_cfg'] = root / 'unknown_key.yaml'
    (root / 'a_file').write_text('not a folder')
    files['a_file'] = root / 'a_file'
    return files


BASE = ['--student', 'test_efficientnet', '--teacher', 'test_resnet', '--teacher-pretrained', 'false', '--epochs', '1',
        '-b', '32', *FAST]

# (id, extra args, expected error line; {name} fills in from the inputs fixture)
CASES = [
    ('unknown-student', ['--student', 'resnet5O'], r"unknown student model 'resnet5O'\. Did you mean: resnet50"),
    ('sync-bn-on-cpu', ['--sync-bn'], r'--sync-bn synchronises BatchNorm statistics across GPUs and needs one'),
    ('decode-device-cuda-on-cpu', ['--decode-device', 'cuda', '--streaming'],
     r'--decode-device cuda decodes JPEGs on the GPU and needs one'),
    ('unknown-teacher', ['--teacher', 'convnext_tinyy'],
     r"unknown teacher model 'convnext_tinyy'\. Did you mean: convnext_tiny"),
    ('no-pretrained-weights', ['--teacher', 'resnet18', '--teacher-pretrained', 'true'],
     r"cannot load pretrained weights for teacher 'resnet18' .*; pass --teacher-checkpoint FILE or "
     r"--teacher-pretrained false\."),
    ('missing-checkpoint', ['--teacher-checkpoint', '/no/such.safetensors'], r'checkpoint not found: /no/such'),
    ('corrupt-checkpoint', ['--teacher-checkpoint', '{corrupt}'], r'corrupt or truncated safetensors file'),
    ('truncated-checkpoint', ['--teacher-checkpoint', '{truncated}'], r'corrupt or truncated checkpoint'),
    ('checkpoint-wrong-shapes', ['--teacher-checkpoint', '{wrong_arch}'],
     r'does not fit ResNet: \d+ missing keys \(e\.g\. conv1\.0\.weight\), \d+ unexpected keys'),
    ('pickle-needs-code', ['--teacher-checkpoint', '{needs_code}'], r'refusing to load .*arbitrary code'),
    ('dataset-folder-missing', ['--dataset', '/no/such/dataset'], r'dataset folder not found: /no/such/dataset'),
    ('dataset-id-unreachable', ['--dataset', 'nobody/no-such-dataset'],
     r"cannot load dataset 'nobody/no-such-dataset' from the Hub"),
    ('no-image-column', ['--dataset', '{no_image}'], r'cannot find an image column among: pixels, label'),
    ('no-label-column', ['--dataset', '{no_label}'], r'cannot find a label column among: image, caption'),
    ('label-out-of-range', ['--dataset', '{bad_label}'], r"row 5 has label -1, outside 0\.\.9"),
    ('empty-split', ['--dataset', '{empty_split}'], r"split 'test' of dataset .* is empty"),
    ('unreadable-image', ['--dataset', '{bad_image}'],
     r"cannot decode the image in row \d+ \(file .*{bad_image_file}\) of split 'test'.*--skip-bad-images"),
    ('batch-larger-than-data', ['-b', '1000'], r"--batch-size 1000 is larger than the 256 rows of split 'train'"),
    ('kd-other-label-space', ['--method', 'kd', '--teacher-checkpoint', '{ckpt1000}', '--teacher-adapt', 'off'],
     r"--method kd needs a teacher that predicts the dataset's classes, but the teacher predicts 1000 classes, the "
     r"dataset has 10: adapt the teacher"),
    ('negative-weight', ['--kd-loss-weight', '-1'], r'--kd-loss-weight must be >= 0, got -1\.0'),
    ('negative-lr', ['--lr', '-0.1'], r'--lr must be > 0, got -0\.1'),
    ('feat-dim-zero', ['--icd-feat-dim', '0'], r'--icd-feat-dim must be >= 1, got 0'),
    ('temperature-zero', ['--kd-temperature', '0'], r'--kd-temperature must be > 0, got 0\.0'),
    ('kd-standardize-without-kd', ['--method', 'vanilla', '--kd-standardize'],
     r'--kd-standardize needs a KD term, which --method vanilla does not have'),
    ('unknown-opt', ['--opt', 'adamwz'], r'--opt adamwz: .*list_optimizers'),
    ('unknown-sched', ['--sched', 'cosinee'], r"--sched cosinee: Unknown scheduler 'cosinee'"),
    ('unknown-method', ['--method', 'distill'], r"argument --method: invalid choice: 'distill'"),
    ('malformed-config', ['--config', '{malformed_cfg}'], r'config file .*not_yaml\.yaml is not valid YAML'),
    ('unknown-config-key', ['--config', '{unknown_key_cfg}'], r"unknown key 'learning_rate'"),
    ('non-finite-loss', ['--lr', '1e12', '--method', 'vanilla'],
     r'non-finite loss at epoch 0 step \d+ \(global step \d+\): loss=(nan|inf), loss_ce=.*, loss_kd=0, '
     r'loss_icd=0; .*No checkpoint was written'),
]


@pytest.mark.parametrize('case_id,args,expected', CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case_id, args, expected, inputs, teacher_run, tmp_path):
    out = tmp_path / 'existing_run'
    shutil.copytree(teacher_run, out)
    before = snapshot(out)
    args = [str(a).format(**inputs) for a in args]
    result = run_cli('--dataset', inputs['digits'], *BASE, *args, '--output', out, '--overwrite')
    check_one_line_error(result, expected.format(**{k: str(v) for k, v in inputs.items()}))
    assert snapshot(out) == before
    assert not (out / '.overwritten-run').exists()


def check_one_line_error(result, expected):
    import re
    assert result.returncode == 2, result.stderr[-3000:]
    assert 'Traceback' not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1, result.stderr[-3000:]
    assert re.search(expected, errors[0]), errors[0]


def test_occupied_unwritable_and_contradictory_outputs(inputs, teacher_run, tmp_path):
    out = tmp_path / 'existing_run'
    shutil.copytree(teacher_run, out)
    before = snapshot(out)
    result = run_cli('--dataset', inputs['digits'], *BASE, '--output', out)
    check_one_line_error(result, r'already holds a run \(args\.yaml, summary\.csv, checkpoints, student\); pass '
                                 r'--resume auto to continue it or --overwrite to replace it')
    result = run_cli('--dataset', inputs['digits'], *BASE, '--output', out, '--resume', 'auto', '--overwrite')
    check_one_line_error(result, r'--resume and --overwrite contradict each other')
    assert snapshot(out) == before
    result = run_cli('--dataset', inputs['digits'], *BASE, '--output', Path(inputs['a_file']) / 'run')
    check_one_line_error(result, r'cannot write to --output .*a_file/run: .*a_file is not a writable folder')
    assert Path(inputs['a_file']).read_text() == 'not a folder'


def test_full_disk_while_saving_keeps_earlier_results(inputs, teacher_run, tmp_path):
    """Writes beyond 200 kB fail (RLIMIT_FSIZE; Python ignores SIGXFSZ), so the first checkpoint cannot be saved."""
    out = tmp_path / 'existing_run'
    shutil.copytree(teacher_run, out)
    before = snapshot(out)

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    cmd = [sys.executable, str(REPO / 'train_icd.py'), '--dataset', str(inputs['digits']), *BASE, '--output', str(out),
           '--overwrite']
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=offline_env(), timeout=300,
                            preexec_fn=small_disk)
    check_one_line_error(result, r'cannot save checkpoint checkpoint-00000008 \(.*a full disk\?\); earlier '
                                 r'checkpoints are intact')
    assert snapshot(out) == before  # the run it was replacing is back, untouched


def test_skip_bad_images_skips_and_counts(inputs, tmp_path):
    import json
    result = run_cli('--dataset', inputs['bad_image'], *BASE, '-b', '16', '--skip-bad-images', '--output',
                     tmp_path / 'run')
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / 'run' / 'student' / 'distillation.json').read_text())
    assert record['dataset']['skipped_images'] == {'train': 0, 'eval': 1}
    assert record['dataset']['eval_rows'] == 15


def test_skip_nonfinite_tolerates_up_to_n_steps(inputs, tmp_path):
    import json
    out = tmp_path / 'run'
    args = ['--dataset', inputs['digits'], *BASE, '--method', 'vanilla', '--lr', '1e12', '--output', out]
    result = run_cli(*args, '--skip-nonfinite', '20')
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'Skipped step 1 with a non-finite loss (loss=nan' in result.stderr
    state = json.loads(next((out / 'checkpoints').iterdir()).joinpath('run_state.json').read_text())
    assert state['nonfinite_steps'] == 7 and state['global_step'] == 8  # only the first of 8 steps was applied
    result = run_cli(*args, '--skip-nonfinite', '3', '--overwrite')
    check_one_line_error(result, r'non-finite loss at epoch 0 step 4 \(global step 4\)')


def test_an_interrupted_set_aside_is_put_back(tmp_path):
    """A kill while --overwrite moves the old run aside must not cost the files not yet moved."""
    from timm_icd.run.checkpoint import claim_output_dir
    out = tmp_path / 'run'
    (out / '.overwritten-run.partial').mkdir(parents=True)
    (out / '.overwritten-run.partial' / 'summary.csv').write_text('moved before the kill')
    (out / 'args.yaml').write_text('not moved yet')
    claim_output_dir(out, overwrite=True)
    backup = out / '.overwritten-run'
    assert (backup / 'summary.csv').read_text() == 'moved before the kill'
    assert (backup / 'args.yaml').read_text() == 'not moved yet'
    assert not (out / '.overwritten-run.partial').exists() and not (out / 'summary.csv').exists()


def test_kd_standardize_needs_a_kd_term_and_the_flags_leave_the_temperature_to_the_resolved_method(tmp_path):
    from timm_icd.run import parse_and_validate
    from timm_icd.base import UserError
    # unset, the temperature is chosen with the method (auto may choose dist): tests/test_logit_losses.py
    assert parse_and_validate([]).kd_temperature is None
    assert parse_and_validate(['--method', 'dist']).kd_temperature is None
    assert parse_and_validate(['--method', 'dist', '--kd-temperature', '4']).kd_temperature == 4.0
    assert parse_and_validate(['--method', 'dkd']).dkd_beta == 2.0  # selected by the study's tuning
    assert parse_and_validate(['--kd-standardize', '--kd-temperature', '4']).kd_temperature == 4.0
    (tmp_path / 'ls.yaml').write_text(yaml.safe_dump({'kd_standardize': True, 'kd_temperature': 3.0}))
    assert parse_and_validate(['--config', str(tmp_path / 'ls.yaml')]).kd_temperature == 3.0
    for ok in (['--method', 'kd'], ['--method', 'icd+kd'], ['--method', 'icd', '--kd-loss-weight', '0.5']):
        assert parse_and_validate([*ok, '--kd-standardize']).kd_standardize is True
    for bad, match in ((['--method', 'icd'], '--method icd does not have'),
                       (['--method', 'kd', '--kd-loss-weight', '0'], '--kd-loss-weight 0 turns off')):
        with pytest.raises(UserError, match=match):
            parse_and_validate([*bad, '--kd-standardize'])
