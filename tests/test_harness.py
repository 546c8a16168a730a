"""The test harness itself: a command that ``run_cli`` runs in a process forked from ``tests/helpers/zygote.py``
behaves as the same command in a fresh interpreter (exit status, output, atexit, threads, random draws, timeouts,
and the weights a training run writes)."""
import os
import subprocess

import pytest
import safetensors.torch

from helpers import FAST, cli, run_cli


def _both(monkeypatch, *args, **kwargs):
    """The command's result forked from the zygote, then from a fresh interpreter (TIMM_ICD_TEST_FORK=0)."""
    forked = run_cli(*args, **kwargs)
    assert cli._zygote.proc is not None and cli._zygote.proc.poll() is None  # the zygote ran it
    with monkeypatch.context() as m:
        m.setenv('TIMM_ICD_TEST_FORK', '0')
        fresh = run_cli(*args, **kwargs)
    return forked, fresh


def _settled(text: str) -> list:
    return [line for line in text.splitlines() if not line.startswith(('pid ', 'draws '))]


@pytest.mark.parametrize('mode,returncode,last_stderr', [
    ('end', 0, 'to stderr'),
    ('exit-code', 3, 'to stderr'),
    ('exit-text', 1, 'a message instead of a code'),
    ('raise', 1, 'ValueError: the probe fails'),
])
def test_a_forked_command_ends_as_a_fresh_interpreter_does(mode, returncode, last_stderr, monkeypatch):
    forked, fresh = _both(monkeypatch, mode, script='tests/helpers/zygote_probe.py')
    for result in (forked, fresh):
        assert result.returncode == returncode, result.stderr
        assert result.stderr.splitlines()[-1] == last_stderr
        assert result.stdout.splitlines()[-2:] == ['thread finished', 'atexit handler ran']  # threads, then atexit
    assert _settled(forked.stdout) == _settled(fresh.stdout)  # argv, cwd, sys.path[0], __name__
    assert ('Traceback (most recent call last):' in forked.stderr) == (mode == 'raise')
    parents = [next(line for line in r.stdout.splitlines() if line.startswith('pid ')).split()[-1]
               for r in (forked, fresh)]
    assert parents == [str(cli._zygote.proc.pid), str(os.getpid())]  # forked from the zygote; started by pytest


def test_forked_commands_draw_fresh_random_numbers_and_time_out_like_subprocess_run():
    draws = {next(line for line in run_cli('end', script='tests/helpers/zygote_probe.py').stdout.splitlines()
                  if line.startswith('draws ')) for _ in range(2)}
    assert len(draws) == 2  # random and numpy.random reseeded in every child, not inherited from the zygote
    with pytest.raises(subprocess.TimeoutExpired) as hung:
        run_cli('hang', script='tests/helpers/zygote_probe.py', timeout=3)
    assert 'pid ' in hung.value.output  # what it printed before it was killed comes back, as from subprocess.run
    # the zygote serves on after a kill
    assert run_cli('exit-code', script='tests/helpers/zygote_probe.py').returncode == 3


def test_a_forked_training_run_writes_the_weights_a_fresh_interpreter_writes(digits_small, tmp_path, monkeypatch):
    outs = [tmp_path / 'forked', tmp_path / 'fresh']
    results = []
    for out in outs:
        with monkeypatch.context() as m:
            if out.name == 'fresh':
                m.setenv('TIMM_ICD_TEST_FORK', '0')
            results.append(run_cli('--method', 'vanilla', '--student', 'test_resnet', '--dataset', digits_small,
                                   '--epochs', '1', '-b', '32', '--seed', '3', '--output', out, *FAST))
    assert [r.returncode for r in results] == [0, 0], results[0].stderr[-2000:] + results[1].stderr[-2000:]
    forked, fresh = (safetensors.torch.load_file(out / 'student' / 'model.safetensors') for out in outs)
    assert forked.keys() == fresh.keys() and all((forked[k] == fresh[k]).all() for k in forked)
    assert (outs[0] / 'summary.csv').read_text() == (outs[1] / 'summary.csv').read_text()
