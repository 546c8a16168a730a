"""The benchmark scripts run in their quick modes and write their result files."""
import csv
import re

import pytest

from conftest import run_cli

METHODS = {'vanilla', 'kd', 'timm_logit', 'timm_feature', 'icd', 'icd+kd'}


def test_quality_quick_trains_every_method_and_writes_results(tmp_path):
    out, data = tmp_path / 'results', tmp_path / 'data'
    result = run_cli('--quick', '--out', out, '--data-dir', data, script='benchmarks/quality.py', timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out / 'quality_quick_runs.csv') as f:
        rows = list(csv.DictReader(f))
    assert {r['method'] for r in rows} == METHODS and len(rows) == 6
    for r in rows:
        assert int(r['test_size']) == 500 and int(r['train_size']) == 320
        assert 0.0 <= float(r['test_top1']) <= 100.0 and float(r['train_loss']) > 0
    taus = {r['method']: float(r['tau']) for r in rows}
    assert taus['icd'] > 0 and taus['icd+kd'] > 0 and taus['kd'] == 0 and taus['timm_logit'] == 0
    report = (out / 'quality_quick.md').read_text()
    assert '| resnet18->mobilenetv3_small_050 |' in report and 'quick mode' in report
    assert (out / 'quality_quick.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert not list(out.glob('*.safetensors'))  # weights stay in the data folder
    # a second invocation resumes: nothing is retrained, the report is rewritten
    again = run_cli('--quick', '--out', out, '--data-dir', data, script='benchmarks/quality.py', timeout=600)
    assert again.returncode == 0 and 'seed 0: test top-1' not in again.stdout
    assert len((out / 'quality_quick_runs.csv').read_text().strip().splitlines()) == 7


def test_step_time_quick_times_every_variant(tmp_path):
    out = tmp_path / 'step_time.md'
    result = run_cli('--quick', '--out', out, script='benchmarks/step_time.py', timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    for variant in ('floor', 'timm_logit', 'timm_feature', 'kd', 'icd', 'icd+kd', 'icd+kd bf16-teacher',
                    'icd+kd channels_last'):
        assert f'| {variant} |' in text
    assert text.count('| test_resnet->test_efficientnet | 32 |') == 1
    sections = text.split('\n### ')[1:]
    assert len(sections) == 2
    for section in sections:  # every ratio is this row's median over its own floor's and timm_feature's
        rows = {cells[1].strip(): [float(c) for c in cells[2:5]] for cells in
                (line.split('|') for line in section.splitlines() if line.startswith('| ') and 'ms/step' not in line)}
        for name, (ms, to_floor, to_feature) in rows.items():
            floor = rows['floor channels_last' if 'channels_last' in name else 'floor'][0]
            assert ms > 0 and to_floor == pytest.approx(ms / floor, rel=0.03), name
            assert to_feature == pytest.approx(ms / rows['timm_feature'][0], rel=0.03), name


def test_step_time_profile_breaks_down_op_time(tmp_path):
    result = run_cli('--quick', '--profile', 'test_resnet->test_efficientnet', '32', '--batch-size', '4', '--out',
                     tmp_path / 'step_time.md', script='benchmarks/step_time.py', timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    text = (tmp_path / 'step_time_profile_cnn_32.md').read_text()
    totals = re.search(r'floor ([\d.]+) ms, timm_feature ([\d.]+) ms .*icd\+kd ([\d.]+) ms', text)
    assert totals and all(float(t) > 0 for t in totals.groups())
    assert '| `aten::' in text  # per-op rows


def test_scaling_quick_measures_batch_processes_and_paper_arithmetic(tmp_path):
    out = tmp_path / 'scaling.md'
    result = run_cli('--quick', '--out', out, script='benchmarks/scaling.py', timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    # B=16: time, 1 KiB of logits, memory (nan where /proc/self/clear_refs is not writable)
    assert re.search(r'^\| 16 \| [\d.]+ \| 0\.00 \| ([\d.]+|nan) \|$', text, re.M)
    assert re.search(r'^\| 2 \| 8 \| [\d.]+ \| [\d.]+ \| 16 \|', text, re.M)  # 2 processes, global B = 16
    assert 'not measured' not in text
    share = float(re.search(r'The ICD term is ([\d.]+)% of the step', text).group(1))
    assert 0 < share < 1  # the 8-GPU arithmetic: the B_global^2 term is a sliver of the step
