"""Shared fixtures: real image data written by the tests, and a runner for the commands (``run_cli``: processes forked
from ``tests/zygote.py``, or fresh interpreters where the environment differs)."""
import atexit
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional

import datasets
import pytest
import torch

from hub_server import FakeHub

REPO = Path(__file__).resolve().parents[1]
if os.environ.get('PYTEST_XDIST_WORKER'):  # two workers share the 2 cores: one torch thread each, as subprocesses get
    torch.set_num_threads(1)
# tiny, fast settings for digits-sized runs; augmentation kept mild so a couple of epochs learn something
FAST = ['--input-size', '3', '16', '16', '-j', '0', '--hflip', '0', '--scale', '0.7', '1', '--color-jitter', '0',
        '--log-interval', '5']


def offline_env(**extra) -> dict:
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1', 'PYTHONPATH': str(REPO),
           'OMP_NUM_THREADS': '1', 'TOKENIZERS_PARALLELISM': 'false'}
    env.pop('RANK', None)
    env.update(extra)
    return env


@pytest.fixture(scope='module')
def hub():
    """The loopback Hub server (tests/hub_server.py), one per test module."""
    server = FakeHub().start()
    yield server
    server.stop()


def hub_env(hub, tmp_path, token=True, endpoint=None) -> dict:
    """The environment of a process that talks to the loopback Hub ``hub`` (``tests/hub_server.py``) with the real
    huggingface_hub client: its endpoint, a fresh cache under ``tmp_path``, and the token unless ``token`` is False."""
    env = offline_env(HF_HUB_OFFLINE='0', HF_ENDPOINT=endpoint or hub.endpoint, HF_HOME=str(tmp_path / 'hf_home'),
                      HF_HUB_DISABLE_TELEMETRY='1', HF_HUB_DISABLE_IMPLICIT_TOKEN='0')
    env.pop('HF_TOKEN', None)
    if token:
        env['HF_TOKEN'] = hub.token
    return env


def closed_port() -> int:
    """A loopback port nothing listens on (connections to it are refused)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _settled(env: dict) -> dict:
    """An environment without what pytest changes as it goes from test to test."""
    return {k: v for k, v in env.items() if k != 'PYTEST_CURRENT_TEST'}


class Zygote:
    """This test process's client of ``tests/zygote.py``: commands run in processes forked from one that has imported
    their libraries already, instead of fresh interpreters that import them again (about 5 CPU-seconds each)."""

    def __init__(self):
        self.env, self.proc, self.lock = offline_env(), None, threading.Lock()

    def _line(self, timeout: Optional[float] = None) -> Optional[dict]:
        """The zygote's next reply, read from the pipe unbuffered (so select sees what is not read yet); None when
        ``timeout`` seconds pass first."""
        fd, data = self.proc.stdout.fileno(), b''
        if timeout is not None and not select.select([fd], [], [], timeout)[0]:
            return None
        while not data.endswith(b'\n'):
            chunk = os.read(fd, 1)
            if not chunk:
                raise RuntimeError(f'tests/zygote.py ended (status {self.proc.wait()}); its stderr ends: '
                                   f'{Path(self.log).read_text()[-2000:]}')
            data += chunk
        return json.loads(data)

    def _start(self) -> None:
        if self.proc is None:
            fd, self.log = tempfile.mkstemp(prefix='zygote-', suffix='.log')
            self.proc = subprocess.Popen([sys.executable, str(REPO / 'tests' / 'zygote.py')], cwd=REPO, env=self.env,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=fd)
            os.close(fd)
            atexit.register(os.unlink, self.log)
            atexit.register(self.proc.kill)
            self._line()  # {"ready": true} once the libraries are imported

    def run(self, cmd: list, script: Optional[str], module: Optional[str], args: list,
            timeout: float) -> subprocess.CompletedProcess:
        self._start()
        with tempfile.TemporaryDirectory(prefix='zygote-') as tmp:
            out, err = Path(tmp) / 'stdout', Path(tmp) / 'stderr'
            request = dict(argv=args, script=script, module=module, cwd=str(REPO), stdout=str(out), stderr=str(err))
            self.proc.stdin.write(json.dumps(request).encode() + b'\n')
            self.proc.stdin.flush()
            pid = self._line()['pid']
            ended = self._line(timeout)
            if ended is None:  # as subprocess.run(timeout=...): the command is killed, its output so far kept
                os.kill(pid, signal.SIGKILL)
                self._line()
            stdout, stderr = out.read_text(), err.read_text()
        if ended is None:
            raise subprocess.TimeoutExpired(cmd, timeout, output=stdout, stderr=stderr)
        return subprocess.CompletedProcess(cmd, ended['returncode'], stdout, stderr)

    def try_run(self, env: dict, *call) -> Optional[subprocess.CompletedProcess]:
        """The command's result from a forked child, or None where only a fresh interpreter will do: another
        environment than the zygote's, a command already running from another thread, or TIMM_ICD_TEST_FORK=0."""
        if _settled(env) != _settled(self.env) or os.environ.get('TIMM_ICD_TEST_FORK') == '0' or \
                not self.lock.acquire(blocking=False):
            return None
        try:
            return self.run(*call)
        finally:
            self.lock.release()


_zygote = None


def pytest_collection_modifyitems(items):
    """Tests marked ``long`` first (in their collected order), the short ones after: the two xdist workers then end
    on short tests, where a long test collected last would run alone on one worker at the end."""
    items.sort(key=lambda item: item.get_closest_marker('long') is None)


def run_cli(*args, env=None, timeout=600, script='train_icd.py', module=None,
            command=None) -> subprocess.CompletedProcess:
    """Run train_icd.py, another repo script, ``python -m module``, or ``python -m timm_icd COMMAND`` (``command``), as
    a user would (offline by default): in a process forked from ``tests/zygote.py`` when the environment is the default
    one, else in a fresh interpreter."""
    global _zygote
    if command:
        module, args = 'timm_icd', (command, *args)
    target = ['-m', module] if module else [str(REPO / script)]
    argv, env = [str(a) for a in args], env or offline_env()
    cmd = [sys.executable, *target, *argv]
    _zygote = _zygote or Zygote()
    forked = _zygote.try_run(env, cmd, None if module else str(REPO / script), module, argv, timeout)
    if forked is not None:
        return forked
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope='session')
def digits_small(tmp_path_factory) -> str:
    """A save_to_disk folder of real digits: 256 train and 72 test rows."""
    from timm_icd.data import digits_dataset
    dd = digits_dataset()
    path = tmp_path_factory.mktemp('data') / 'digits_small'
    datasets.DatasetDict(train=dd['train'].select(range(256)), test=dd['test'].select(range(72))).save_to_disk(path)
    return str(path)


@pytest.fixture(scope='session')
def teacher_run(tmp_path_factory, digits_small) -> Path:
    """A test_resnet teacher trained with --method vanilla on digits_small (its student folder is the teacher)."""
    out = tmp_path_factory.mktemp('runs') / 'teacher'
    result = run_cli('--method', 'vanilla', '--student', 'test_resnet', '--dataset', digits_small, '--epochs', '3',
                     '-b', '32', '--lr', '0.1', '--output', out, *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    return out
