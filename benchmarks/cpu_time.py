"""CPU time of this process and its child processes (loader workers) over a timed window, for the data loading
benchmarks (``data_throughput.py``, ``loader_profile.py``).

``cpu_seconds(start, end)`` between two ``cpu_reading``s is the getrusage RUSAGE_SELF + RUSAGE_CHILDREN delta (this
process's threads; children reaped in the window) plus, per child process alive at either end, utime + stime from
``/proc/<pid>/stat``: end - start if alive at both ends, end if started in the window, minus the start reading if
reaped in it (its whole life landed in RUSAGE_CHILDREN). NaN without /proc.
"""
import os
import resource
from typing import Dict, List, Optional, Tuple

CLOCK_TICKS = os.sysconf('SC_CLK_TCK') if hasattr(os, 'sysconf') else 100


def _children() -> Dict[int, float]:
    """CPU seconds (utime + stime) of each child process of this one, from /proc/<pid>/stat."""
    me, out = str(os.getpid()), {}
    for entry in os.scandir('/proc'):
        if entry.name.isdigit():
            try:
                with open(f'/proc/{entry.name}/stat') as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rfind(')') + 2:].split()  # after "pid (comm) ": state, ppid, ... utime, stime
            if fields[1] == me:
                out[int(entry.name)] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return out


def forked_children() -> List[int]:
    """Child processes that are forks of this one (DataLoader workers), not the spawned ones that live as long as
    their owner (the multiprocessing resource tracker, a stream's shard-reading pool)."""
    with open('/proc/self/cmdline', 'rb') as f:
        mine = f.read()
    forks = []
    for pid in _children():
        try:
            with open(f'/proc/{pid}/cmdline', 'rb') as f:
                if f.read() == mine:
                    forks.append(pid)
        except OSError:  # exited meanwhile
            continue
    return forks


def cpu_reading() -> Tuple[float, Optional[Dict[int, float]]]:
    """(RUSAGE_SELF + RUSAGE_CHILDREN CPU seconds, {child pid: CPU seconds} or None without /proc)."""
    own = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ('ru_utime', 'ru_stime'))
    return own, (_children() if os.path.isdir('/proc') else None)


def cpu_seconds(start: tuple, end: tuple) -> float:
    """CPU seconds of this process and its children between two ``cpu_reading``s (see the module docstring)."""
    (own0, kids0), (own1, kids1) = start, end
    if kids0 is None:
        return float('nan')
    live = sum(t - kids0.get(pid, 0.0) for pid, t in kids1.items())
    reaped = sum(t for pid, t in kids0.items() if pid not in kids1)  # already counted whole in RUSAGE_CHILDREN
    return own1 - own0 + live - reaped
