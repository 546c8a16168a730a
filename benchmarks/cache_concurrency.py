#!/usr/bin/env python3
"""Two runs started together on one teacher cache: wait for the run that claimed an epoch, or compute one's own.

What ``timm_icd/teacher_cache/storage.py`` chose between, measured: two real ``train_icd.py`` processes (different
students, the same teacher and data settings) started at the same moment,

* ``wait`` (what the cache does): one ``--teacher-cache`` folder; the run that claims an epoch computes it, the other
  waits for it and replays it;
* ``own``: a private ``--teacher-cache`` folder per run: each computes and writes every epoch, what "compute your own
  rows and merge" costs before the merge (a rename under the lock; its writes are the same write-through writes).

Teacher resnet18 (random weights saved once, ``--teacher-checkpoint``), students test_efficientnet and test_byobnet,
digits at 32 px (512 training rows), batch 32, 3 epochs, one torch thread per process. Each mode runs twice, in the
order own, wait, wait, own; a run's wall time is from the common start to its exit, its CPU time user + system
(``os.wait4``); medians over the two repeats. Teacher passes: epochs of teacher forwards over all rows, summed over
the runs (``wait``: each epoch once, as tests/test_cache.py asserts).

    python benchmarks/cache_concurrency.py     # prints a markdown table (~2 min on 2 cores)
"""
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import datasets
import safetensors.torch
import timm
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from timm_icd.data import digits_dataset  # noqa: E402

STUDENTS = ('test_efficientnet', 'test_byobnet')
EPOCHS = 3


def launch(folder: Path, mode: str, repeat: int) -> list:
    """Start both runs at once; (student, wall s, cpu s, epoch seconds as logged) per run."""
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1',
           'PYTHONPATH': str(REPO)}
    procs, started = [], time.perf_counter()
    for student in STUDENTS:
        cache = folder / f'{mode}{repeat}' / ('cache' if mode == 'wait' else f'cache-{student}')
        cmd = [sys.executable, str(REPO / 'train_icd.py'), '--dataset', str(folder / 'digits'), '--epochs',
               str(EPOCHS), '--teacher', 'resnet18', '--teacher-checkpoint', str(folder / 'teacher.safetensors'),
               '--student', student, '-b', '32', '--seed', '3', '--input-size', '3', '32', '32', '-j', '0',
               '--hflip', '0', '--color-jitter', '0', '--output', str(folder / f'{mode}{repeat}' / student),
               '--teacher-cache', str(cache)]
        log = open(folder / f'{mode}{repeat}-{student}.log', 'w')
        procs.append((student, subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    results = []
    for student, proc, log in procs:
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.close()
        text = Path(log.name).read_text()
        assert proc.returncode == 0, text[-2000:]
        epochs = [float(s) for s in re.findall(r'^Epoch \d+: .*\((\d+\.\d+)s\)$', text, flags=re.M)]
        results.append((student, time.perf_counter() - started, usage.ru_utime + usage.ru_stime, epochs))
    return results


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        dd = digits_dataset()
        datasets.DatasetDict(train=dd['train'].select(range(512)), test=dd['test'].select(range(128))).save_to_disk(
            folder / 'digits')
        torch.manual_seed(0)
        safetensors.torch.save_file(timm.create_model('resnet18', num_classes=10).state_dict(),
                                    folder / 'teacher.safetensors')
        runs = {'own': [], 'wait': []}
        for repeat, mode in enumerate(('own', 'wait', 'wait', 'own')):
            runs[mode].append(launch(folder, mode, repeat))
    print('| mode | run | wall (s) | CPU (s) | epochs as logged (s) | teacher passes |')
    print('|---|---|---|---|---|---|')
    for mode, repeats in runs.items():
        for i, student in enumerate(STUDENTS):
            wall = statistics.median(r[i][1] for r in repeats)
            cpu = statistics.median(r[i][2] for r in repeats)
            epochs = ', '.join(f'{statistics.median(r[i][3][e] for r in repeats):.2f}' for e in range(EPOCHS))
            print(f'| {mode} | {student} | {wall:.1f} | {cpu:.1f} | {epochs} | '
                  f'{EPOCHS * (len(STUDENTS) if mode == "own" else 1) if i == 0 else ""} |')
        total = statistics.median(max(r[1] for r in rep) for rep in repeats)
        cpu = statistics.median(sum(r[2] for r in rep) for rep in repeats)
        print(f'| {mode} | both | {total:.1f} (last to end) | {cpu:.1f} | | |')


if __name__ == '__main__':
    main()
