"""Pre-emption: a scheduler's signal, or a time limit, ends a run at a step boundary with a checkpoint.

A signal of ``--preempt-signal`` (SIGTERM, SIGINT and SIGUSR1 by default) only sets a flag: the step in flight
finishes, every process agrees to stop through the step's one host sync (``loop._agree``: the flag rides on the
finite-loss reduce, so it costs no extra collective), the run saves a checkpoint at that step boundary with the
usual atomic save and exits with ``EXIT_CODE``. A stop is only taken where the optimizer just updated (never
inside a gradient accumulation cycle, whose gradients a checkpoint does not hold), so ``--resume auto`` continues
exactly. A second SIGINT outside a save still ends the process at once (KeyboardInterrupt, exit 130); any signal
that arrives while a checkpoint is being written is only noted, so the save completes.

``--time-limit`` (or SLURM's ``SLURM_JOB_END_TIME``) stops the same way when the time left is shorter than what the
next stop would cost: ``SAFETY`` times (the next step, or the epoch's evaluation, plus the last checkpoint save),
plus ``EXIT_SECONDS`` for the process to end.

``EXIT_CODE`` is 75, ``EX_TEMPFAIL`` of sysexits.h ("a temporary failure; the user is invited to retry"): distinct
from 0 (done), 1 (a crash), 2 (a user error), 3 (a dead peer), 130 (Ctrl-C) and from 128+N (killed by signal N
before any checkpoint), so a batch script, or slurm.conf's ``RequeueExit=75``, requeues exactly the runs that can
continue.

Python's ``signal`` module is all this needs; Accelerate and torch offer no step-boundary pre-emption.
"""
import logging
import os
import signal
import time
from collections import deque
from typing import Any, Optional, Sequence, Tuple

import psutil

from ..base import UserError
from .watchdog import install_sigterm_handler, wait_for_dead_peer

_logger = logging.getLogger(__name__)

EXIT_CODE = 75
DEFAULT_SIGNALS = 'TERM,INT,USR1'
SAFETY = 2.0  # the margin is this many times the measured cost of the next stop
EXIT_SECONDS = 10.0  # and this much more: the process's own end (interpreter, process group, launcher) and hiccups
UNMEASURED_SAVE_SECONDS = 5.0  # plus the checkpoint's bytes at 50 MB/s, until a save has been timed
ASSUMED_WRITE_BYTES_PER_SECOND = 50e6


class Preempted(Exception):
    """The run stopped at a step boundary and saved a checkpoint there (raised after the save)."""

    def __init__(self, epoch: int, step: int, reason: str) -> None:
        super().__init__(f'preempted at epoch {epoch} step {step}; checkpoint saved: resume with --resume auto')
        self.epoch, self.step, self.reason = epoch, step, reason


def parse_signals(text: str) -> Tuple[signal.Signals, ...]:
    """``--preempt-signal``: comma-separated names (``TERM``, ``SIGUSR1``, ``usr2`` ...) or ``none``."""
    if text.strip().lower() in ('none', ''):
        return ()
    found = []
    for name in text.split(','):
        name = name.strip().upper()
        sig = getattr(signal, name if name.startswith('SIG') else f'SIG{name}', None)
        if not isinstance(sig, signal.Signals) or sig in (signal.SIGKILL, signal.SIGSTOP) or name.startswith('SIG_'):
            raise UserError(f"--preempt-signal {text}: '{name}' is not a signal that can be caught; use names such "
                            f"as TERM,INT,USR1, or none.")
        found.append(sig)
    return tuple(dict.fromkeys(found))


def parse_time_limit(text: str) -> Optional[float]:
    """``--time-limit``: ``[D-]HH:MM:SS`` (SLURM's form; also ``MM:SS`` or seconds) in seconds, or None for ``none``."""
    if text.strip().lower() == 'none':
        return None
    days, _, clock = text.strip().rpartition('-')
    parts = clock.split(':')
    try:
        seconds = sum(float(p) * 60 ** i for i, p in enumerate(reversed(parts))) + 86400 * int(days or 0)
    except ValueError:
        seconds = -1.0
    if len(parts) > 3 or not seconds > 0:
        raise UserError(f'--time-limit {text}: use HH:MM:SS (or D-HH:MM:SS), above 0, or none.')
    return seconds


def job_deadline(time_limit: Optional[float], use_slurm: bool = True) -> Optional[float]:
    """The wall-clock time (``time.time()``) to be done by: this process's start plus ``time_limit``, or SLURM's
    job end (``SLURM_JOB_END_TIME``) when that is earlier or no limit is given; None without either."""
    deadlines = []
    if time_limit is not None:
        deadlines.append(psutil.Process().create_time() + time_limit)
    end = os.environ.get('SLURM_JOB_END_TIME', '') if use_slurm else ''
    if end.isdigit() and int(end) > 0:
        deadlines.append(float(end))
    return min(deadlines) if deadlines else None


class Preemption:
    """The signal flag and the time limit of one run; see the module docstring.

    Args:
        signals: The signals that ask for a stop (their handlers are installed by ``install``).
        deadline: ``time.time()`` to be done by, or None.
    """

    def __init__(self, signals: Sequence[signal.Signals] = (), deadline: Optional[float] = None) -> None:
        self.signals, self.deadline = tuple(signals), deadline
        self.requested: Optional[str] = None  # what asked for the stop: a signal's name or 'time limit'
        self.saving = False
        self.stopped = False  # the stop's checkpoint is saved: the process is on its way out with EXIT_CODE
        self.saved_step: Optional[int] = None  # the global step of the last checkpoint saved
        self.pid = os.getpid()
        self.save_seconds: Optional[float] = None  # the last checkpoint save, timed
        self.eval_seconds = 0.0  # the last evaluation(s) of an epoch, timed
        self.steps: deque = deque(maxlen=20)  # the last steps' seconds
        self._mark: Optional[float] = None
        self._previous: dict = {}

    def install(self) -> 'Preemption':
        """Install the handlers (main thread only: elsewhere Python cannot, and signals stay as they are)."""
        for sig in self.signals:
            try:
                self._previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread (a Python API caller's worker thread)
                _logger.warning(f'No pre-emption handler for {sig.name}: not on the main thread.')
        return self

    def uninstall(self) -> None:
        """Put back the handlers that were there before ``install``; SIGTERM then goes to the peer watchdog, where
        there is one (it names a peer whose death made the launcher send it).

        After a stop (``stopped``: its checkpoint saved) the pre-emption signals but SIGINT are ignored instead: the
        process is ending with ``EXIT_CODE``, and a launcher that sees a peer end first sends the others SIGTERM,
        which must not turn their exit 75 into death by a signal."""
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if self.stopped and sig != signal.SIGINT else previous)
        self._previous = {}
        if self.stopped:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        else:
            install_sigterm_handler()

    def _on_signal(self, signum: int, frame: Any) -> None:
        if os.getpid() != self.pid:  # a forked DataLoader worker: its main process stops it in order
            return
        if signum == signal.SIGTERM:  # a launcher's, after a peer died? the watchdog then ends this process
            wait_for_dead_peer()
        if signum == signal.SIGINT and self.requested and not self.saving:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt  # a second Ctrl-C: stop now (no checkpoint is being written)
        if self.requested is None:
            self.requested = signal.Signals(signum).name

    def _save_estimate(self, state_bytes: int) -> float:
        if self.save_seconds is not None:
            return self.save_seconds
        return UNMEASURED_SAVE_SECONDS + state_bytes / ASSUMED_WRITE_BYTES_PER_SECOND

    def wants_stop(self, last: bool, state_bytes: int = 0) -> bool:
        """This process's view, once per step: a signal came, or the time left is short of the next stop's cost.

        Args:
            last: The step is the epoch's last (what follows is the evaluation, then the epoch's checkpoint).
            state_bytes: The checkpoint's size, for the save estimate before any save was timed.
        """
        now = time.monotonic()
        if self._mark is not None:
            self.steps.append(now - self._mark)
        self._mark = now
        if self.requested is None and self.deadline is not None:
            step = max(self.steps, default=0.0)
            upcoming = (self.eval_seconds + step) if last else step
            left = self.deadline - time.time()
            if left < SAFETY * (upcoming + self._save_estimate(state_bytes)) + EXIT_SECONDS:
                self.requested = 'time limit'
                _logger.info(f'Time limit: {left:.0f}s left, stopping at this step (a step takes {step:.2f}s, '
                             f'a checkpoint {self._save_estimate(state_bytes):.2f}s).')
        return self.requested is not None

    def restart_clock(self) -> None:
        """Forget the step mark (between epochs: the evaluation is not a step)."""
        self._mark = None
