"""The run config (``timm_icd/run/config.py``): the flags read once into frozen sections, each field the flag of its
name, and the input pipeline's settings handed to the data layer as one ``PipelineConfig``."""
import dataclasses

import pytest

from timm_icd.data import AugmentConfig, PipelineConfig
from timm_icd.run import LoopConfig, RunConfig, parse_and_validate, run_config

ARGV = ['--dataset', 'digits', '--student', 'test_resnet', '--teacher', 'test_resnet', '--teacher-pretrained', 'false',
        '--method', 'icd+kd', '--batch-size', '24', '-vb', '40', '-j', '3', '--seed', '7', '--data-seed', '11',
        '--input-size', '3', '16', '16', '--decode-device', 'cpu', '--grad-accum-steps', '2', '--smoothing', '0.2',
        '--teacher-cache', 'cache_dir', '--cache-topk', '5', '--epochs', '3', '--lr', '0.02', '--kd-temperature', '2']
# fields resolved from flags of another name (everything else is read from the flag of the field's name)
RENAMED = {('data', 'seed'): 11, ('data', 'augment'): None, ('method', 'terms'): None, ('train', 'optimizer'): None,
           ('train', 'scheduler'): None, ('train', 'loop'): None, ('cache', 'root'): 'cache_dir',
           ('cache', 'features'): 'fp16', ('cache', 'topk'): 5}


def test_every_field_is_its_flag_and_every_section_is_frozen():
    args = parse_and_validate(ARGV)
    config = run_config(args)
    for section in ('model', 'method', 'data', 'cache', 'output', 'train'):
        part = getattr(config, section)
        for f in dataclasses.fields(part):
            value = getattr(part, f.name)
            if (section, f.name) in RENAMED:
                if RENAMED[section, f.name] is not None:
                    assert value == RENAMED[section, f.name], (section, f.name)
                continue
            flag = getattr(args, f.name)
            assert value == flag and type(value) is type(flag), (section, f.name)  # lists stay lists
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(part, dataclasses.fields(part)[0].name, None)
    assert config.model.input_size == [3, 16, 16] and config.method.terms['kd'].temperature == 2.0
    assert config.method.smoothing == 0.2
    assert isinstance(config.data.augment, AugmentConfig) and isinstance(config.train.loop, LoopConfig)
    assert config.train.loop.data_seed == 11 and config.train.scheduler['num_epochs'] == 3
    assert config.train.optimizer['lr'] == 0.02 and not config.data.mixup_active and config.data.eval_batch_size == 40
    assert dict(config.flags) == vars(args) and config.flags_yaml().startswith('aa: null\n')
    with pytest.raises(TypeError):
        config.flags['lr'] = 1.0  # the flags are read-only too
    assert run_config(config) is config


def test_the_data_section_gives_the_pipeline_its_settings_and_with_flags_rebuilds_the_config():
    config = run_config(parse_and_validate(ARGV))
    assert config.data.pipeline(rank=1, world=2, with_index=True, jitter_on_device=False) == PipelineConfig(
        kind='auto', batch_size=24, eval_batch_size=40, workers=3, seed=11, with_index=True, shuffle_buffer=4096,
        grad_accum_steps=2, rank=1, world=2, skip_bad_images=False, decode_scale='auto', decode_device=None,
        jitter_on_device=False)
    vanilla = config.with_flags(method='vanilla', epochs=5, teacher_cache=None)
    assert isinstance(vanilla, RunConfig) and vanilla.method.method == 'vanilla' and vanilla.cache.root is None
    assert vanilla.train.epochs == 5 and vanilla.train.scheduler['num_epochs'] == 5
    assert vanilla.data == config.data and config.train.epochs == 3  # the rest as it was; the original unchanged
