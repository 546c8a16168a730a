"""The benchmark scripts run in their quick modes and write their result files."""
import csv
import json
import re
import shutil
import sys

import pytest

from helpers import REPO, run_cli


def test_paired_rows_give_a_hand_computed_t_interval():
    sys.path.insert(0, str(REPO / 'benchmarks'))
    from common import paired_rows
    scores = [(71.0, 70.0), (72.5, 70.5), (70.0, 70.0)]
    rows = [{'seed': s, 'method': m, 'test_top1': v}
            for s, (a, b) in enumerate(scores) for m, v in (('a', a), ('b', b))]
    result = paired_rows(rows + [{'seed': 9, 'method': 'a', 'test_top1': 50.0}], 'a', 'b')  # seed 9: unpaired
    # differences 1, 2, 0: mean 1, sd 1, t(0.975, 2) = 4.302653, half-width 4.302653 / sqrt(3)
    assert result['n'] == 3 and result['mean'] == 1.0 and result['seeds'] == [0, 1, 2]
    assert abs((result['high'] - result['low']) / 2 - 4.302653 / 3 ** 0.5) < 1e-5
    # t = 1 / (1 / sqrt(3)) with 2 degrees of freedom: two-sided p = 1 - t / sqrt(2 + t^2) = 1 - sqrt(3 / 5)
    assert abs(result['p'] - (1 - (3 / 5) ** 0.5)) < 1e-9
    assert paired_rows(rows[:2], 'a', 'b') is None  # one seed: no interval


def test_archived_quality_report_is_rewritten_from_the_committed_csvs(tmp_path):
    """The archived v0.2 benchmark's report path: the committed quality.md and quality.png come back from the
    committed CSVs, byte for byte."""
    results = REPO / 'benchmarks' / 'results'
    for name in ('quality_runs.csv', 'quality_curves.csv', 'quality_teachers.json', 'quality_findings.md'):
        shutil.copy(results / name, tmp_path / name)
    result = run_cli(tmp_path, script='benchmarks/archive/quality_report.py', timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / 'quality.md').read_text() == (results / 'quality.md').read_text()
    assert (tmp_path / 'quality.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert not (REPO / 'benchmarks' / 'quality.py').exists()


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


@pytest.mark.long
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


@pytest.mark.long
def test_data_throughput_quick_measures_every_path(tmp_path):
    import torch
    out = tmp_path / 'data_throughput.md'
    result = run_cli('--quick', '--threads', '1', '--data-dir', tmp_path / 'data', '--out', out,
                     script='benchmarks/data_throughput.py', timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    throughput, fidelity = _md_tables(text)
    rows = {(cells[0], cells[1]): cells[2:] for cells in throughput}
    gpu = torch.cuda.is_available()
    other_jitter = 'jitter in workers' if gpu else 'jitter on the device'
    bulk = {'timm create_loader', 'timm create_loader (prefetcher)', 'timm_icd imagefolder (loader)',
            f'timm_icd imagefolder (loader, {other_jitter})', 'timm_icd save_to_disk (loader)', 'timm_icd memory',
            'timm_icd webdataset shards (stream)'}
    realistic = {'timm create_loader', 'timm create_loader (prefetcher)', 'timm_icd imagefolder (loader)',
                 'timm_icd imagefolder (loader, --decode-scale off)', f'timm_icd imagefolder (loader, {other_jitter})',
                 'timm_icd webdataset shards (stream)', 'timm_icd webdataset shards --max-size 512 (stream)',
                 'timm_icd webdataset shards (stream, --decode-device '
                 f'{"cuda" if gpu else "cpu: the --decode-device path on the CPU"})'}
    assert set(rows) == {('500x375', p) for p in bulk} | {('realistic mix', p) for p in realistic}
    for (set_name, name), (rate, per_worker, vs_best, cpu_ms, decode) in rows.items():
        assert float(rate) > 0 and float(cpu_ms) > 0, name
        best = max(float(r[0]) for (s, p), r in rows.items() if s == set_name and p.startswith('timm '))
        assert float(vs_best.rstrip('x')) == pytest.approx(float(rate) / best, abs=0.01), name
        if name == 'timm_icd memory':  # no workers; its one-off decode is reported apart
            assert per_worker.startswith('n/a') and float(decode) > 0
        else:
            assert float(per_worker) == pytest.approx(float(rate)) and decode == '-', name  # quick: 1 worker
    loader = float(rows[('500x375', 'timm_icd imagefolder (loader)')][2].rstrip('x'))
    assert f"Loader path on the 500x375 set against timm's best: {loader:.2f}x (target >= 1.0x: " in text
    assert re.search(r"Shards written with --max-size 512 on the realistic mix against timm's best on the original "
                     r"JPEGs: [\d.]+x \(target >= 2\.0x: (met|not met)\)", text)
    assert [r[0] for r in fidelity] == ['500x375', 'realistic mix'] and [r[1] for r in fidelity] == ['96', '48']
    for _, images, applied, median, p5, lowest in fidelity:  # at 64 px most crops are shrunk 2x or more
        count, share = re.fullmatch(r'(\d+) \(([\d.]+)%\)', applied).groups()
        assert 0 < int(count) <= int(images) and float(share) == pytest.approx(100 * int(count) / int(images), abs=0.1)
        assert 30 < float(lowest) <= float(p5) <= float(median)
    bounded = re.search(r'--quality 90`\) on the realistic mix: (\d+) of 48 images resized; PSNR .* median ([\d.]+) dB',
                        text)
    assert bounded and int(bounded.group(1)) > 0 and float(bounded.group(2)) > 30
    assert 'Top-1 of training on the bounded images is not measured' in text
    assert 'quick mode: JPEGs from real photographs (500x375: 96 JPEGs, mean 500x375 px' in text
    assert f'torch {torch.__version__}' in text  # the machine line


def test_realistic_jpegs_mix_sizes_with_a_tail_of_large_photographs(tmp_path):
    import sys
    from pathlib import Path
    from PIL import Image
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
    from common import BULK_SIZES, realistic_jpegs
    folder = realistic_jpegs(tmp_path / 'mix', 30, classes=3, seed=1)
    sizes = [Image.open(f).size for f in sorted(folder.glob('class_*/img_*.jpg'))]
    assert len(sizes) == 30
    bulk = {(w, h) for w, h, _ in BULK_SIZES}
    tail = [s for s in sizes if s not in bulk]
    assert 1 <= len(tail) <= 9 and all(1000 <= max(s) <= 3000 for s in tail)  # 10% expected: 3 of 30
    assert len({s for s in sizes if s in bulk}) >= 3  # several of the bulk shapes


def test_imagenet_like_jpegs_writes_distinct_imagenet_sized_files(tmp_path):
    import hashlib
    import sys
    from pathlib import Path
    from PIL import Image
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
    from common import imagenet_like_jpegs
    folder = imagenet_like_jpegs(tmp_path / 'jpegs', 12, classes=3, seed=5)
    files = sorted(folder.glob('class_*/img_*.jpg'))
    assert len(files) == 12 and {f.parent.name for f in files} == {'class_0', 'class_1', 'class_2'}
    assert all(f.parent.name == f'class_{int(f.stem[4:]) % 3}' for f in files)
    assert len({hashlib.sha256(f.read_bytes()).digest() for f in files}) == 12  # no two alike
    for f in files:
        with Image.open(f) as image:
            assert image.format == 'JPEG' and image.mode == 'RGB' and image.size == (500, 375)
    mtimes = [f.stat().st_mtime_ns for f in files]
    assert imagenet_like_jpegs(folder, 12, classes=3, seed=5) == folder  # idempotent: nothing rewritten
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    again = imagenet_like_jpegs(tmp_path / 'again', 12, classes=3, seed=5)  # deterministic from the seed
    assert [f.read_bytes() for f in files] == [(again / f.relative_to(folder)).read_bytes() for f in files]
    other = imagenet_like_jpegs(folder, 6, classes=2, seed=6)  # other settings replace the tree
    assert len(list(other.glob('class_*/img_*.jpg'))) == 6


@pytest.mark.long
def test_gpu_check_script_dry_run_writes_every_section(tmp_path):
    """benchmarks/gpu_check.sh, as run on a lent GPU, in its seconds-long CPU form: every part runs and is collected."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, 'GPU_CHECK_QUICK': '1', 'PY': sys.executable, 'RES': str(tmp_path)}
    result = subprocess.run(['bash', str(root / 'benchmarks' / 'gpu_check.sh')], env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    report = (tmp_path / 'gpu.md').read_text()
    for section in ('## Step time', '## Train-loader throughput', '## Epoch time', '## Decoding on the GPU'):
        assert section in report, section
    import torch
    label = 'cuda' if torch.cuda.is_available() else 'cpu: the --decode-device path on the CPU'
    assert f'| timm_icd webdataset shards (stream, --decode-device {label}) |' in report.split('## Decoding on')[1]
    rows = [line for line in (tmp_path / 'gpu_epoch_time.md').read_text().splitlines() if line.startswith('| 28 px')]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip('|').split('|')]
    floor, memory, ratio = float(cells[5]), float(cells[6]), float(cells[7])
    # the cells are rounded to 3 decimals: the ratio from them is off by at most that rounding's relative error
    bound = ratio * (0.0005 / floor + 0.0005 / memory) + 0.0005
    assert floor > 0 and memory > 0 and abs(ratio - memory / floor) <= bound


@pytest.mark.long
def test_arch_coverage_quick_distills_each_head_structure(tmp_path):
    out = tmp_path / 'arch_coverage.md'
    result = run_cli('--quick', '--out', out, script='benchmarks/arch_coverage.py', timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    assert '**5 of 5 timm families distill as student and as teacher**' in text
    rows = {cells[1].strip(): [c.strip() for c in cells[2:-1]] for cells in
            (line.split('|') for line in text.splitlines() if line.startswith('| ') and ' family ' not in line)}
    assert set(rows) == {'resnet', 'vision_transformer', 'crossvit', 'sequencer', 'dla'}
    for family, (model, params, side, student, teacher, width, values, layer, hooked, seconds) in rows.items():
        assert (student, teacher, layer) == ('ok', 'ok', 'ok'), family
        assert width.isdigit() and values == 'yes' and float(seconds) > 0, family  # width equals pre_logits
    assert rows['sequencer'][5] == '32' and rows['crossvit'][5] == '288'  # NHWC head (shrunk); two heads concatenated
    assert '## Failures and refusals\n\nNone.' in text
    wrong = run_cli('--families', 'resnet,nope', '--out', out, script='benchmarks/arch_coverage.py')
    assert wrong.returncode == 2 and 'unknown families: nope' in wrong.stderr


def _md_tables(section: str) -> list:
    """The tables of a markdown section, each a list of rows (lists of stripped cells) without header and rule."""
    tables, current = [], []
    for line in section.splitlines() + ['']:
        if line.startswith('|'):
            current.append([c.strip() for c in line.strip().strip('|').split('|')])
        elif current:
            tables.append(current[2:])
            current = []
    return tables


@pytest.mark.long
def test_teacher_cache_quick_writes_every_row_of_the_table(tmp_path):
    import math
    out = tmp_path / 'teacher_cache.md'
    result = run_cli('--quick', '--out', out, '--data-dir', tmp_path / 'data', script='benchmarks/cache_speed.py',
                     timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    assert 'python benchmarks/cache_speed.py --quick' in text and 'Total time:' in text and 'torch ' in text
    sections = {s.split('\n', 1)[0]: s for s in text.split('\n## ')[1:]}
    assert list(sections) == ['Epoch time', 'When the cache has paid for itself', 'Disk',
                              'Student quality: live teacher against the cache']
    times, summary = _md_tables(sections['Epoch time'])
    rows = {r[1]: r for r in times}
    assert [r[0] for r in times] == ['16 px'] * 5
    assert list(rows) == ['vanilla', 'live icd+kd', 'write-through icd+kd', 'cached icd+kd', 'ahead writer']
    epoch = {v: float(r[2]) for v, r in rows.items()}
    for variant, r in rows.items():  # each ratio is this row's time over vanilla's and live's
        assert epoch[variant] > 0, variant
        assert float(r[3]) == pytest.approx(epoch[variant] / epoch['vanilla'], rel=2e-3, abs=1e-3), variant
        assert float(r[4]) == pytest.approx(epoch[variant] / epoch['live icd+kd'], rel=2e-3, abs=1e-3), variant
    assert float(rows['cached icd+kd'][6]) > 0 and float(rows['write-through icd+kd'][7]) > 0  # read; fill + flush
    (setting, cached_vanilla, live_vanilla, cached_live, through_live, met), = summary
    assert float(cached_vanilla) == pytest.approx(epoch['cached icd+kd'] / epoch['vanilla'], rel=2e-3, abs=1e-3)
    assert float(live_vanilla) == pytest.approx(epoch['live icd+kd'] / epoch['vanilla'], rel=2e-3, abs=1e-3)
    assert float(cached_live) == pytest.approx(epoch['cached icd+kd'] / epoch['live icd+kd'], rel=2e-3, abs=1e-3)
    assert float(through_live) == pytest.approx(epoch['write-through icd+kd'] / epoch['live icd+kd'], rel=2e-3,
                                                abs=1e-3)
    assert met == ('yes' if float(cached_vanilla) <= 1.10 else 'NO')
    assert 'to the bit: 16 px: yes' in sections['Epoch time']  # ahead writer == write-through run

    (pay,), = _md_tables(sections['When the cache has paid for itself'])
    saving, extra, ahead = float(pay[1]), float(pay[2]), float(pay[4])
    assert saving == pytest.approx(epoch['live icd+kd'] - epoch['cached icd+kd'], abs=2e-3)
    assert extra == pytest.approx(epoch['write-through icd+kd'] - epoch['live icd+kd'], abs=2e-3)
    assert ahead == pytest.approx(epoch['ahead writer'], rel=2e-3, abs=1e-3)
    for cell, cost in ((pay[3], extra), (pay[5], ahead)):  # ceil(cost / saving), or why there is no such number
        if cell.startswith('never'):
            assert saving <= 0.001
        elif cell.startswith('0 (no extra'):
            assert cost <= 0.001
        else:
            students, exact = re.fullmatch(r'(\d+) \(([\d.]+)\)', cell).groups()
            assert int(students) == math.ceil(float(exact) - 1e-9) and float(exact) > 0

    disk, = _md_tables(sections['Disk'])
    by_storage = {(r[0], r[1]): r for r in disk}
    fp16, int8 = by_storage[('16 px', 'fp16 features, all logits (fp16)')], \
        by_storage[('16 px', 'int8 features, all logits (fp16)')]
    for r, per_row in ((fp16, lambda d, c: d * 2 + c * 2 + 1), (int8, lambda d, c: d + 4 + c * 2 + 1)):
        dim, classes, bytes_per_row, rows_, formula, du, apparent = (int(c.split()[0].replace(',', '')) for c in r[2:])
        assert bytes_per_row == per_row(dim, classes) and formula == bytes_per_row * rows_ and rows_ > 0
        assert du > 0 and formula < apparent < formula + 6 * 256  # the .npy headers
    imagenet = {r[1]: r for r in disk if r[0].startswith('ImageNet-1k')}
    assert imagenet['fp16 features, all logits (fp16)'][4:7] == ['6097', '1281167', '7,811,275,199 B (7.27 GiB)']
    assert imagenet['int8 features, top-10 logits'][4:7] == ['2137', '1281167', '2,737,853,879 B (2.55 GiB)']

    quality, = _md_tables(sections['Student quality: live teacher against the cache'])
    (seed, live, cached, diff, live_s, cached_s, role), = quality
    assert seed == '0' and 0 <= float(live) <= 100 and 0 <= float(cached) <= 100 and role == 'wrote the cache'
    assert float(diff) == pytest.approx(float(cached) - float(live), abs=0.011)
    assert float(live_s) > 0 and float(cached_s) > 0

    with open(out.with_suffix('.csv')) as f:
        raw = list(csv.DictReader(f))
    epochs = [r for r in raw if r['part'] == 'timing' and r['metric'] == 'epoch_seconds']
    assert len(epochs) == 7 * 2 and all(float(r['value']) > 0 for r in epochs)  # vanilla and cached: 2 runs each
    second = {}  # with 2 epochs, the table's median after the first is epoch 1's time (of both runs, if two)
    for r in epochs:
        if r['epoch'] == '1':
            second.setdefault(r['variant'].split(' (run')[0], []).append(float(r['value']))
    for variant, times in second.items():
        assert epoch[variant] == pytest.approx(sum(times) / len(times), rel=2e-3, abs=2e-4), variant
    assert {r['variant'] for r in raw if r['part'] == 'quality' and r['metric'] == 'test_top1'} == {'live', 'cached'}
    int8 = {r['metric']: float(r['value']) for r in raw if r['part'] == 'int8'}
    assert 0 < int8['relative_l2_median'] <= int8['relative_l2_max'] < 0.02 and 0.999 < int8['cosine_min'] <= 1
    assert f"relative L2 error median {int8['relative_l2_median']:.4f}" in text


def test_loader_profile_sorts_samples_into_stages(tmp_path):
    """py-spy's collapsed stacks: the innermost frame a stage claims decides (leaf-only stages look at that frame
    alone), workers (their loop and their queue's feeder thread) and the main process are told apart, and the set-up
    outside the timed epochs is set aside."""
    import sys
    sys.path.insert(0, str(REPO / 'benchmarks'))
    import loader_profile as lp
    proc = 'process 7:"python loader_profile.py --run x"'
    worker = f'{proc};_worker_loop (torch/utils/data/_utils/worker.py:300);fetch (torch/utils/data/_utils/fetch.py:52)'
    main = f'{proc};run_child (loader_profile.py:1);timm_icd_path.<locals>.epoch (data_throughput.py:126)'
    raw = tmp_path / 'samples.txt'
    raw.write_text('\n'.join([
        f'{worker};__getitems__ (timm_icd/data/sources.py:370);seeded_transform (timm_icd/data/sources.py:246);'
        f'Compose.__call__ (torchvision/transforms/transforms.py:95);load (PIL/ImageFile.py:300) 7',
        f'{worker};seeded_transform (timm_icd/data/sources.py:244) 3',  # seeding: the innermost frame
        f'{worker};seeded_transform (timm_icd/data/sources.py:246);Compose.__call__ (x.py:95) 2',  # dispatch
        f'{worker};collate_images (timm_icd/data/decode.py:100);stack_images (timm_icd/data/decode.py:95) 5',
        f'{main};__call__ (timm_icd/data/pipeline.py:133) 4',
        f'{main};_next_data (torch/utils/data/dataloader.py:1400);_recv (multiprocessing/connection.py:1) 1',
        f'{proc};_bootstrap (threading.py:1);_feed (multiprocessing/queues.py:244);dumps (reduction.py:51) 6',
        f'{proc};<module> (loader_profile.py:1);_find_and_load (<frozen importlib._bootstrap>:1) 9',
        f'{worker};mystery (somewhere.py:1) 2',
        'a line broken by a newline in a command',
    ]) + '\n')
    stages, other = lp.parse(raw)
    assert stages == {'JPEG decode': 7, 'per-sample RNG seeding': 3,
                      'transform-call overhead (Compose, nn.Module dispatch)': 2, 'collate': 5,
                      'normalise (main process)': 4, 'receive batch (unpickle, shared memory)': 1, lp.SETUP: 9,
                      'send batch (pickle, shared memory)': 6,  # a worker queue's feeder thread
                      'loader bookkeeping': 2}  # an unclaimed frame passes the sample to its caller (fetch.py)
    assert not other


def test_loader_profile_shares_out_the_measured_cpu_time_by_samples(tmp_path):
    """The report from kept samples (``--again``): each stage gets its share of the samples times the median CPU-ms
    per image of the runs without the sampler; the sampled milliseconds are samples / rate / images."""
    import sys
    sys.path.insert(0, str(REPO / 'benchmarks'))
    import loader_profile as lp
    worker = 'process 7:"python x";_worker_loop (torch/utils/data/_utils/worker.py:300)'
    main = 'process 7:"python x";timm_path.<locals>.epoch (data_throughput.py:142)'
    samples = {  # timm: 10 samples; timm_icd: 10
        'timm': [f'{worker};load (PIL/ImageFile.py:1) 6', f'{worker};fast_collate (timm/data/loader.py:64) 2',
                 f'{main};PrefetchLoader.__iter__ (timm/data/loader.py:120) 2'],
        'ours': [f'{worker};load (PIL/ImageFile.py:1) 4', f'{worker};fast_slice (datasets/table.py:205) 4',
                 f'{worker};stack_images (timm_icd/data/decode.py:95) 2'],
    }
    runs = []
    for k, (path, name, cpu_ms) in enumerate([('timm create_loader (prefetcher)', 'timm', 5.0),
                                              ('timm_icd imagefolder (loader)', 'ours', 6.0),
                                              ('timm create_loader (prefetcher)', 'timm', 4.0),
                                              ('timm_icd imagefolder (loader)', 'ours', 7.0),
                                              ('timm create_loader (prefetcher)', 'timm', 9.0),
                                              ('timm_icd imagefolder (loader)', 'ours', 6.5)]):
        (tmp_path / f'samples_{k}.txt').write_text('\n'.join(samples[name]) + '\n')
        runs.append(dict(path=path, round=k // 2, images=100, cpu_ms=cpu_ms, sampled_images=100, sampled_cpu_ms=0.0,
                         raw=f'samples_{k}.txt', rate=250))
    (tmp_path / 'runs.json').write_text(json.dumps(runs))
    assert lp.main(['--again', '--keep', str(tmp_path), '--out', str(tmp_path / 'lp.md')]) == 0
    rows = {cells[0]: cells[1:] for cells in _md_tables((tmp_path / 'lp.md').read_text())[0]}
    assert rows['JPEG decode'] == ['3.00', '2.60', '-0.40']  # 6/10 of 5.0 (median of 5, 4, 9); 4/10 of 6.5
    assert rows['collate'] == ['1.00', '1.30', '+0.30']
    assert rows['normalise (main process)'] == ['1.00', '0.00', '-1.00']
    assert rows['dataset rows (datasets / timm reader) and __getitem__'] == ['0.00', '2.60', '+2.60']
    assert rows['**CPU-ms per image (median of 3 runs without the sampler)**'] == ['5.00', '6.50', '+1.50']
    assert rows['sampled ms per image, all stages (running or runnable)'] == ['0.40', '0.40', '+0.00']  # 30 / 250 / 300
    (tmp_path / 'settings.json').write_text(json.dumps({  # the kept runs' own command and settings head the report
        'command': 'python benchmarks/loader_profile.py --images 7', 'machine': 'M', 'date': '2001-02-03',
        'minutes': 4.2, 'images': 7, 'size': 40, 'batch_size': 5, 'workers': 3, 'epochs': 1, 'rounds': 3,
        'quick': False}))
    lp.main(['--again', '--keep', str(tmp_path), '--out', str(tmp_path / 'lp.md')])
    text = (tmp_path / 'lp.md').read_text()
    assert 'Generated by `python benchmarks/loader_profile.py --images 7` (its samples re-sorted by' in text
    assert 'on M, 2001-02-03; 7 JPEGs' in text and '40 px, batch 5, 3 workers' in text and '4.2 min' in text
    (tmp_path / 'runs.json').write_text(json.dumps([r for r in runs if r['path'].startswith('timm ')]))
    with pytest.raises(SystemExit, match='holds no run of timm_icd imagefolder'):
        lp.main(['--again', '--keep', str(tmp_path), '--out', str(tmp_path / 'lp.md')])
