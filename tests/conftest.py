"""Shared fixtures: real image data written by the tests, and a runner for train_icd.py subprocesses."""
import os
import socket
import subprocess
import sys
from pathlib import Path

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


def run_cli(*args, env=None, timeout=600, script='train_icd.py', module=None) -> subprocess.CompletedProcess:
    """Run train_icd.py, another repo script, or ``python -m module``, as a user would (offline by default)."""
    target = ['-m', module] if module else [str(REPO / script)]
    return subprocess.run([sys.executable, *target, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          env=env or offline_env(), timeout=timeout)


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
