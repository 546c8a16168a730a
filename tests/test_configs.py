"""Every GPU recipe in configs/ parses and trains one step, here on random CIFAR-shaped data with random weights."""
import json

import datasets
import numpy as np
import pytest
import yaml
from PIL import Image

from helpers import REPO, run_cli

CONFIGS = sorted((REPO / 'configs').glob('*.yaml'))


@pytest.fixture(scope='module')
def random_cifar(tmp_path_factory):
    """64 train and 8 test random 32x32 RGB images in 100 classes, with CIFAR-100's column names."""
    rng = np.random.default_rng(0)
    features = datasets.Features({'img': datasets.Image(),
                                  'fine_label': datasets.ClassLabel(names=[f'c{i}' for i in range(100)])})

    def split(n):
        return datasets.Dataset.from_dict(
            {'img': [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n)],
             'fine_label': rng.integers(0, 100, n).tolist()}, features=features)

    path = tmp_path_factory.mktemp('cifar') / 'random_cifar100'
    datasets.DatasetDict(train=split(64), test=split(8)).save_to_disk(path)
    return path


def test_there_are_same_and_cross_family_recipes():
    names = {p.stem for p in CONFIGS}
    assert {'cifar100_teacher_resnet50', 'cifar100_resnet50_resnet18_icd_kd',
            'cifar100_resnet50_mobilenetv3_icd_kd'} <= names


@pytest.mark.parametrize('config', CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_runs_one_step(config, random_cifar, tmp_path):
    cfg = yaml.safe_load(config.read_text())
    assert cfg['epochs'] == 240 and cfg['batch_size'] == 64 and cfg['lr'] in (0.05, 0.01)
    assert cfg['momentum'] == 0.9 and cfg['weight_decay'] == 0.0005
    assert cfg['sched'] == 'multistep' and cfg['decay_milestones'] == [150, 180, 210] and cfg['decay_rate'] == 0.1
    out = tmp_path / 'run'
    # offline stand-ins for the Hub: the random dataset, random teacher and student weights, one epoch of one step;
    # the recipes' bf16 is for a GPU: on a CPU without bf16 units it costs a minute a step (bf16 training itself is
    # tested in test_cli.py)
    result = run_cli('--config', config, '--dataset', random_cifar, '--teacher-pretrained', 'false',
                     '--teacher-checkpoint', '', '--no-pretrained', '--epochs', '1', '--workers', '0',
                     '--mixed-precision', 'no', '--output', out)
    assert result.returncode == 0, result.stderr[-3000:]
    args = yaml.safe_load((out / 'args.yaml').read_text())
    assert args['sched'] == 'multistep' and args['decay_milestones'] == [150, 180, 210]
    assert args['method'] == cfg['method'] and args['student'] == cfg['student']
    assert args['epochs'] == 1  # a flag on the command line beats the config file, as in timm's train.py
    assert cfg['mixed_precision'] == 'bf16' and args['mixed_precision'] == 'no'
    state = json.loads(next((out / 'checkpoints').iterdir()).joinpath('run_state.json').read_text())
    assert state['global_step'] == 1 and state['history'][0]['eval_count'] == 8


def test_default_lr_follows_the_papers_rule_for_the_student(tmp_path):
    from timm_icd.run import parse_args
    assert parse_args(['--student', 'mobilenetv3_small_100']).lr == 0.01
    assert parse_args(['--student', 'hf-hub:someone/shufflenet_v2']).lr == 0.01
    assert parse_args(['--student', 'resnet18']).lr == 0.05
    assert parse_args(['--student', 'mobilenetv3_small_100', '--lr', '0.2']).lr == 0.2  # an explicit rate wins
    config = tmp_path / 'c.yaml'
    config.write_text('lr: 0.3\n')
    assert parse_args(['--config', str(config), '--student', 'mobilenetv3_small_100']).lr == 0.3
