"""Crash injection for the kill-and-resume tests: a real SIGKILL at a named point of a run (``timm_icd.run.events``).

Importing this module reads ``TIMM_ICD_CRASH_AT=POINT:N`` and kills the process the N-th time the run reaches POINT:
``step`` (after backward, before the optimizer step), ``checkpoint`` (checkpoint files written, not yet renamed into
place) or ``eval`` (after the first eval batch). ``POINT:N@R`` (e.g. ``step:5@1``) kills only the process whose
``RANK`` is R, so the other processes of a distributed run see a peer die. Nothing is cleaned up, exactly as when a
scheduler pre-empts the job. The test runners (``train_crash.py``, ``dist_worker.py``) import it.
"""
import os
import signal

from timm_icd.run import add_listener

_spec, _, _rank = os.environ.get('TIMM_ICD_CRASH_AT', '').partition('@')
_POINT, _, _COUNT = _spec.partition(':')
_seen = [0]


def _crash(point: str) -> None:
    if point != _POINT:
        return
    _seen[0] += 1
    if _seen[0] == int(_COUNT or 1):
        os.kill(os.getpid(), signal.SIGKILL)


_first_attempt = os.environ.get('TORCHELASTIC_RESTART_COUNT', '0') == '0'  # a restarted worker is not killed again
if _POINT and _first_attempt and (not _rank or int(_rank) == int(os.environ.get('RANK', '0'))):
    add_listener(_crash)
