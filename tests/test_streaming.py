"""Streaming (--streaming): shards in, every sample once per epoch across processes, exact mid-epoch resume."""
import collections
import csv
import hashlib
import json

import datasets
import pytest
import safetensors.torch
import torch
from timm.data import create_transform

from helpers import FAST, HELPERS, REPO, accelerate_launch, run_cli
from timm_icd.run.checkpoint import find_latest_checkpoint
from timm_icd.base import UserError
from timm_icd.data.streaming import StreamLoader, load_stream_data

STREAM = ['--streaming', '--shuffle-buffer', '48', '--teacher', 'test_resnet', '--teacher-pretrained', 'false',
          '--student', 'test_efficientnet', '-b', '16', '--seed', '3', '--reprob', '0.25', *FAST]


@pytest.fixture(scope='module')
def shards(digits_small, tmp_path_factory) -> str:
    """digits_small as webdataset shards: 8 train shards of 32 rows, 3 test shards (32, 32, 8)."""
    out = tmp_path_factory.mktemp('shards') / 'wds'
    result = run_cli(digits_small, out, '--shard-size', '32', command='shards')
    assert result.returncode == 0, result.stderr[-2000:]
    return str(out)


def _loader(data, workers, rank=1, world=2, steps=7):
    transform = create_transform(input_size=(3, 16, 16), is_training=True, use_prefetcher=True)
    loader = StreamLoader(data.train, data.image_column, data.label_column, data.num_classes, transform, 16, steps,
                          0, rank, world, 24, workers, data.train_split)
    loader.set_epoch(2)
    return loader


def test_stream_resumes_mid_block_exactly_and_workers_do_not_change_batches(shards):
    data = load_stream_data(f'webdataset:{shards}')
    assert (data.train_rows, data.eval_rows, data.num_classes, data.label_column) == (256, 72, 10, 'cls')
    full, position = [], None
    loader = _loader(data, workers=0)
    for i, batch in enumerate(loader):
        full.append(batch)
        if i == 1:  # 32 rows read: 8 rows into the second block of 24
            position = loader.position
    assert len(full) == 7 and position[1] == 1 and position[3] == 8
    resumed = _loader(data, workers=2)
    resumed.resume_from(position)
    rest = list(resumed)
    assert len(rest) == 5
    for (x, y), (x_ref, y_ref) in zip(rest, full[2:]):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    again = list(_loader(data, workers=2))  # the same epoch from 2 workers: the same batches, to the bit
    assert all(torch.equal(a[0], b[0]) for a, b in zip(again, full))
    other_epoch = _loader(data, workers=0)
    other_epoch.set_epoch(3)
    assert not torch.equal(next(iter(other_epoch))[0], full[0][0])


def test_a_short_part_of_the_stream_starts_again_and_resumes_there_too(shards):
    data = load_stream_data(f'webdataset:{shards}')
    loader = _loader(data, workers=0, steps=12)  # 12 x 16 = 192 rows from a part of 128: a second pass
    batches, positions = [], []
    for batch in loader:
        batches.append(batch)
        positions.append(loader.position)
    assert len(batches) == 12 and positions[-1][0] == 1  # pass 1
    labels = collections.Counter(torch.cat([y for _, y in batches[:8]]).tolist())
    assert sum(labels.values()) == 128
    resumed = _loader(data, workers=0, steps=12)
    resumed.resume_from(positions[9])
    assert all(torch.equal(a[0], b[0]) for a, b in zip(resumed, batches[10:]))


def test_stream_specs_and_refusals(shards, digits_small, tmp_path):
    parquet = tmp_path / 'pq'
    assert run_cli(digits_small, parquet, '--shard-size', '100', '--format', 'parquet',
                   command='shards').returncode == 0
    data = load_stream_data(f'parquet:{parquet}')
    assert (data.train_rows, data.eval_rows, data.label_names[:2]) == (256, 72, ['0', '1'])
    glob_only = load_stream_data(f'parquet:{parquet}/train-*.parquet', val_split='train')
    assert glob_only.train_rows == 256
    with pytest.raises(UserError, match="has no eval split"):
        load_stream_data(f'parquet:{parquet}/train-*.parquet')
    with pytest.raises(UserError, match='webdataset shards not found'):
        load_stream_data(f'webdataset:{tmp_path}/nothing-*.tar')
    mapped = datasets.load_dataset('webdataset', data_dir=shards)  # map-style reading of the same shards
    assert len(mapped['train']) == 256
    result = run_cli('--dataset', f'webdataset:{shards}', '--streaming', '--input-pipeline', 'memory', *FAST)
    assert result.returncode == 2 and '--input-pipeline memory' in result.stderr
    result = run_cli('--dataset', f'webdataset:{shards}', '--train-num-samples', '10', *FAST)
    assert result.returncode == 2 and '--train-num-samples applies to --streaming only' in result.stderr
    result = run_cli('--dataset', 'hfds/nobody/no-such-dataset', *FAST)
    assert result.returncode == 2 and "cannot load dataset 'nobody/no-such-dataset'" in result.stderr


def _expected(shards):
    train = datasets.load_dataset('webdataset', data_dir=shards, split='train')
    train = train.cast_column('png', datasets.Image(decode=False))
    return collections.Counter(hashlib.sha1(row['png']['bytes']).hexdigest() + f":{row['cls']}" for row in train)


@pytest.mark.long
def test_two_processes_cover_every_sample_once_per_epoch_and_resume_exactly_after_sigkill(shards, tmp_path):
    a, b, dumps = tmp_path / 'a', tmp_path / 'b', tmp_path / 'dumps'
    dumps.mkdir()
    run = ['--dataset', f'webdataset:{shards}', '--epochs', '2', '--checkpoint-steps', '2', *STREAM]
    result = accelerate_launch(HELPERS / 'stream_worker.py', dumps, *run, '--output', a)
    assert result.returncode == 0, result.stderr[-4000:]
    assert 'Input pipeline: stream (8 steps of 16 per process' in result.stderr

    seen = [json.loads((dumps / f'seen{rank}.json').read_text()) for rank in (0, 1)]
    expected = _expected(shards)
    for epoch in (0, 1):
        per_rank = [[key for e, keys in s if e == epoch for key in keys] for s in seen]
        assert len(per_rank[0]) == len(per_rank[1]) == 128
        assert collections.Counter(per_rank[0] + per_rank[1]) == expected  # every sample exactly once
    assert seen[0][0][1] != seen[0][8][1]  # epoch 1 draws another order
    with open(a / 'summary.csv') as f:
        assert [int(row['eval_count']) for row in csv.DictReader(f)] == [72, 72]  # every eval image once

    killed = accelerate_launch(HELPERS / 'train_crash.py', *run, '--output', b, env_extra={
        'TIMM_ICD_CRASH_AT': 'step:5'})  # both processes die mid-epoch 0, after checkpoint 4
    assert killed.returncode != 0
    assert find_latest_checkpoint(b).name == 'checkpoint-00000004'
    state = json.loads((find_latest_checkpoint(b) / 'run_state.json').read_text())
    # each process's place in its own stream: 64 rows read, 16 into its second block of 48
    assert [(p[0], p[1], p[3], p[4]) for p in state['stream']] == [(0, 1, 16, 64)] * 2
    done = accelerate_launch(REPO / 'train_icd.py', *run, '--output', b, '--resume', 'auto')
    assert done.returncode == 0, done.stderr[-4000:]
    weights_a = safetensors.torch.load_file(a / 'student' / 'model.safetensors')
    weights_b = safetensors.torch.load_file(b / 'student' / 'model.safetensors')
    for key in weights_a:
        torch.testing.assert_close(weights_b[key], weights_a[key], rtol=0, atol=1e-6, msg=key)
    assert (b / 'summary.csv').read_text() == (a / 'summary.csv').read_text()
