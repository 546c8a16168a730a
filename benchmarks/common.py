"""What the benchmark scripts share: the machine's description, and peak CPU memory of a piece of work.

Peak memory uses Linux's /proc (NaN elsewhere).

The process's RSS high-water mark (VmHWM) is reset to the current RSS through ``/proc/self/clear_refs`` just before
the work, after freed heap is handed back to the OS (``malloc_trim``), so the peak reflects this work rather than
model creation or earlier steps. The "above rest" figure is that peak minus the RSS just before the work: the
work's own activations, gradients and temporaries. Allocations smaller than a few pages, or served from heap the
allocator kept, are not visible to it, so values under ~1 MiB are noise.
"""
import ctypes
import ctypes.util
import gc
import os
from typing import Callable, Optional, Tuple

import torch

__all__ = ['machine', 'peak_rss_mib']


def _status_mib(key: str) -> float:
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(key + ':'))


def peak_rss_mib(work: Callable[[], object], repeats: int = 3) -> Tuple[float, float]:
    """(peak RSS, peak above the resting RSS) in MiB while calling ``work`` ``repeats`` times."""
    try:
        gc.collect()
        libc = ctypes.util.find_library('c')
        if libc:
            ctypes.CDLL(libc).malloc_trim(0)
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')  # resets VmHWM to the current RSS (Linux >= 4.0)
        rest = _status_mib('VmRSS')
    except (OSError, StopIteration, AttributeError):
        for _ in range(repeats):
            work()
        return float('nan'), float('nan')
    for _ in range(repeats):
        work()
    peak = _status_mib('VmHWM')
    return peak, peak - rest


def machine(device: Optional[torch.device] = None) -> str:
    """The GPU, or the CPU model, cores and threads, with the torch version: for a results file's header."""
    if device is not None and device.type == 'cuda':
        return f'{torch.cuda.get_device_name(device)}, torch {torch.__version__}'
    cpu = 'unknown CPU'
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    return f'{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}'
