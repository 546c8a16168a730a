"""Crash injection for the kill-and-resume tests: a real SIGKILL at a named point of a run.

``TIMM_ICD_CRASH_AT=POINT:N`` kills the process the N-th time it reaches POINT: ``step`` (after backward, before the
optimizer step), ``checkpoint`` (checkpoint files written, not yet renamed into place) or ``eval`` (after the first
eval batch). ``POINT:N@R`` (e.g. ``step:5@1``) kills only the process whose ``RANK`` (set by torchrun / accelerate
launch; 0 without it) is R, so the other processes of a distributed run see a peer die; without ``@R`` every
process dies there. Nothing is cleaned up, exactly as when a scheduler pre-empts the job. Unset, a check costs one
comparison.
"""
import os
import signal

_spec, _, _rank = os.environ.get('TIMM_ICD_CRASH_AT', '').partition('@')
_POINT, _, _COUNT = _spec.partition(':')
_COUNT = int(_COUNT or 1)
if _rank and int(_rank) != int(os.environ.get('RANK', '0')):
    _POINT = ''  # another process's crash: never matches a point name
_seen = 0


def crash_point(name: str) -> None:
    """SIGKILL this process if ``TIMM_ICD_CRASH_AT`` names this point (and rank) and this is its N-th visit."""
    global _seen
    if name != _POINT:
        return
    _seen += 1
    if _seen == _COUNT:
        os.kill(os.getpid(), signal.SIGKILL)
