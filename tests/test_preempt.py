"""Pre-emption: SIGTERM, SIGINT and SIGUSR1 mid-epoch (1 and 2 processes) and --time-limit stop a run at a step
boundary with a checkpoint and exit code 75; --resume auto then ends exactly where an uninterrupted run ends, with
every step computed once."""
import json
import re

import pytest
import safetensors.torch

from helpers import FAST, HELPERS, REPO, accelerate_launch, offline_env, run_cli
from timm_icd.run import PREEMPTED_EXIT_CODE
from timm_icd.run.checkpoint import find_latest_checkpoint

# 256 rows at -b 32: 8 steps per epoch, 16 in all (2 processes at -b 16: the same)
RUN = ['--teacher', 'test_resnet', '--teacher-pretrained', 'false', '--student', 'test_efficientnet', '--epochs', '2',
       '--drop', '0.2', '--seed', '3', '--keep-checkpoints', '5', *FAST]
LINE = 'preempted at epoch {} step {}; checkpoint saved: resume with --resume auto'


def assert_bit_equal(a, b):
    weights_a, weights_b = safetensors.torch.load_file(a), safetensors.torch.load_file(b)
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        assert weights_a[key].equal(weights_b[key]), key


def run_state(out):
    return json.loads((find_latest_checkpoint(out) / 'run_state.json').read_text())


def test_signals_stop_at_the_step_with_a_checkpoint_and_resume_exactly(digits_small, tmp_path):
    a, b, steps = tmp_path / 'a', tmp_path / 'b', tmp_path / 'steps.log'
    reference = run_cli('--dataset', digits_small, '--output', a, *RUN, '-b', '32')
    assert reference.returncode == 0, reference.stderr[-3000:]

    def run_b(signals, resume=True):
        env = offline_env(TIMM_ICD_SIGNAL_AT=signals, TIMM_ICD_STEP_LOG=str(steps))
        return run_cli('--dataset', digits_small, '--output', b, *RUN, '-b', '32',
                       *(['--resume', 'auto'] if resume else []), env=env, script='tests/helpers/train_crash.py')

    # Ctrl-C during step 5, and again while its checkpoint is written: the save completes, no second save
    stopped = run_b('step:5:INT,checkpoint:1:INT', resume=False)
    assert stopped.returncode == PREEMPTED_EXIT_CODE, stopped.stderr[-3000:]
    assert stopped.stderr.strip().splitlines()[-1] == LINE.format(0, 5)
    assert find_latest_checkpoint(b).name == 'checkpoint-00000005'
    state = run_state(b)
    assert (state['epoch'], state['step_in_epoch'], state['num_updates']) == (0, 5, 5)
    assert [p.name for p in (b / 'checkpoints').iterdir()] == ['checkpoint-00000005']  # no partial save left
    # SIGUSR1 during epoch 0's evaluation: the epoch ends, its checkpoint is the stop
    stopped = run_b('eval:1:USR1')
    assert stopped.returncode == PREEMPTED_EXIT_CODE, stopped.stderr[-3000:]
    assert 'Resumed from' in stopped.stderr and stopped.stderr.strip().splitlines()[-1] == LINE.format(1, 0)
    assert find_latest_checkpoint(b).name == 'checkpoint-00000008'
    # SIGTERM during the 4th step of epoch 1, and another one during the save
    stopped = run_b('step:4:TERM,checkpoint:1:TERM')
    assert stopped.returncode == PREEMPTED_EXIT_CODE, stopped.stderr[-3000:]
    assert stopped.stderr.strip().splitlines()[-1] == LINE.format(1, 4)
    assert run_state(b)['global_step'] == 12
    done = run_b('')
    assert done.returncode == 0, done.stderr[-3000:]

    assert steps.read_text().count('\n') == 16  # each of the 16 steps computed once: none repeated, none lost
    assert_bit_equal(a / 'student' / 'model.safetensors', b / 'student' / 'model.safetensors')
    assert (a / 'summary.csv').read_text() == (b / 'summary.csv').read_text()
    assert run_state(b)['num_updates'] == run_state(a)['num_updates'] == 16


@pytest.mark.long
def test_two_processes_stop_together_and_resume_exactly(digits_small, tmp_path):
    a, b, steps = tmp_path / 'a', tmp_path / 'b', tmp_path / 'steps.log'
    run = ['--dataset', digits_small, *RUN, '-b', '16']
    reference = accelerate_launch(REPO / 'train_icd.py', *run, '--output', a)
    assert reference.returncode == 0, reference.stderr[-3000:]

    def run_b(signals, **env):
        return accelerate_launch(HELPERS / 'train_crash.py', *run, '--output', b, '--resume', 'auto',
                                 timeout=300, env_extra={'TIMM_ICD_SIGNAL_AT': signals,
                                                         'TIMM_ICD_STEP_LOG': str(steps), **env})

    # SIGTERM to rank 1 alone during step 5: rank 0 learns it through the step's reduce, both save step 5
    stopped = run_b('step:5@1:TERM')
    assert stopped.stderr.count(LINE.format(0, 5)) == 1, stopped.stderr[-3000:]  # printed by rank 0 only
    assert stopped.stderr.count(f'exitcode  : {PREEMPTED_EXIT_CODE}') == 2, stopped.stderr[-3000:]
    assert 'died' not in stopped.stderr and 'error: rank' not in stopped.stderr  # not a dead peer
    assert find_latest_checkpoint(b).name == 'checkpoint-00000005'
    # SIGUSR1 to the launcher (what the README's SLURM script does), which passes it on to both processes
    stopped = run_b('step:3@0:^USR1', PET_SIGNALS_TO_HANDLE='SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1')
    assert stopped.returncode == 128 + 10, stopped.stderr[-3000:]  # the launcher's own code: 128 + SIGUSR1
    state = run_state(b)
    assert 8 <= state['global_step'] < 16
    assert stopped.stderr.count(LINE.format(state['epoch'], state['step_in_epoch'])) == 1, stopped.stderr[-3000:]
    assert 'died' not in stopped.stderr and 'error: rank' not in stopped.stderr
    done = run_b('')
    assert done.returncode == 0, done.stderr[-3000:]

    ranks = steps.read_text().split()
    assert ranks.count('0') == ranks.count('1') == 16  # every step computed once by each process
    assert_bit_equal(a / 'student' / 'model.safetensors', b / 'student' / 'model.safetensors')
    assert (a / 'summary.csv').read_text() == (b / 'summary.csv').read_text()


def test_time_limit_stops_with_a_checkpoint_before_the_limit(digits_small, tmp_path):
    out, limit = tmp_path / 'r', 30
    result = run_cli('--dataset', digits_small, '--output', out, '--student', 'test_resnet', '--method', 'vanilla',
                     '--epochs', '100', '-b', '32', '--time-limit', f'00:00:{limit}', *FAST,
                     env=offline_env(TIMM_ICD_TEST_FORK='0'))  # a process of its own, started now (no zygote)
    assert result.returncode == PREEMPTED_EXIT_CODE, result.stderr[-3000:]
    state = run_state(out)
    assert 0 < state['global_step'] < 800
    # the run decided with time left (by its own clock, from its process's start), unless starting up alone took
    # longer than the limit (a loaded machine): then its first step stops it
    left = float(re.search(r'Time limit: (-?\d+)s left', result.stderr).group(1))
    assert 0 < left < limit or state['global_step'] == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == LINE.format(state['epoch'], state['step_in_epoch'])
    assert not (out / 'student').exists()  # stopped, not finished
