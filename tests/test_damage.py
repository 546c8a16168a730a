"""Damaged files never cost a traceback or a wrong answer: each class of damage is one error line (exit 2) before
long work starts, or a recovery whose result equals a clean run's. Real files are damaged here."""
import json
import os
import shutil

import pytest
import safetensors.torch

from helpers import FAST, run_cli
from timm_icd.cli.cache import main as cache_main
from timm_icd.cli.train import main as train_main

RUN = ['--teacher', 'test_resnet', '--teacher-pretrained', 'false', '--student', 'test_efficientnet', '-b', '32',
       '--seed', '3', *FAST]


def _weights(folder):
    return safetensors.torch.load_file(folder / 'student' / 'model.safetensors')


def _error_lines(text):
    return [line for line in text.splitlines() if 'error:' in line]


def test_a_damaged_teacher_cache_is_recomputed_where_damaged_and_refused_where_unusable(digits_small, tmp_path,
                                                                                      capsys):
    cache = tmp_path / 'cache'
    args = ['--dataset', digits_small, '--epochs', '3', '--teacher-cache', cache, *RUN]
    writer = run_cli(*args, '--output', tmp_path / 'writer')
    assert writer.returncode == 0, writer.stderr[-2000:]
    assert run_cli('--verify', cache, command='cache').returncode == 0

    # three kinds of damage after the fact, one per epoch
    logits = cache / 'epoch-0000' / 'logits.npy'
    raw = bytearray(logits.read_bytes())
    raw[-7] ^= 0xFF  # one flipped byte: same size, same header; only the checksum can tell
    logits.write_bytes(bytes(raw))
    features = cache / 'epoch-0001' / 'features.npy'
    with open(features, 'r+b') as f:
        f.truncate(os.path.getsize(features) // 2)
    shutil.rmtree(cache / 'epoch-0002')

    check = run_cli('--verify', cache, command='cache')
    assert check.returncode == 1, check.stderr
    assert 'epoch 0: damaged: the contents of logits.npy changed' in check.stdout
    assert 'epoch 1: damaged: epoch-0001/features.npy is unreadable' in check.stdout
    assert 'epoch 2: damaged: epoch-0002/written.npy is missing' in check.stdout
    assert 'would drop and compute again epochs [0, 1, 2]' in check.stdout

    reader = run_cli(*args, '--output', tmp_path / 'reader')
    assert reader.returncode == 0, reader.stderr[-2000:]
    warnings = [line for line in reader.stderr.splitlines() if 'is damaged' in line]
    assert len(warnings) == 3 and all('dropped and computed again' in w for w in warnings), reader.stderr[-3000:]
    assert 'Traceback' not in reader.stderr
    written, read = _weights(tmp_path / 'writer'), _weights(tmp_path / 'reader')
    assert written.keys() == read.keys() and all((written[k] == read[k]).all() for k in written)  # = a clean run
    assert run_cli('--verify', cache, command='cache').returncode == 0
    assert json.loads((cache / 'manifest.json').read_text())['epochs'] == [0, 1, 2]

    # unusable: refused in one line, before any training
    (cache / 'manifest.json').write_text('{"version": 1, "epochs": [0,')
    assert train_main(['--dataset', digits_small, '--epochs', '1', '--teacher-cache', str(cache), *map(str, RUN),
                       '--output', str(tmp_path / 'bad')]) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and 'manifest.json is unreadable' in lines[0], lines
    assert cache_main(['--verify', str(cache)]) == 2
    assert len(_error_lines(capsys.readouterr().err)) == 1
    a_file = tmp_path / 'a_file'
    a_file.write_text('not a folder')
    assert train_main(['--dataset', digits_small, '--epochs', '1', '--teacher-cache', str(a_file), *map(str, RUN),
                       '--output', str(tmp_path / 'bad2')]) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and 'is a file, not a folder' in lines[0], lines
    assert not (tmp_path / 'bad').exists() and not (tmp_path / 'bad2').exists()


def _corrupt_one_image(shard, member_index=3):
    """Overwrite the middle of one image inside a tar shard, keeping the file's size (a bit-rot, not a truncation)."""
    import tarfile
    with tarfile.open(shard) as tar:
        member = [m for m in tar.getmembers() if m.name.endswith(('.png', '.jpg'))][member_index]
    with open(shard, 'r+b') as f:
        f.seek(member.offset_data + 8)
        f.write(b'\x00garbage' * ((member.size - 16) // 8))
    return member.name


STREAM = ['--streaming', '--teacher', 'test_resnet', '--teacher-pretrained', 'false', '--student',
          'test_efficientnet', '-b', '16', '--seed', '3', '--epochs', '1', *FAST]


@pytest.fixture(scope='module')
def damaged_shards(tmp_path_factory, digits_small):
    """digits_small as 2 train shards (one per process) whose second holds one unreadable image."""
    out = tmp_path_factory.mktemp('damaged') / 'shards'
    assert run_cli(digits_small, out, '--shard-size', '128', command='shards').returncode == 0
    name = _corrupt_one_image(out / 'train-00001-of-00002.tar')
    return out, name.split('.')[0]


def test_an_error_on_one_rank_is_one_line_on_every_rank(damaged_shards, tmp_path):
    """One process meets the bad image (which one: the epoch's shard order decides); each process ends with one line,
    and no frame of this package's code is printed (the launcher's own ChildFailedError report stays)."""
    from helpers import accelerate_launch
    shards, key = damaged_shards
    result = accelerate_launch('train_icd.py', '--dataset', f'webdataset:{shards}', '--output',
                               tmp_path / 'run', *STREAM, timeout=300)
    assert result.returncode != 0
    lines = _error_lines(result.stderr)
    assert len(lines) == 2, result.stderr[-4000:]
    own = next(line for line in lines if 'error: cannot decode an image' in line)
    rank = 0 if own.startswith('error:') else int(own.split(']')[0].split()[-1])
    assert f'train-00001-of-00002.tar, sample {key}' in own and '--skip-bad-images' in own
    peer = next(line for line in lines if line is not own)
    assert peer.startswith(f'error: rank {rank} stopped: cannot decode an image')
    assert peer.endswith(f'stopping this process (rank {1 - rank}).')
    frames = [line for line in result.stderr.splitlines() if line.strip().startswith('File ') and 'timm_icd' in line]
    assert frames == [] and 'gloo' not in result.stderr.lower()


def test_streaming_skips_unreadable_images_and_keeps_the_steps(damaged_shards, tmp_path):
    from helpers import accelerate_launch
    shards, key = damaged_shards
    out = tmp_path / 'run'
    result = accelerate_launch('train_icd.py', '--dataset', f'webdataset:{shards}', '--output', out, *STREAM,
                               '--skip-bad-images', timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    skipped = [line for line in result.stderr.splitlines() if 'Skipped an unreadable image' in line]
    assert len(skipped) == 1 and key in skipped[0]
    record = json.loads((out / 'student' / 'distillation.json').read_text())
    assert record['dataset']['skipped_images'] == {'train': 1, 'eval': 0}
    state = json.loads(sorted((out / 'checkpoints').iterdir())[-1].joinpath('run_state.json').read_text())
    assert state['global_step'] == 256 // (2 * 16)  # the steps per epoch do not change


@pytest.mark.long
def test_elastic_restart_after_a_dead_rank_ends_with_an_uninterrupted_runs_weights(digits_small, tmp_path):
    import subprocess
    import sys
    from helpers import HELPERS, REPO, accelerate_launch, free_port, offline_env
    run = ['--dataset', digits_small, '--teacher', 'test_resnet', '--teacher-pretrained', 'false', '--student',
           'test_efficientnet', '--epochs', '2', '-b', '16', '--checkpoint-steps', '3', '--seed', '3', *FAST]
    reference = accelerate_launch('train_icd.py', *run, '--output', tmp_path / 'reference')
    assert reference.returncode == 0, reference.stderr[-3000:]
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
           '--num_machines', '1', '--main_process_port', str(free_port()), '--mixed_precision', 'no',
           '--dynamo_backend', 'no',
           '--max_restarts', '1', '--monitor_interval', '1', str(HELPERS / 'train_crash.py'), *map(str, run),
           '--output', str(tmp_path / 'healed'), '--resume', 'auto']
    log = tmp_path / 'healed.log'
    with open(log, 'w') as f:  # a file, not a pipe: restarted workers must not keep the test waiting on a pipe
        launch = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                  env=offline_env(ACCELERATE_USE_CPU='1', TIMM_ICD_CRASH_AT='step:5@1'))
        try:
            code = launch.wait(timeout=600)
        finally:
            if launch.poll() is None:
                os.killpg(launch.pid, 9)
            subprocess.run(['pkill', '-9', '-s', str(launch.pid)], check=False)  # workers left by a failed launch
    healed = subprocess.CompletedProcess(cmd, code, '', log.read_text())
    died = [line for line in healed.stderr.splitlines() if 'error: rank 1' in line]
    assert died and 'The launcher restarts the run from its newest checkpoint (restart 1 of 1)' in died[0]
    assert 'Resumed from' in healed.stderr and 'checkpoint-00000003' in healed.stderr
    a = safetensors.torch.load_file(tmp_path / 'reference' / 'student' / 'model.safetensors')
    b = safetensors.torch.load_file(tmp_path / 'healed' / 'student' / 'model.safetensors')
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() <= 1e-6 for k in a)


def test_resume_passes_over_damaged_checkpoints_to_the_newest_that_loads(digits_small, tmp_path, capsys):
    args = ['--dataset', digits_small, '--epochs', '3', '--keep-checkpoints', '2', *RUN]
    clean = run_cli(*args, '--output', tmp_path / 'clean')
    assert clean.returncode == 0, clean.stderr[-2000:]
    out = tmp_path / 'run'
    killed = run_cli(*args, '--output', out, env=_crash_env('step:20'), script='tests/helpers/train_crash.py')
    assert killed.returncode != 0  # 8 steps per epoch: killed in epoch 2, checkpoints at steps 8 and 16 left
    newest = out / 'checkpoints' / 'checkpoint-00000016'
    weights = newest / 'model.safetensors'
    with open(weights, 'r+b') as f:
        f.truncate(os.path.getsize(weights) // 3)
    resumed = run_cli(*args, '--output', out, '--resume', 'auto')
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    warning = [line for line in resumed.stderr.splitlines() if 'does not load' in line]
    assert len(warning) == 1 and 'checkpoint-00000016' in warning[0] and 'trying the one before it' in warning[0]
    assert 'Resumed from' in resumed.stderr and 'checkpoint-00000008' in resumed.stderr
    a, b = _weights(tmp_path / 'clean'), _weights(out)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # = the uninterrupted run

    # every checkpoint damaged: one line, nothing changed
    for ckpt in (out / 'checkpoints').iterdir():
        (ckpt / 'scheduler.pt').write_bytes(b'not a pickle')
    assert train_main([*map(str, args), '--output', str(out), '--resume', 'auto']) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith('error: cannot resume: no checkpoint loads'), lines
    (out / 'checkpoints' / 'checkpoint-00000024' / 'run_state.json').write_text('{"epoch": 3, "fing')
    assert train_main([*map(str, args), '--output', str(out), '--resume', 'auto']) == 2
    assert 'passing over it' in capsys.readouterr().err


def _crash_env(spec):
    from helpers import offline_env
    return offline_env(TIMM_ICD_CRASH_AT=spec)


@pytest.mark.parametrize('flags,expected', [
    (['--student', 'test_vit', '--input-size', '3', '28', '28', '--method', 'vanilla'],
     'error: student test_vit needs an input size divisible by its patch size 16x16, not 3x28x28: use --input-size '
     '3 32 32.'),
    (['--student', 'test_resnet', '--input-size', '3', '32', '32', '--teacher', 'test_vit', '--teacher-pretrained',
      'false', '--teacher-input-size', '3', '40', '40'],
     'error: teacher test_vit needs an input size divisible by its patch size 16x16, not 3x40x40: use '
     '--teacher-input-size 3 48 48.'),
])
def test_an_input_size_a_model_refuses_is_one_line_naming_the_fix(digits_small, tmp_path, capsys, flags, expected):
    assert train_main(['--dataset', digits_small, '--epochs', '1', '-j', '0', '--output', str(tmp_path / 'x'),
                       *flags]) == 2
    assert _error_lines(capsys.readouterr().err) == [expected]
    assert not (tmp_path / 'x').exists()
