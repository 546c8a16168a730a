"""Teacher cache (--teacher-cache): stored outputs equal the live teacher's within fp16, a run that reads the cache
never runs the teacher and ends where a run that wrote it ends, mismatched settings are refused naming the field,
a SIGKILL while writing leaves nothing wrong, 2 processes read disjoint rows that cover each epoch, and 2 or 3 runs
started together on one folder (one of them killed while computing an epoch) all finish with a cache that verifies
and trains readers exactly like a private one."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import safetensors.torch
import timm
import torch

from helpers import FAST, HELPERS, REPO, accelerate_launch, offline_env, run_cli
from timm_icd.cli.train import main
from timm_icd.base import UserError
from timm_icd.teacher_cache import TeacherCache, verify
from timm_icd.teacher_cache.claims import STALE_S, claim_path
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
                     script='tests/helpers/train_crash.py')
    assert killed.returncode == -signal.SIGKILL
    assert json.loads((cache / 'manifest.json').read_text())['epochs'] == []
    resumed = run_cli('--dataset', digits_small, '--epochs', '2', '--output', tmp_path / 'w', '--teacher-cache', cache,
                      '--resume', 'auto', *RUN)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    manifest = json.loads((cache / 'manifest.json').read_text())
    assert manifest['epochs'] == [0, 1] and manifest['rows'] == 256 and manifest['teacher_metrics']['top1'] >= 0

    ahead = tmp_path / 'ahead'  # written ahead by python -m timm_icd cache: the same arrays, to the bit
    result = run_cli('test_resnet', '--dataset', digits_small, '--epochs', '2', '--teacher-cache', ahead,
                     *RUN[2:], command='cache')
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
                     cache, *RUN, script='tests/helpers/cache_worker.py')
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
    written = accelerate_launch('-m', 'timm_icd', 'cache', 'test_resnet', '--dataset', digits_small, '--epochs',
                                '2', '--teacher-cache', cache, *RUN[2:])  # each process computes half the rows
    assert written.returncode == 0, written.stderr[-4000:]
    assert written.stdout.count('done:') == 1 and 'holds epochs [0, 1] of 256 rows' in written.stdout
    alone = run_cli('test_resnet', '--dataset', digits_small, '--epochs', '1', '--teacher-cache', single, *RUN[2:],
                    command='cache')
    assert alone.returncode == 0, alone.stderr[-2000:]
    for name in ('features', 'logits'):  # the same rows as one process writes (batches differ: float tolerance)
        np.testing.assert_allclose(np.load(cache / 'epoch-0000' / f'{name}.npy').astype(np.float32),
                                   np.load(single / 'epoch-0000' / f'{name}.npy').astype(np.float32), atol=2e-3)
    dumps = tmp_path / 'dumps'
    dumps.mkdir()
    result = accelerate_launch(HELPERS / 'cache_worker.py', dumps, '--dataset', digits_small,
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


def test_a_claim_holds_while_its_writer_lives_and_is_taken_over_when_it_is_gone(tmp_path, caplog):
    first = _cache(tmp_path)
    other = TeacherCache(first.root, first.manifest)  # another run on the same folder
    assert first.claim_epoch(0) == 'claimed' and first.claim_epoch(0) == 'claimed'  # its own claim, again
    held = other.claim_epoch(0)
    assert held['pid'] == os.getpid() and held['token'] == first.claims[0].token  # a live writer: wait for it
    path = claim_path(first.root, 0)
    claim = json.loads(path.read_text())
    gone = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
    for forged, reason in (({'pid': int(gone.stdout)}, 'its process'),  # a pid that ended on this machine
                           ({'started': '1'}, 'its process'),  # the pid is another process now
                           ({'machine': 'elsewhere'}, 'heartbeat stopped')):  # elsewhere: the heartbeat alone
        if 0 in other.claims:  # let go of the claim the last case took over, as a run that stops does
            other.claims.pop(0)._stop.set()
        path.write_text(json.dumps({**claim, **forged}))
        if forged.get('machine'):
            assert other.claim_epoch(0)['machine'] == 'elsewhere'  # a fresh heartbeat holds
            os.utime(path, (time.time() - STALE_S - 5,) * 2)
        assert other.claim_epoch(0) == 'claimed', forged
        assert reason in caplog.records[-1].getMessage()
        assert json.loads(path.read_text())['token'] == other.claims[0].token
    # the first writer stalled past the heartbeat: its rows go in, but the epoch is the new holder's to complete
    for cache in (first, other):
        cache.prepare_epoch(0, is_main=True)
        cache.write(0, torch.arange(64), torch.zeros(64, 10), torch.zeros(64, 24))
    first.finish_epoch(0, is_main=True)
    assert not first.complete(0) and path.exists()
    # completed epochs merge: each writer adds its own to what the manifest holds now, under the lock
    assert first.claim_epoch(1) == 'claimed'
    first.prepare_epoch(1, is_main=True)
    first.write(1, torch.arange(64), torch.zeros(64, 10), torch.zeros(64, 24))
    first.finish_epoch(1, is_main=True)
    other.finish_epoch(0, is_main=True)  # its manifest in memory predates epoch 1
    assert json.loads((first.root / 'manifest.json').read_text())['epochs'] == [0, 1]
    assert first.claim_epoch(0) == other.claim_epoch(1) == 'complete' and not list(first.root.glob('.claim-*'))


def _launch(digits_small, cache, tmp_path, student, teacher, extra=()):
    dumps = tmp_path / f'dumps-{student}'
    dumps.mkdir()
    cmd = [sys.executable, str(HELPERS / 'cache_worker.py'), dumps, '--dataset', digits_small, '--epochs', '2',
           '--output', tmp_path / f'out-{student}', '--teacher-cache', cache, '--student', student, *CONCURRENT,
           '--teacher-checkpoint', teacher, *extra]
    return subprocess.Popen([str(a) for a in cmd], cwd=REPO, env=offline_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _stopped(pid):
    with open(f'/proc/{pid}/stat') as f:
        return f.read().rsplit(')', 1)[1].split()[0] in 'Tt'


def _kill_a_claimant(procs, cache, rows=256):
    """SIGKILL a run while it holds an epoch's claim with part of the epoch's rows written (stopped first, so it
    cannot let go of the claim while it is looked at); its pid and epoch."""
    live = {p.pid: p for p in procs}
    for _ in range(30000):  # waits on the runs, not on a clock: they end or one is caught mid-epoch
        for path in cache.glob('.claim-epoch-*'):
            try:
                claim = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            pid, epoch = claim.get('pid'), int(path.name[-4:])
            if pid not in live or live[pid].poll() is not None:
                continue
            os.kill(pid, signal.SIGSTOP)
            while not _stopped(pid):
                time.sleep(0.001)
            try:
                held = json.loads(path.read_text())['token'] == claim['token']
                written = int(np.load(cache / f'epoch-{epoch:04d}' / 'written.npy').sum())
            except (OSError, ValueError):
                held = False
            if held and 0 < written < rows:
                os.kill(pid, signal.SIGKILL)
                assert live[pid].wait() == -signal.SIGKILL
                return pid, epoch
            os.kill(pid, signal.SIGCONT)
        assert any(p.poll() is None for p in procs), 'every run ended before one was caught mid-epoch'
        time.sleep(0.01)
    raise AssertionError('no run was caught holding a claim mid-epoch')


CONCURRENT = ['--teacher', 'test_resnet', '-b', '16', '--seed', '3', '--data-seed', '7', *FAST]


@pytest.fixture(scope='module')
def private_run(tmp_path_factory, digits_small):
    """A teacher checkpoint (a random test_resnet: the same teacher whatever the student) and a test_efficientnet
    run that writes its own, private cache."""
    folder = tmp_path_factory.mktemp('private')
    torch.manual_seed(0)
    safetensors.torch.save_file(timm.create_model('test_resnet', num_classes=10).state_dict(), folder / 't.safetensors')
    result = run_cli('--dataset', digits_small, '--epochs', '2', '--output', folder / 'run', '--teacher-cache',
                     folder / 'cache', '--student', 'test_efficientnet', *CONCURRENT, '--teacher-checkpoint',
                     folder / 't.safetensors')
    assert result.returncode == 0, result.stderr[-2000:]
    return folder


@pytest.mark.parametrize('students,kill', [
    (('test_efficientnet', 'test_byobnet'), False),
    # test_vit normalises with mean and std 0.5, the others with ImageNet's: the stored bits must not depend on it
    pytest.param(('test_efficientnet', 'test_byobnet', 'test_vit'), True, marks=pytest.mark.long)])
def test_concurrent_runs_share_one_cache_and_survive_a_killed_writer(digits_small, tmp_path, private_run, students,
                                                                    kill):
    cache = tmp_path / 'cache'
    procs = [_launch(digits_small, cache, tmp_path, s, private_run / 't.safetensors') for s in students]  # at once
    killed, epoch = _kill_a_claimant(procs, cache) if kill else (None, None)
    survivors = [(s, p, p.communicate(timeout=600)) for s, p in zip(students, procs) if p.pid != killed]
    for student, proc, (_, err) in survivors:
        assert proc.returncode == 0, (student, err[-3000:])
    report = verify(cache)
    assert report['epochs'] == [0, 1] and report['damaged'] == {} and report['incomplete'] == []
    assert not list(cache.glob('.claim-*')) and not list(cache.rglob('.tmp-*'))
    rows = [json.loads((tmp_path / f'dumps-{s}' / 'cache0.json').read_text())['rows'] for s, _, _ in survivors]
    takeovers = [err.count(f'the claim on epoch {epoch} by pid {killed} on ') for _, _, (_, err) in survivors]
    if kill:  # one survivor took the dead writer's epoch over; the teacher ran at most once more than needed
        assert sum(takeovers) == 1 and 256 <= sum(rows) <= 512, (takeovers, rows)
    else:  # the teacher ran once per epoch, whichever run ran it; the other waited and replayed
        assert sum(rows) == 512, rows
    for name in ('features', 'logits', 'written'):  # what a private cache holds, to the bit
        for e in (0, 1):
            assert np.array_equal(np.load(cache / f'epoch-000{e}' / f'{name}.npy'),
                                  np.load(private_run / 'cache' / f'epoch-000{e}' / f'{name}.npy')), (name, e)
    reader = run_cli('--dataset', digits_small, '--epochs', '2', '--output', tmp_path / 'reader', '--teacher-cache',
                     cache, '--student', 'test_efficientnet', *CONCURRENT, '--teacher-checkpoint',
                     private_run / 't.safetensors')
    assert reader.returncode == 0 and 'the teacher never runs' in reader.stderr, reader.stderr[-2000:]
    private, shared = _weights(private_run / 'run'), _weights(tmp_path / 'reader')
    for key in private:
        torch.testing.assert_close(shared[key], private[key], rtol=0, atol=0, msg=key)
