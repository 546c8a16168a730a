"""How ``cache_speed.py`` measures a run: real ``train_icd.py`` runs and ahead writers in this process, with a probe
that times evaluation, cache reads and cache filling and counts live teacher writes (timm_icd itself is unchanged).

Shared by the timing part (``cache_speed.py``) and the quality part (``cache_quality.py``) of the teacher cache
benchmark.
"""
import contextlib
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timm_icd.distill import create_teacher  # noqa: E402
from timm_icd.run import cache_writer as cache_module  # noqa: E402
from timm_icd.run import parse_and_validate  # noqa: E402
from timm_icd.run import train as icd_train  # noqa: E402
from timm_icd.teacher_cache import TeacherCache  # noqa: E402

DATA_SEED = 0  # every run of the benchmark: one --data-seed, so runs of any --seed see the same batches


def after_first(times: List[float]) -> float:
    """Median of the epoch times after the first (the only one if there is one)."""
    return statistics.median(times[1:] if len(times) > 1 else times)


def random_teacher(name: str, num_classes: int, path: Path) -> str:
    """Save a randomly initialised teacher once (seed 0), so that runs with any ``--seed`` share its weights."""
    if not path.exists():
        import safetensors.torch
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = create_teacher(name, num_classes, pretrained=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


class Probe:
    """Times what a run spends in evaluation, cache reads and cache filling, and counts live teacher writes, by
    wrapping those functions for the duration of one run (timm_icd itself is unchanged)."""

    def __init__(self):
        self.evals: List[float] = []
        self.reads: Dict[int, float] = defaultdict(float)
        self.fills: List[float] = []  # train.py's finish_epoch of a writing run, one per epoch
        self.ahead: List[float] = []  # cache.finish_epoch in write_ahead, one per epoch
        self.writes = 0

    @contextlib.contextmanager
    def active(self) -> Iterator['Probe']:
        def timed(original: Callable, record: Callable) -> Callable:
            def wrapper(*args, **kwargs):
                started = time.perf_counter()
                try:
                    return original(*args, **kwargs)
                finally:
                    record(args, time.perf_counter() - started)
            return wrapper

        def count_write(original: Callable) -> Callable:
            def wrapper(*args, **kwargs):
                self.writes += 1
                return original(*args, **kwargs)
            return wrapper

        patches = [
            (icd_train, 'evaluate', lambda o: timed(o, lambda a, s: self.evals.append(s))),
            (icd_train, 'finish_cache_epoch', lambda o: timed(o, lambda a, s: self.fills.append(s))),
            (cache_module, 'finish_epoch', lambda o: timed(o, lambda a, s: self.ahead.append(s))),
            (TeacherCache, 'read', lambda o: timed(o, lambda a, s: self.reads.__setitem__(a[1], self.reads[a[1]] + s))),
            (TeacherCache, 'write', count_write),
        ]
        originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
        for (owner, name, wrap), (_, _, original) in zip(patches, originals):
            setattr(owner, name, wrap(original))
        try:
            yield self
        finally:
            for owner, name, original in originals:
                setattr(owner, name, original)


def train_run(argv: List[str]) -> Tuple[dict, Probe]:
    """A real train_icd.py run: its result (``epoch_seconds``, ``top1``, ...) and what the probe saw."""
    probe = Probe()
    with probe.active():
        result = icd_train.run(parse_and_validate(argv), argv)
    result.pop('model', None)
    return result, probe


def ahead_run(argv: List[str]) -> Tuple[dict, Probe, float]:
    """``python -m timm_icd cache`` in this process: its result, probe (``ahead``: per-epoch times) and wall time."""
    probe = Probe()
    started = time.perf_counter()
    with probe.active():
        result = cache_module.write_ahead(parse_and_validate(argv))
    return result, probe, time.perf_counter() - started
