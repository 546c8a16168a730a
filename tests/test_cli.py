"""train_icd.py as users run it: real subprocesses on real digits images, checked by value."""
import json

import pytest
import safetensors.torch
import timm
import torch
import yaml

from helpers import FAST, eval_with_timm, read_summary, run_cli


def test_vanilla_teacher_learns_and_writes_a_timm_folder(teacher_run, digits_small):
    rows = read_summary(teacher_run)
    assert [r['epoch'] for r in rows] == ['0', '1', '2']
    assert float(rows[-1]['eval_top1']) > 40.0  # chance is 10%
    assert float(rows[-1]['train_loss_kd']) == 0.0 and float(rows[-1]['train_loss_icd']) == 0.0
    top1, _, _ = eval_with_timm(teacher_run / 'student', digits_small)
    assert top1 == pytest.approx(float(rows[-1]['eval_top1']), abs=1e-9)
    args = yaml.safe_load((teacher_run / 'args.yaml').read_text())
    assert args['method'] == 'vanilla' and args['student'] == 'test_resnet'


def test_icd_kd_distillation_end_to_end(teacher_run, digits_small, tmp_path):
    out = tmp_path / 'distill'
    # the teacher's interpolation, so the teacher sees its own preprocessing up to the exact re-normalisation
    result = run_cli('--teacher', f'local-dir:{teacher_run / "student"}', '--student', 'test_efficientnet',
                     '--dataset', digits_small, '--epochs', '2', '-b', '32', '--output', out,
                     '--interpolation', 'bilinear', *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'auto chose icd+kd' in result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith('done: icd+kd student top-1')
    rows = read_summary(out)
    assert len(rows) == 2 and all(float(r['train_loss_icd']) > 0 and float(r['train_loss_kd']) > 0 for r in rows)
    assert all(int(r['eval_count']) == 72 for r in rows)

    # the student folder is plain timm: right config, no ICD heads, same accuracy as logged
    config = json.loads((out / 'student' / 'config.json').read_text())
    assert config['architecture'] == 'test_efficientnet' and config['num_classes'] == 10
    assert config['label_names'] == [str(i) for i in range(10)]
    assert config['pretrained_cfg']['input_size'] == [3, 16, 16]
    assert config['pretrained_cfg']['mean'] == list(timm.create_model('test_efficientnet').pretrained_cfg['mean'])
    weights = safetensors.torch.load_file(out / 'student' / 'model.safetensors')
    assert set(weights) == set(timm.create_model('test_efficientnet', num_classes=10).state_dict())
    top1, model, x = eval_with_timm(out / 'student', digits_small)
    assert top1 == pytest.approx(float(rows[-1]['eval_top1']), abs=1e-9)

    # same outputs as the model in training: the last checkpoint's student part gives identical logits
    ckpt = sorted((out / 'checkpoints').iterdir())[-1]
    trained = safetensors.torch.load_file(ckpt / 'model.safetensors')
    assert any(k.startswith('icd.') for k in trained)  # heads and t are checkpointed with the student
    twin = timm.create_model('test_efficientnet', num_classes=10)
    twin.load_state_dict({k[len('student.'):]: v for k, v in trained.items() if k.startswith('student.')})
    with torch.no_grad():
        torch.testing.assert_close(model(x), twin.eval()(x), rtol=0, atol=0)

    record = json.loads((out / 'student' / 'distillation.json').read_text())
    teacher_rows = read_summary(teacher_run)
    assert record['method'] == 'icd+kd' and record['loss_weights'] == {'task': 1.0, 'kd': 1.0, 'icd': 1.0}
    assert record['teacher']['top1'] == pytest.approx(float(teacher_rows[-1]['eval_top1']), abs=100 / 72 + 1e-9)
    assert record['top1'] == pytest.approx(float(rows[-1]['eval_top1']))
    assert record['icd']['tau_final'] == pytest.approx(float(trained['icd.t'].exp().clamp(max=10)), rel=1e-6)
    assert record['command'].startswith('train_icd.py --teacher local-dir:')


def test_icd_from_a_checkpoint_teacher_with_another_label_space(digits_small, tmp_path):
    big = timm.create_model('test_vit', num_classes=1000, img_size=16)
    safetensors.torch.save_file(big.state_dict(), tmp_path / 'vit1000.safetensors')
    out = tmp_path / 'run'
    result = run_cli('--teacher', 'test_vit', '--teacher-checkpoint', tmp_path / 'vit1000.safetensors',
                     '--teacher-input-size', '3', '16', '16', '--student', 'test_resnet', '--dataset', digits_small,
                     '--epochs', '1', '-b', '32', '--output', out, '--teacher-layer', 'blocks.1', '--method', 'icd',
                     *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'Method icd as asked' in result.stderr
    record = json.loads((out / 'student' / 'distillation.json').read_text())
    assert record['method'] == 'icd' and record['teacher']['top1'] is None
    assert record['icd']['teacher_layer'] == 'blocks.1'
    assert float(read_summary(out)[0]['train_loss_kd']) == 0.0


@pytest.mark.parametrize('args,message', [
    (['--student', 'resnet5O'], "error: unknown student model 'resnet5O'. Did you mean: resnet50"),
    (['--dataset', '/no/such/folder'], 'error: dataset folder not found: /no/such/folder.'),
    (['--method', 'kd', '--teacher', 'test_resnet', '--teacher-checkpoint', '{ckpt1000}', '--teacher-adapt', 'off'],
     "error: --method kd needs a teacher that predicts the dataset's classes, but the teacher predicts 1000 classes, "
     "the dataset has 10: adapt the teacher (--teacher-adapt linear, what auto does)"),
])
def test_user_errors_are_one_line_and_exit_2(args, message, tmp_path, digits_small):
    safetensors.torch.save_file(timm.create_model('test_resnet', num_classes=1000).state_dict(),
                                tmp_path / 'r1000.safetensors')
    args = [a.format(ckpt1000=tmp_path / 'r1000.safetensors') for a in args]
    base = ['--dataset', digits_small, '--student', 'test_efficientnet', '--output', tmp_path / 'o', '--epochs', '1']
    result = run_cli(*base, *args, *FAST)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(message), result.stderr[-2000:]
    assert 'Traceback' not in result.stderr
    assert [line for line in lines if line.startswith('error:')] == [lines[-1]]


def test_yaml_config_sets_flags_and_command_line_wins(digits_small, tmp_path):
    cfg = tmp_path / 'cfg.yaml'
    cfg.write_text(yaml.safe_dump({'method': 'vanilla', 'student': 'test_resnet', 'epochs': 2, 'batch-size': 48,
                                   'lr': 0.2, 'sched': 'step', 'decay_epochs': 1, 'decay_rate': 0.5,
                                   'dataset': digits_small}))
    out = tmp_path / 'run'
    result = run_cli('--config', cfg, '--epochs', '1', '--output', out, *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    args = yaml.safe_load((out / 'args.yaml').read_text())
    assert (args['batch_size'], args['lr'], args['epochs'], args['sched']) == (48, 0.2, 1, 'step')
    rows = read_summary(out)
    assert len(rows) == 1 and float(rows[0]['lr']) == pytest.approx(0.2)
    cfg.write_text('epochs: 1\nbatch_sise: 8\n')
    result = run_cli('--config', cfg, '--output', tmp_path / 'run2')
    assert result.returncode == 2 and f"error: config file {cfg}: unknown key 'batch_sise'." in result.stderr


def test_timm_augmentation_bf16_and_grad_accumulation(digits_small, tmp_path):
    out = tmp_path / 'run'
    result = run_cli('--teacher', 'test_resnet', '--teacher-pretrained', 'false', '--student', 'test_efficientnet',
                     '--dataset', digits_small, '--epochs', '1', '-b', '32', '--output', out, '--mixup', '0.4',
                     '--cutmix', '0.4', '--smoothing', '0.1', '--aa', 'rand-m9-mstd0.5', '--reprob', '0.25',
                     '--mixed-precision', 'bf16', '--grad-accum-steps', '2', '--save-best', '--checkpoint-steps', '1',
                     '--keep-checkpoints', '100', *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    row = read_summary(out)[0]
    assert all(float(row[k]) > 0 for k in ('train_loss_ce', 'train_loss_kd', 'train_loss_icd'))
    ckpts = sorted((out / 'checkpoints').iterdir())
    # a checkpoint after every update, never between the two batches of one: global steps 2, 4, 6 and 8
    assert [p.name for p in ckpts] == [f'checkpoint-0000000{i}' for i in (2, 4, 6, 8)]
    state = json.loads(ckpts[-1].joinpath('run_state.json').read_text())
    assert state['global_step'] == 8 and state['num_updates'] == 4  # 256 rows / 32 per batch, 2 per update
    best = json.loads((out / 'student_best' / 'distillation.json').read_text())
    assert best['best_epoch'] == 0 and best['top1'] == pytest.approx(float(row['eval_top1']))


def test_a_teacher_of_other_classes_is_adapted_and_distills_with_logits(teacher_run, digits_small, tmp_path):
    """Ten classes are not the dataset's ten classes: label names decide. With nothing but teacher, student and data,
    the teacher gets a linear probe head for the dataset's classes and auto distills with a logit term; with
    --teacher-adapt off, logit KD is refused and auto trains without the teacher (the first study's decision)."""
    import shutil
    teacher = tmp_path / 'teacher'
    shutil.copytree(teacher_run / 'student', teacher)
    config = json.loads((teacher / 'config.json').read_text())
    assert config['label_names'] == [str(i) for i in range(10)]  # what a digits run saves
    config['label_names'] = [f'fashion_{i}' for i in range(10)]
    (teacher / 'config.json').write_text(json.dumps(config))
    common = ['--teacher', f'local-dir:{teacher}', '--student', 'test_efficientnet', '--dataset', digits_small,
              '--epochs', '1', '-b', '32', *FAST]
    refused = run_cli(*common, '--method', 'kd', '--teacher-adapt', 'off', '--output', tmp_path / 'kd')
    assert refused.returncode == 2 and not (tmp_path / 'kd').exists()
    assert refused.stderr.strip().splitlines()[-1].startswith("error: --method kd needs a teacher that predicts the "
                                                              "dataset's classes, but the teacher's classes (fashion_0")
    off = run_cli(*common, '--teacher-adapt', 'off', '--output', tmp_path / 'off')
    assert off.returncode == 0, off.stderr[-3000:]
    assert "auto chose vanilla: the teacher's classes (fashion_0, fashion_1, fashion_2, ...) are not the dataset's " \
           "(0, 1, 2, ...)" in off.stderr and '--method icd still distills its features' in off.stderr
    record = json.loads((tmp_path / 'off' / 'student' / 'distillation.json').read_text())
    assert record['method'] == 'vanilla' and record['teacher'] is None

    result = run_cli(*common, '--output', tmp_path / 'auto')  # nothing else: the headline command
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / 'auto'
    record = json.loads((out / 'student' / 'distillation.json').read_text())
    adapted = record['teacher']['adapted']
    assert record['method'] == 'icd+kd' and record['teacher']['num_classes'] == 10
    assert "auto chose icd+kd: the teacher was adapted to the dataset's classes (the teacher's classes (fashion_0" \
           in result.stderr and 'protocol2.md, C3' in result.stderr  # AUTO_ADAPTED, until the second study decides
    assert adapted['mode'] == 'linear'
    assert adapted['features'] == {'rows': 256, 'dim': 96, 'view': 'eval transform, one pass'}
    assert float(read_summary(out)[0]['train_loss_kd']) > 0
    # the adapted teacher is a plain timm folder: timm loads it, and its top-1 is the one the run recorded
    manifest = json.loads((out / 'teacher_adapted' / 'adaptation.json').read_text())
    assert manifest['fit']['holdout_top1'] == adapted['holdout_top1']
    assert adapted['folder'] == str(out / 'teacher_adapted')
    loaded = timm.create_model(f'local-dir:{out / "teacher_adapted"}')
    assert loaded.num_classes == 10 and loaded.pretrained_cfg['label_names'] == [str(i) for i in range(10)]
    top1, _, _ = eval_with_timm(out / 'teacher_adapted', digits_small, data_config_of=out / 'student')
    assert record['teacher']['top1'] == pytest.approx(top1, abs=100 / 72 + 1e-9)  # normalised in another order
    teacher_line = f"Teacher on 'test': top-1 {record['teacher']['top1']:.2f}%"
    assert teacher_line in result.stderr and result.stderr.index(teacher_line) < result.stderr.index('Epoch 0:')
    student_top1, _, _ = eval_with_timm(out / 'student', digits_small)
    assert student_top1 == pytest.approx(record['top1'], abs=1e-9)


def test_model_ema_is_evaluated_every_epoch_and_saved_as_its_own_student(digits_small, teacher_run, tmp_path):
    out = tmp_path / 'ema'
    result = run_cli('--method', 'icd', '--teacher', 'test_resnet', '--teacher-pretrained', 'false', '--student',
                     'test_resnet', '--dataset', digits_small, '--epochs', '2', '-b', '32', '--model-ema',
                     '--model-ema-decay', '0.7', '--output', out, *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_summary(out)
    assert all(0 <= float(r['eval_ema_top1']) <= 100 for r in rows) and 'EMA top-1' in result.stderr
    top1, _, _ = eval_with_timm(out / 'student_ema', digits_small)  # plain timm agrees with the logged EMA accuracy
    assert top1 == pytest.approx(float(rows[-1]['eval_ema_top1']), abs=1e-9)
    student = safetensors.torch.load_file(out / 'student' / 'model.safetensors')
    ema = safetensors.torch.load_file(out / 'student_ema' / 'model.safetensors')
    assert student.keys() == ema.keys()  # the bare student: no ICD heads
    assert any(not torch.equal(student[k], ema[k]) for k in student if student[k].is_floating_point())
    record = json.loads((out / 'student_ema' / 'distillation.json').read_text())
    assert record['weights'] == 'EMA of the student (decay 0.7)' and record['top1'] == float(rows[-1]['eval_ema_top1'])
    refused = run_cli('--dataset', digits_small, '--push-ema', '--output', tmp_path / 'x', *FAST)
    assert refused.returncode == 2 and 'error: --push-ema needs --model-ema' in refused.stderr
    assert (out / 'curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'  # redrawn every epoch

    # python -m timm_icd report: one row per run with the runs' own numbers, and one PNG of their curves
    report = run_cli(out, teacher_run, '--out', tmp_path / 'runs.png', command='report')
    assert report.returncode == 0, report.stderr[-2000:]
    row = next(line for line in report.stdout.splitlines() if line.startswith('| ema |'))
    cells = [c.strip() for c in row.strip('|').split('|')]
    assert cells[1:5] == ['icd', 'test_resnet', 'test_resnet', '2']
    assert cells[5] == f"{float(rows[-1]['eval_top1']):.2f}" and cells[7] == f"{float(rows[-1]['eval_ema_top1']):.2f}"
    assert cells[8].endswith(' min') and any(line.startswith('| teacher | vanilla |') for line in
                                             report.stdout.splitlines())
    assert (tmp_path / 'runs.png').read_bytes()[:4] == b'\x89PNG'
    bad = run_cli(tmp_path / 'nothing', command='report')
    expected = f"error: {tmp_path / 'nothing'} is not a train_icd.py run folder (no summary.csv)."
    assert bad.returncode == 2 and bad.stderr.strip() == expected


def test_tensorboard_logs_equal_the_summary(digits_small, tmp_path):
    """The real TensorBoard writer, read back: every epoch's metrics as summary.csv has them, and step scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / 'tb'
    result = run_cli('--method', 'vanilla', '--student', 'test_resnet', '--dataset', digits_small, '--epochs', '2',
                     '-b', '32', '--log-with', 'tensorboard', '--tracker-project', 'proj', '--model-ema',
                     '--output', out, *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    events = EventAccumulator(str(out / 'logs' / 'proj'))
    events.Reload()
    rows = read_summary(out)
    for column in ('eval_top1', 'eval_top5', 'eval_loss', 'train_loss', 'train_loss_ce', 'eval_ema_top1', 'lr'):
        logged = [e.value for e in events.Scalars(f'epoch/{column}')]
        assert logged == pytest.approx([float(r[column]) for r in rows], rel=1e-6, abs=1e-5), column
    steps = events.Scalars('step/loss')
    assert [e.step for e in steps] == [5, 13]  # at step 5 of each epoch's 8 (--log-interval 5), global steps
    assert all(e.value > 0 for e in events.Scalars('step/images_per_second'))
    assert list(out.glob('logs/proj/*/hparams.yml'))  # the settings, once


def test_a_missing_tracker_package_is_one_line_before_training(digits_small, tmp_path):
    result = run_cli('--dataset', digits_small, '--log-with', 'mlflow', '--output', tmp_path / 'x', *FAST)
    assert result.returncode == 2 and not (tmp_path / 'x').exists()
    last = result.stderr.strip().splitlines()[-1]
    assert last == 'error: --log-with mlflow needs the mlflow package: pip install mlflow.'


def test_timm_train_py_distillation_flags_work_unchanged(digits_small, tmp_path):
    """timm train.py's distillation flags (--model, --kd-model-name, --kd-distill-type, --distill-loss-weight,
    --task-loss-weight, --kd-temperature, --grad-checkpointing) mean the same here."""
    timm_flags = ['--model', 'test_resnet', '--kd-model-name', 'test_resnet', '--kd-distill-type', 'logit',
                  '--distill-loss-weight', '0.7', '--task-loss-weight', '0.3', '--kd-temperature', '2',
                  '--grad-checkpointing', '--epochs', '1', '-b', '32']
    out = tmp_path / 'timm'
    result = run_cli(*timm_flags, '--dataset', digits_small, '--teacher-pretrained', 'false', '--output', out, *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / 'student' / 'distillation.json').read_text())
    assert record['method'] == 'kd' and record['student'] == 'test_resnet'
    assert record['teacher']['name'] == 'test_resnet'
    assert record['loss_weights'] == {'task': 0.3, 'kd': 0.7, 'icd': 0.0} and record['kd_temperature'] == 2.0
    # --kd-distill-type feature: timm's FeatureDistillationTask itself, run by this tool's loop (--method feature)
    feature = run_cli(*[f if f != 'logit' else 'feature' for f in timm_flags], '--dataset', digits_small,
                      '--teacher-pretrained', 'false', '--output', tmp_path / 'f', *FAST)
    assert feature.returncode == 0, feature.stderr[-3000:]
    record = json.loads((tmp_path / 'f' / 'student' / 'distillation.json').read_text())
    assert record['method'] == 'feature' and record['loss_weights'] == {'task': 0.3, 'kd': 0.7, 'icd': 0.0}
    assert record['icd'] is None and float(read_summary(tmp_path / 'f')[0]['train_loss_kd']) > 0  # the feature MSE
    token = run_cli(*[f if f != 'logit' else 'token' for f in timm_flags], '--dataset', digits_small,
                    '--teacher-pretrained', 'false', '--output', tmp_path / 't', *FAST)
    # --kd-distill-type token: timm's TokenDistillationTask, which needs a student with a distillation token
    assert token.returncode == 2 and '--method token trains a distillation token, which student' in token.stderr
