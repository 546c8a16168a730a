"""Kill and resume: a run SIGKILLed during a step, a checkpoint write and an evaluation, then resumed with
--resume auto each time, ends exactly where an uninterrupted run ends."""
import json
import shutil
import signal

import pytest
import safetensors.torch
import torch

from helpers import FAST, offline_env, run_cli
from timm_icd.run.checkpoint import find_latest_checkpoint

# dropout, drop-path, mixup and RandAugment (numpy) make the run consume every RNG stream a checkpoint must restore
RUN = ['--teacher', 'test_resnet', '--teacher-pretrained', 'false', '--student', 'test_efficientnet', '--epochs', '3',
       '-b', '32', '--checkpoint-steps', '3', '--keep-checkpoints', '2', '--drop', '0.2', '--drop-path', '0.1',
       '--mixup', '0.2', '--aa', 'rand-m9-mstd0.5', '--seed', '3', '--model-ema', '--model-ema-decay', '0.8', *FAST]


@pytest.mark.long
def test_killed_and_resumed_run_equals_uninterrupted_run(digits_small, tmp_path):
    a, b = tmp_path / 'a', tmp_path / 'b'
    result = run_cli('--dataset', digits_small, '--output', a, *RUN)
    assert result.returncode == 0, result.stderr[-3000:]

    def run_b(crash, resume=True):  # B loads data with 2 worker processes, A in the main process
        env = offline_env(TIMM_ICD_CRASH_AT=crash) if crash else offline_env()
        return run_cli('--dataset', digits_small, '--output', b, *(['--resume', 'auto'] if resume else []), *RUN,
                       '-j', '2', env=env, script='tests/helpers/train_crash.py')

    # 8 steps per epoch; step checkpoints every 3 global steps, epoch checkpoints at 8, 16, 24
    killed = run_b('step:5', resume=False)                     # mid-epoch 0, after checkpoint 3
    assert killed.returncode == -signal.SIGKILL
    assert find_latest_checkpoint(b).name == 'checkpoint-00000003'
    killed = run_b('checkpoint:2')                             # resumes at step 3; dies writing checkpoint 8
    assert killed.returncode == -signal.SIGKILL
    assert (b / 'checkpoints' / '.tmp-checkpoint-00000008').is_dir()  # the half-written one
    assert find_latest_checkpoint(b).name == 'checkpoint-00000006'    # the previous one, intact
    killed = run_b('eval:3')  # resumes mid-epoch at 6; dies in epoch 1's eval (eval 2 is epoch 0's EMA student)
    assert killed.returncode == -signal.SIGKILL
    assert find_latest_checkpoint(b).name == 'checkpoint-00000015'
    done = run_b(None)
    assert done.returncode == 0, done.stderr[-3000:]
    assert 'Resumed from' in done.stderr

    for folder in ('student', 'student_ema'):  # the EMA student too: its state is in every checkpoint
        weights_a = safetensors.torch.load_file(a / folder / 'model.safetensors')
        weights_b = safetensors.torch.load_file(b / folder / 'model.safetensors')
        assert weights_a.keys() == weights_b.keys()
        for key in weights_a:
            torch.testing.assert_close(weights_b[key], weights_a[key], rtol=0, atol=1e-6, msg=f'{folder} {key}')
    ema_record = json.loads((b / 'student_ema' / 'distillation.json').read_text())
    assert ema_record['weights'].startswith('EMA') and 'eval_ema_top1' in (b / 'summary.csv').read_text()
    assert (b / 'summary.csv').read_text() == (a / 'summary.csv').read_text()
    ckpts = sorted(p.name for p in (b / 'checkpoints').iterdir())
    assert ckpts == ['checkpoint-00000021', 'checkpoint-00000024']  # pruned to 2, no leftovers
    state_a = json.loads((a / 'checkpoints' / 'checkpoint-00000024' / 'run_state.json').read_text())
    state_b = json.loads((b / 'checkpoints' / 'checkpoint-00000024' / 'run_state.json').read_text())
    assert state_a['history'] == state_b['history'] and state_b['epoch'] == 3


def test_resume_path_and_fingerprint(digits_small, tmp_path):
    out = tmp_path / 'r'
    args = ['--dataset', digits_small, '--output', out, '--method', 'vanilla', '--student', 'test_resnet', '-b', '64',
            *FAST]
    assert run_cli(*args, '--epochs', '1').returncode == 0
    ckpt = find_latest_checkpoint(out)
    more = run_cli(*args, '--epochs', '2', '--resume', ckpt)   # continue to a longer schedule from a given path
    assert more.returncode == 0, more.stderr[-2000:]
    assert len((out / 'summary.csv').read_text().strip().splitlines()) == 3
    other = run_cli(*[a if a != '64' else '32' for a in args], '--epochs', '3', '--resume', 'auto')
    assert other.returncode == 2
    assert 'written with different batch_size; resume with the original settings' in other.stderr
    shutil.rmtree(out / 'checkpoints')  # results but nothing to continue from: refuse rather than overwrite them
    refused = run_cli(*args, '--epochs', '3', '--resume', 'auto')
    assert refused.returncode == 2 and 'holds results (summary.csv, student) but no complete checkpoint' in \
        refused.stderr
