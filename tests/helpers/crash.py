"""Crash and signal injection for the kill-and-resume and pre-emption tests, at named points of a run
(``timm_icd.run.events``).

Importing this module reads:

* ``TIMM_ICD_CRASH_AT=POINT:N`` and kills the process (a real SIGKILL) the N-th time the run reaches POINT: ``step``
  (after backward, before the optimizer step), ``checkpoint`` (checkpoint files written, not yet renamed into
  place) or ``eval`` (after the first eval batch). ``POINT:N@R`` (e.g. ``step:5@1``) kills only the process whose
  ``RANK`` is R, so the other processes of a distributed run see a peer die. Nothing is cleaned up, exactly as when
  a scheduler kills the job.
* ``TIMM_ICD_SIGNAL_AT=POINT:N[@R]:SIGNAL[,...]`` sends the process SIGNAL (``TERM``, ``USR1``, ``INT``) the N-th time
  it reaches POINT, as a scheduler's warning would arrive then (several, comma-separated: e.g. one during a step
  and one during the checkpoint that follows). ``^SIGNAL`` sends it to the parent process instead: the launcher,
  as a batch script's ``kill`` would.
* ``TIMM_ICD_STEP_LOG=FILE``: every ``step`` point appends one line to FILE (``RANK``), so a test counts the steps a
  run computed.

The test runners (``train_crash.py``, ``dist_worker.py``) import it.
"""
import os
import signal

from timm_icd.run import add_listener

_RANK = int(os.environ.get('RANK', '0'))
_first_attempt = os.environ.get('TORCHELASTIC_RESTART_COUNT', '0') == '0'  # a restarted worker is not hit again


def _parse(spec: str):
    """(point, count, rank or None) of ``POINT:N[@R]``."""
    where, _, rank = spec.partition('@')
    point, _, count = where.partition(':')
    return point, int(count or 1), int(rank) if rank else None


def _at(point: str, count: int, rank, action) -> None:
    if not _first_attempt or (rank is not None and rank != _RANK):
        return
    seen = [0]

    def listener(reached: str) -> None:
        if reached == point:
            seen[0] += 1
            if seen[0] == count:
                action()
    add_listener(listener)


_crash = os.environ.get('TIMM_ICD_CRASH_AT', '')
if _crash:
    _at(*_parse(_crash), lambda: os.kill(os.getpid(), signal.SIGKILL))

for _spec in filter(None, os.environ.get('TIMM_ICD_SIGNAL_AT', '').split(',')):
    _where, _, _name = _spec.rpartition(':')
    _sig = getattr(signal, f'SIG{_name.lstrip("^").upper()}')
    _at(*_parse(_where), lambda sig=_sig, parent=_name.startswith('^'): os.kill(
        os.getppid() if parent else os.getpid(), sig))

_log = os.environ.get('TIMM_ICD_STEP_LOG', '')
if _log:
    def _count(point: str) -> None:
        if point == 'step':
            with open(_log, 'a') as f:
                f.write(f'{_RANK}\n')
    add_listener(_count)
