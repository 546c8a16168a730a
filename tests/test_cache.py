"""Teacher cache (--teacher-cache): stored outputs equal the live teacher's within fp16, a run that reads the cache
never runs the teacher and ends where a run that wrote it ends, mismatched settings are refused naming the field,
a SIGKILL while writing leaves nothing wrong, and 2 processes read disjoint rows that cover each epoch."""
import json
import signal

import numpy as np
import pytest
import safetensors.torch
import torch

from conftest import FAST, REPO, offline_env, run_cli
from test_distributed import accelerate_launch
from timm_icd.cli.train import main
from timm_icd.base import UserError
from timm_icd.teacher_cache import TeacherCache
from timm_icd.teacher_cache.runtime import rows_to_fill

RUN = ['--teacher', 'test_resnet', '--teacher-pretrained', 'false', '--student', 'test_efficientnet', '-b', '32',
       '--seed', '3', '--data-seed', '7', *FAST]


def _cache(tmp_path, features='fp16', topk=0, rows=64, dim=24, classes=10):
    return TeacherCache.create_or_open(tmp_path / f'c-{features}-{topk}', {'data_seed': 0},
                                       {'features': features, 'topk': topk}, rows, dim, classes, is_main=True)


@pytest.mark.parametrize('features,topk', [('fp16', 0), ('int8', 0), ('fp16', 3)])
def test_stored_outputs_come_back_within_their_precision(tmp_path, features, topk):
    cache = _cache(tmp_path, features, topk)
    cache.prepare_epoch(0, is_main=True)
    gen = torch.Generator().manual_seed(0)
    logits, feats = torch.randn(64, 10, generator=gen) * 3, torch.randn(64, 24, generator=gen)
    order = torch.randperm(64, generator=gen)
    for part in order.split(20):  # rows written in shuffled batches, as training writes them
        cache.write(0, part, logits[part], feats[part])
    assert len(cache.missing(0)) == 0
    cache.finish_epoch(0, is_main=True)
    index = torch.tensor([5, 0, 63, 17])
    got_logits, got_feats = cache.read(0, index, torch.device('cpu'))
    if features == 'fp16':
        torch.testing.assert_close(got_feats, feats[index].half().float(), rtol=0, atol=0)
    else:  # int8 with a per-row scale: at most half a step of max|f| / 127 off
        step = feats[index].abs().amax(dim=1, keepdim=True) / 127
        assert ((got_feats - feats[index]).abs() <= step / 2 + 1e-6).all()
    if topk == 0:
        torch.testing.assert_close(got_logits, logits[index].half().float(), rtol=0, atol=0)
    else:  # softmax exact on the top K; the rest share the remaining mass equally
        p, q = logits[index].softmax(1), got_logits.softmax(1)
        top = logits[index].topk(3, dim=1).indices
        torch.testing.assert_close(q.gather(1, top), p.gather(1, top), rtol=1e-5, atol=1e-6)
        rest = torch.ones_like(q, dtype=torch.bool).scatter_(1, top, False)
        torch.testing.assert_close(q[rest].view(4, 7).sum(1), p[rest].view(4, 7).sum(1), rtol=1e-4, atol=1e-6)
        assert torch.allclose(q[rest].view(4, 7), q[rest].view(4, 7)[:, :1].expand(-1, 7), atol=1e-6)
    assert cache.bytes_per_row() == {('fp16', 0): 24 * 2 + 10 * 2 + 1, ('int8', 0): 24 + 4 + 10 * 2 + 1,
                                     ('fp16', 3): 24 * 2 + 3 * 4 + 3 * 4 + 4 + 1}[(features, topk)]


def test_an_epoch_is_read_only_once_every_row_is_in(tmp_path):
    cache = _cache(tmp_path)
    cache.prepare_epoch(0, is_main=True)
    cache.write(0, torch.arange(60), torch.zeros(60, 10), torch.zeros(60, 24))
    with pytest.raises(RuntimeError, match='lacks 4 rows'):
        cache.finish_epoch(0, is_main=True)
    assert not cache.complete(0)
    assert json.loads((cache.root / 'manifest.json').read_text())['epochs'] == []
    with pytest.raises(UserError, match='was written for another data_seed'):
        TeacherCache.create_or_open(cache.root, {'data_seed': 1}, {'features': 'fp16', 'topk': 0}, 64, 24, 10, True)
    with pytest.raises(UserError, match='stores'):
        TeacherCache.create_or_open(cache.root, {'data_seed': 0}, {'features': 'int8', 'topk': 0}, 64, 24, 10, True)


def _weights(folder):
    return safetensors.torch.load_file(folder / 'student' / 'model.safetensors')


@pytest.mark.long
def test_cached_runs_equal_the_writing_run_stay_close_to_live_and_refuse_other_settings(digits_small, tmp_path,
                                                                                       capsys):
    cache = tmp_path / 'cache'
    live = run_cli('--dataset', digits_small, '--epochs', '2', '--output', tmp_path / 'live', *RUN)
    assert live.returncode == 0, live.stderr[-2000:]
    # the writing run is killed mid-epoch 0: nothing is marked complete, and its resume finishes the cache
    killed = run_cli('--dataset', digits_small, '--epochs', '2', '--output', tmp_path / 'w', '--teacher-cache', cache,
                     '--checkpoint-steps', '3', *RUN, env=offline_env(TIMM_ICD_CRASH_AT='step:5'),
                     script='tests/train_crash.py')
    assert killed.returncode == -signal.SIGKILL
    assert json.loads((cache / 'manifest.json').read_text())['epochs'] == []
    resumed = run_cli('--dataset', digits_small, '--epochs', '2', '--output', tmp_path / 'w', '--teacher-cache', cache,
                      '--resume', 'auto', *RUN)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    manifest = json.loads((cache / 'manifest.json').read_text())
    assert manifest['epochs'] == [0, 1] and manifest['rows'] == 256 and manifest['teacher_metrics']['top1'] >= 0

    ahead = tmp_path / 'ahead'  # written ahead by python -m timm_icd.cache: the same arrays, to the bit
    result = run_cli('test_resnet', '--dataset', digits_small, '--epochs', '2', '--teacher-cache', ahead,
                     *RUN[2:], module='timm_icd.cache')
    assert result.returncode == 0, result.stderr[-2000:]
    for epoch in (0, 1):
        for name in ('features', 'logits', 'written'):
            a = np.load(cache / f'epoch-000{epoch}' / f'{name}.npy')
            assert np.array_equal(a, np.load(ahead / f'epoch-000{epoch}' / f'{name}.npy')), (epoch, name)

    # a reader with the writer's settings never runs the teacher and ends exactly where the (killed and resumed)
    # writer ended (another batch size and process count: the 2-process test below; other seeds: the benchmark)
    dumps = tmp_path / 'dumps'
    dumps.mkdir()
    reader = run_cli(dumps, '--dataset', digits_small, '--epochs', '2', '--output', tmp_path / 'r', '--teacher-cache',
                     cache, *RUN, script='tests/cache_worker.py')
    assert reader.returncode == 0, reader.stderr[-2000:]
    assert 'the teacher never runs' in reader.stderr
    assert json.loads((dumps / 'cache0.json').read_text())['writes'] == 0
    writer_weights, reader_weights, live_weights = (_weights(tmp_path / n) for n in ('w', 'r', 'live'))
    for key in writer_weights:
        torch.testing.assert_close(reader_weights[key], writer_weights[key], rtol=0, atol=0, msg=key)
    # against the live teacher (float32 outputs), fp16-stored outputs move 16 steps of training only slightly
    keys = [k for k in live_weights if live_weights[k].is_floating_point()]
    flat = [torch.cat([w[k].float().flatten() for k in keys]) for w in (live_weights, reader_weights)]
    drift = ((flat[0] - flat[1]).norm() / flat[0].norm()).item()
    assert 0 < drift < 5e-3  # 3.6e-4 measured

    # refusals, in this process (train_icd.py's main; each would cost an interpreter start as a subprocess)
    for extra, field in ((['--data-seed', '8'], 'data_seed'), (['--input-size', '3', '20', '20'], 'input_size'),
                         (['--hflip', '0.5'], 'hflip'), (['--cache-topk', '2'], '--cache-topk'),
                         (['--cache-topk', '10'], "must be below the teacher's 10 classes"),
                         (['--mixup', '0.2'], '--mixup mixes or erases whole batches')):
        code = main(['--dataset', digits_small, '--epochs', '1', '--output', str(tmp_path / 'x'), '--teacher-cache',
                     str(cache), *RUN, *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and field in err[-1] and len(err[-1]) < 400, (extra, err[-3:])
        assert not (tmp_path / 'x').exists()


def test_two_processes_write_ahead_and_read_disjoint_rows_that_cover_each_epoch(digits_small, tmp_path):
    cache, single = tmp_path / 'cache', tmp_path / 'single'
    written = accelerate_launch(29560, '-m', 'timm_icd.cache', 'test_resnet', '--dataset', digits_small, '--epochs',
                                '2', '--teacher-cache', cache, *RUN[2:])  # each process computes half the rows
    assert written.returncode == 0, written.stderr[-4000:]
    assert written.stdout.count('done:') == 1 and 'holds epochs [0, 1] of 256 rows' in written.stdout
    alone = run_cli('test_resnet', '--dataset', digits_small, '--epochs', '1', '--teacher-cache', single, *RUN[2:],
                    module='timm_icd.cache')
    assert alone.returncode == 0, alone.stderr[-2000:]
    for name in ('features', 'logits'):  # the same rows as one process writes (batches differ: float tolerance)
        np.testing.assert_allclose(np.load(cache / 'epoch-0000' / f'{name}.npy').astype(np.float32),
                                   np.load(single / 'epoch-0000' / f'{name}.npy').astype(np.float32), atol=2e-3)
    dumps = tmp_path / 'dumps'
    dumps.mkdir()
    result = accelerate_launch(29561, REPO / 'tests' / 'cache_worker.py', dumps, '--dataset', digits_small,
                               '--epochs', '2', '--output', tmp_path / 'run', '--teacher-cache', cache,
                               *[a if a != '32' else '16' for a in RUN])  # a batch of 16 on each of 2 processes
    assert result.returncode == 0, result.stderr[-4000:]
    reads = [json.loads((dumps / f'cache{rank}.json').read_text()) for rank in (0, 1)]
    assert reads[0]['writes'] == reads[1]['writes'] == 0
    for epoch in (0, 1):
        rows = [[i for e, index in r['selected'] if e == epoch for i in index] for r in reads]
        assert len(rows[0]) == len(rows[1]) == 128
        assert not set(rows[0]) & set(rows[1]) and sorted(rows[0] + rows[1]) == list(range(256))
    rank0, rank1 = (safetensors.torch.load_file(dumps / f'rank{r}.safetensors') for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)


def test_each_process_fills_the_rows_it_owns_whenever_it_looks(tmp_path):
    # training wrote some rows; rank 0 fills its share and writes it before rank 1 even looks (a slow rank 1): rank 1
    # must still get exactly the rest (a split by place in the shrinking list of missing rows left every 4th row out)
    cache = _cache(tmp_path, rows=64)
    cache.prepare_epoch(0, is_main=True)
    trained = torch.arange(0, 40, 3)
    cache.write(0, trained, torch.zeros(len(trained), 10), torch.zeros(len(trained), 24))
    first = rows_to_fill(cache, 0, process_index=0, num_processes=2)
    cache.write(0, torch.from_numpy(first), torch.zeros(len(first), 10), torch.zeros(len(first), 24))
    second = rows_to_fill(cache, 0, process_index=1, num_processes=2)
    assert set(first).isdisjoint(second) and set(first) | set(second) == set(range(64)) - set(trained.tolist())
    assert abs(len(first) - len(second)) <= 1 and (first % 2 == 0).all()
    cache.write(0, torch.from_numpy(second), torch.zeros(len(second), 10), torch.zeros(len(second), 24))
    cache.finish_epoch(0, is_main=True)  # every row in
