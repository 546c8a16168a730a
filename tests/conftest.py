"""Fixtures and hooks only (the helpers tests import are in ``tests/helpers/``): real image data written by the
tests, a trained teacher, the loopback Hub, and the order of the tests."""
import os
from pathlib import Path

import datasets
import pytest
import torch

from helpers import FAST, run_cli
from helpers.hub_server import FakeHub

if os.environ.get('PYTEST_XDIST_WORKER'):  # two workers share the 2 cores: one torch thread each, as subprocesses get
    torch.set_num_threads(1)


@pytest.fixture(scope='module')
def hub():
    """The loopback Hub server (tests/helpers/hub_server.py), one per test module."""
    server = FakeHub().start()
    yield server
    server.stop()


def pytest_collection_modifyitems(items):
    """Tests marked ``long`` first (in their collected order), the short ones after: the two xdist workers then end
    on short tests, where a long test collected last would run alone on one worker at the end."""
    items.sort(key=lambda item: item.get_closest_marker('long') is None)


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
