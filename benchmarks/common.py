"""Peak CPU memory of a piece of work, for the benchmarks (Linux: /proc; NaN elsewhere).

The process's RSS high-water mark (VmHWM) is reset to the current RSS through ``/proc/self/clear_refs`` just before
the work, after freed heap is handed back to the OS (``malloc_trim``), so the peak reflects this work rather than
model creation or earlier steps. The "above rest" figure is that peak minus the RSS just before the work: the
work's own activations, gradients and temporaries. Allocations smaller than a few pages, or served from heap the
allocator kept, are not visible to it, so values under ~1 MiB are noise.
"""
import ctypes
import ctypes.util
import gc
from typing import Callable, Tuple

__all__ = ['peak_rss_mib']


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
