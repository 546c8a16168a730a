"""Faults of distributed runs with real processes: a rank SIGKILLed mid-epoch stops the others at once with one line
that names it, and --resume auto then ends where an uninterrupted run ends; two single-process launches of
``accelerate launch --num_machines 2`` train together as one run."""
import os
import subprocess
import sys
import time

import pytest
import safetensors.torch
import torch
import torch.distributed as dist

from helpers import FAST, HELPERS, REPO, accelerate_launch, offline_env, two_machines
from timm_icd.run import watchdog

RUN = ['--teacher', 'test_resnet', '--teacher-pretrained', 'false', '--student', 'test_efficientnet', '--epochs', '2',
       '-b', '16', '--checkpoint-steps', '3', '--seed', '3', *FAST]
CRASH = 'step:5@1'  # 8 steps per epoch with 2 processes: rank 1 dies mid-epoch 0, after the checkpoint at step 3
EXPECTED = ['args.yaml', 'checkpoints', 'curves.png', 'student', 'summary.csv']


def error_lines(stderr: str):
    return [line for line in stderr.splitlines() if 'error: rank' in line]


def assert_same_weights(a, b, atol=0.0):
    weights_a, weights_b = safetensors.torch.load_file(a), safetensors.torch.load_file(b)
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        torch.testing.assert_close(weights_b[key], weights_a[key], rtol=0, atol=atol, msg=key)


@pytest.fixture(scope='module')
def reference(tmp_path_factory, digits_small):
    """An uninterrupted 2-process run: its student folder."""
    out = tmp_path_factory.mktemp('faults') / 'reference'
    result = accelerate_launch(REPO / 'train_icd.py', '--dataset', digits_small, '--output', out, *RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    return out / 'student'


@pytest.mark.long
def test_dead_rank_stops_the_other_with_one_line_and_resume_matches(reference, digits_small, tmp_path):
    out = tmp_path / 'run'
    started = time.monotonic()
    killed = accelerate_launch(HELPERS / 'train_crash.py', '--dataset', digits_small, '--output', out, *RUN,
                               timeout=300, env_extra={'TIMM_ICD_CRASH_AT': CRASH})
    seconds = time.monotonic() - started
    assert killed.returncode != 0
    assert seconds < 120, seconds  # the whole launch, kill included: far below gloo's 30-minute collective timeout
    lines = error_lines(killed.stderr)
    assert len(lines) == 1, killed.stderr[-3000:]
    assert 'error: rank 1 (pid ' in lines[0] and 'died; stopping this process (rank 0)' in lines[0]
    assert lines[0].endswith('Resume with the same command plus --resume auto.')
    assert 'Connection reset' not in killed.stderr and '[rank0]' not in killed.stderr  # no gloo traceback

    resumed = accelerate_launch(REPO / 'train_icd.py', '--dataset', digits_small, '--output', out, *RUN,
                                '--resume', 'auto')
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'Resumed from' in resumed.stderr and 'checkpoint-00000003' in resumed.stderr
    assert_same_weights(reference / 'model.safetensors', out / 'student' / 'model.safetensors', atol=1e-6)


@pytest.mark.long
def test_two_machines_train_together_and_a_dead_machine_stops_the_other(reference, digits_small, tmp_path):
    out, dumps = tmp_path / 'run', tmp_path / 'dumps'
    dumps.mkdir()
    launches = two_machines(tmp_path, HELPERS / 'dist_worker.py', dumps, '--dataset', digits_small,
                            '--output', out, *RUN)
    for launch in launches:
        assert launch.returncode == 0, launch.stderr[-3000:]
    assert 'Training on 2 processes' in launches[0].stderr
    assert sorted(p.name for p in out.iterdir()) == EXPECTED  # one run folder, one student, written by rank 0
    saved = out / 'student' / 'model.safetensors'
    assert_same_weights(dumps / 'rank0.safetensors', dumps / 'rank1.safetensors')
    assert_same_weights(dumps / 'rank0.safetensors', saved)
    assert_same_weights(reference / 'model.safetensors', saved, atol=1e-6)  # = 2 processes on one machine

    # no launcher stops rank 0 here (its own machine's agent saw nothing): rank 0 sees rank 1's death itself
    started = time.monotonic()
    launches = two_machines(tmp_path, HELPERS / 'train_crash.py', '--dataset', digits_small, '--output',
                            tmp_path / 'killed', *RUN, env=offline_env(ACCELERATE_USE_CPU='1', TIMM_ICD_CRASH_AT=CRASH))
    assert time.monotonic() - started < 120
    assert launches[0].returncode != 0 and launches[1].returncode != 0
    lines = error_lines(launches[0].stderr)
    assert len(lines) == 1 and 'rank 1 (pid' in lines[0] and '--resume auto' in lines[0], launches[0].stderr[-3000:]
    assert 'exitcode: 3' in launches[0].stderr  # rank 0 left through the watchdog (rank 1: SIGKILL, exit code -9)
    assert not error_lines(launches[1].stderr)


def test_dead_peers_by_pid_heartbeat_and_goodbye():
    store = dist.HashStore()
    dog = watchdog.PeerWatchdog(store, rank=0, world_size=4, hint='hint', timeout=0.3)
    gone = subprocess.Popen([sys.executable, '-c', 'pass'])
    gone.wait()
    store.set('info/1', f'h\t{dog.machine}\t{gone.pid}\t1')       # same machine, pid gone: dead at once
    store.set('info/2', f'h\t{dog.machine}\t{os.getpid()}\t{watchdog._started(os.getpid())}')  # alive
    store.set('info/3', 'far\tother-machine\t1\t1')                 # elsewhere: judged by its heartbeat
    store.add('beat/3', 1)
    died = f'rank 1 (pid {gone.pid} on host h) died'
    assert dog.dead_peers() == {1: died}
    time.sleep(0.4)
    assert dog.dead_peers() == {1: died, 3: 'rank 3 (pid 1 on host far) sent no heartbeat for 0.3s'}
    store.add('beat/3', 1)
    store.set('bye/1', '1')  # it ended normally
    assert dog.dead_peers() == {} and dog.left == {1}
    assert watchdog.resume_hint(['train_icd.py', '--resume', 'auto']).endswith('(it has --resume auto).')
    assert watchdog.resume_hint(['train_icd.py', '--resume', 'x']).endswith('plus --resume auto.')
