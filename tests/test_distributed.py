"""Two real CPU processes under accelerate launch (--cpu alone starts one: accelerate issue 2741)."""
import csv
import json

import pytest
import safetensors.torch
import torch

from helpers import FAST, HELPERS, REPO, accelerate_launch, eval_with_timm


def test_two_processes_sync_weights_gather_metrics_once_and_only_rank0_writes(tmp_path, digits_small):
    out, dumps = tmp_path / 'run', tmp_path / 'dumps'
    dumps.mkdir()
    result = accelerate_launch(
        str(HELPERS / 'dist_worker.py'), dumps, '--teacher', 'test_resnet',
        '--teacher-pretrained', 'false', '--student', 'test_efficientnet', '--dataset', digits_small, '--epochs',
        '1', '-b', '16', '-vb', '7', '--output', out, *FAST)
    assert result.returncode == 0, result.stderr[-4000:]
    assert 'Training on 2 processes' in result.stderr

    rank0 = safetensors.torch.load_file(dumps / 'rank0.safetensors')
    rank1 = safetensors.torch.load_file(dumps / 'rank1.safetensors')
    saved = safetensors.torch.load_file(out / 'student' / 'model.safetensors')
    assert rank0.keys() == rank1.keys() == saved.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
        assert torch.equal(rank0[key], saved[key]), key

    with open(out / 'summary.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1  # one writer
    # 72 eval images over 2 processes in batches of 7: padded shards, but every image counted exactly once
    assert int(rows[0]['eval_count']) == 72
    top1, _, _ = eval_with_timm(out / 'student', digits_small)
    assert float(rows[0]['eval_top1']) == pytest.approx(top1, abs=1e-9)
    # 256 rows, 16 per process and step, 2 processes: 8 steps
    state = (next((out / 'checkpoints').iterdir()) / 'run_state.json').read_text()
    assert '"global_step": 8' in state
    assert sorted(p.name for p in out.iterdir()) == ['args.yaml', 'checkpoints', 'curves.png', 'student', 'summary.csv']
    assert result.stdout.count('done:') == 0  # the worker prints nothing; train_icd.py prints on rank 0 only


def test_global_batches_equal_one_process_on_the_concatenated_batch(tmp_path):
    """ICD's global negatives and DIST's global intra-class term: 2 processes = 1 process on both halves."""
    result = accelerate_launch(str(HELPERS / 'global_negatives_worker.py'), tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    for rank in (0, 1):
        r = json.loads((tmp_path / f'rank{rank}.json').read_text())
        assert r['world'] == 2
        for loss in (r, r['dist']):
            assert loss['loss'] == pytest.approx(loss['loss_ref'], abs=1e-5)
            assert abs(loss['loss_local_only'] - loss['loss_ref']) > 1e-3  # the gather really changes the loss
            for name, diff in loss['grad_max_abs_diff'].items():
                assert diff < 1e-5, (rank, name, diff)
            assert all(norm > 0 for norm in loss['grad_norm_ref'].values())


def test_training_with_global_negatives_end_to_end(tmp_path, digits_small):
    out = tmp_path / 'run'
    result = accelerate_launch(
        str(REPO / 'train_icd.py'), '--teacher', 'test_resnet', '--teacher-pretrained', 'false', '--student',
        'test_efficientnet', '--method', 'icd', '--icd-negatives', 'global', '--dataset', digits_small, '--epochs',
        '1', '-b', '16', '--output', out, *FAST)
    assert result.returncode == 0, result.stderr[-4000:]
    with open(out / 'summary.csv') as f:
        row = list(csv.DictReader(f))[0]
    assert float(row['train_loss_icd']) > 0 and int(row['eval_count']) == 72
    record = json.loads((out / 'student' / 'distillation.json').read_text())
    assert record['icd']['negatives'] == 'global'
