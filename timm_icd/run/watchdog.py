"""Peer watchdog: when a process of a distributed run dies, or stops on a user error, the others stop at once with
one line that names it.

Each rank publishes its pid and a heartbeat counter in the c10d store; a daemon thread checks the peers every second.
A peer on this machine (same boot and pid namespace) is dead once its pid is gone, one elsewhere when its heartbeat
stalls for ``TIMM_ICD_PEER_TIMEOUT`` seconds (30). A process that ends normally (user errors included) says goodbye
at exit and is never reported; a traceback, a signal or an OOM kill is a death. Then the lowest surviving rank prints
the line and every survivor leaves with ``os._exit``: its main thread may be stuck in a collective for good. The
SIGTERM a one-machine torchrun agent sends the survivors within 0.1 s of a death first lets the thread name the dead.

A process that stops on a user error (``report_user_error``) publishes its line first; every other process prints
``error: rank N stopped: LINE`` and leaves with exit code 2 (a check that fails the same on every process is printed
by rank 0 alone). Under elastic restarts (``accelerate launch --max_restarts N``) the line says the launcher restarts.
"""
import atexit
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Set

import torch.distributed as dist

_logger = logging.getLogger(__name__)

INTERVAL = 1.0
EXIT_CODE = 3
USER_ERROR_CODE = 2
_stopping = threading.Lock()  # taken by whichever thread ends the process: one line per process at most
_watchdog: Optional['PeerWatchdog'] = None


def _machine() -> str:
    """Where pids compare: this boot of this machine and this pid namespace (without /proc: nowhere but here)."""
    try:
        with open('/proc/sys/kernel/random/boot_id') as f:
            return f'{f.read().strip()}:{os.stat("/proc/self/ns/pid").st_ino}'
    except OSError:
        return f'{socket.gethostname()}:{os.getpid()}'  # no /proc (macOS): every peer is judged by its heartbeat


def _started(pid: int) -> str:
    """The start time of a live process, so that a reused pid is not taken for it; '' when gone or a zombie."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            fields = f.read().rsplit(')', 1)[1].split()
        return '' if fields[0] in 'ZXx' else fields[19]
    except OSError:
        return ''


def resume_hint(argv: List[str]) -> str:
    """How to continue: the same command plus ``--resume auto``, unless it has it (argparse keeps the last value);
    under elastic restarts with some left, the launcher restarts the run by itself."""
    restart = int(os.environ.get('TORCHELASTIC_RESTART_COUNT', '0'))
    most = int(os.environ.get('TORCHELASTIC_MAX_RESTARTS', '0'))
    has_auto = '--resume auto' in ' '.join(argv) or '--resume=auto' in argv
    if restart < most and has_auto:
        return f'The launcher restarts the run from its newest checkpoint (restart {restart + 1} of {most}).'
    if has_auto:
        return 'Resume with the same command (it has --resume auto).'
    return 'Resume with the same command plus --resume auto.'


class PeerWatchdog:
    """Pid and heartbeat checks of every other rank through a c10d store; see the module docstring."""

    def __init__(self, store: Any, rank: int, world_size: int, hint: str, timeout: float) -> None:
        self.store, self.rank, self.world_size, self.hint, self.timeout = store, rank, world_size, hint, timeout
        self.machine, self.pid, self.closed, self.wake = _machine(), os.getpid(), False, threading.Event()
        self.peers: Dict[int, List[str]] = {}  # rank -> [host, machine, pid, start time]
        self.beats = {r: (-1, time.monotonic()) for r in range(world_size) if r != rank}  # last count, when seen
        self.left: Set[int] = set()  # peers that ended normally (a user error): they explain a broken collective
        store.set(f'info/{rank}', '\t'.join([socket.gethostname(), self.machine, str(self.pid), _started(self.pid)]))
        self.thread = threading.Thread(target=self._run, name='timm_icd-peer-watchdog', daemon=True)

    def dead_peers(self) -> Dict[int, str]:
        """The peers that ended without saying goodbye: rank -> what happened, as the line says it."""
        now, dead = time.monotonic(), {}
        for r in self.beats:
            if r not in self.peers and self.store.check([f'info/{r}']):
                self.peers[r] = self.store.get(f'info/{r}').decode().split('\t')
            host, machine, pid, started = self.peers.get(r, ['?', '', '?', ''])
            if machine == self.machine:
                what = 'died' if _started(int(pid)) != started else ''
            else:
                beat = self.store.add(f'beat/{r}', 0)
                if beat != self.beats[r][0]:
                    self.beats[r] = (beat, now)
                what = f'sent no heartbeat for {self.timeout:g}s' if now - self.beats[r][1] > self.timeout else ''
            if what and self.store.check([f'bye/{r}']):
                self.left.add(r)
            elif what:
                dead[r] = f'rank {r} (pid {pid} on host {host}) {what}'
        return dead

    def peer_error(self) -> Optional[str]:
        """The line of the lowest-ranked peer that stopped on a user error, as this process prints it, or None."""
        for r in sorted(self.beats):
            if self.store.check([f'error/{r}']):
                return f'rank {r} stopped: {self.store.get(f"error/{r}").decode()}'
        return None

    def _run(self) -> None:
        reached = time.monotonic()
        while not self.closed:
            try:
                self.store.add(f'beat/{self.rank}', 1)
                failed = self.peer_error()
                if failed:
                    self.stop(failed, code=USER_ERROR_CODE, hint='')
                dead = self.dead_peers()
                reached = time.monotonic()
            except Exception as e:  # the store lives in node 0's launcher (or rank 0): gone or unreachable
                dead = {}
                if time.monotonic() - reached > self.timeout:
                    self.stop(f'lost the other processes (their c10d store: {" ".join(str(e).split())[:200]})')
            if dead and not self.closed:
                self.stop('; '.join(dead[r] for r in sorted(dead)),
                          quiet=self.rank != min(set(range(self.world_size)) - set(dead)))
            self.wake.wait(INTERVAL)

    def stop(self, reason: str, quiet: bool = False, code: int = EXIT_CODE, hint: Optional[str] = None) -> None:
        """Print the line (unless ``quiet``) and end this process now; returns if another thread is already on it."""
        if _stopping.acquire(blocking=False):
            if not quiet:
                hint = self.hint if hint is None else hint
                sys.stderr.write(f'error: {reason}; stopping this process (rank {self.rank}).'
                                 f'{" " + hint if hint else ""}\n')
            sys.stderr.flush()
            os._exit(code)

    def close(self, goodbye: bool = True) -> None:
        """Stop checking and, with ``goodbye``, tell the peers not to report this process when it ends."""
        self.closed = True
        self.wake.set()
        try:
            if goodbye:
                self.store.set(f'bye/{self.rank}', '1')
        except Exception:  # the store is gone: nobody is left to report this process
            pass

    def _at_exit(self) -> None:
        if os.getpid() == self.pid:  # sys.last_value: the interpreter printed an uncaught exception, a death
            self.close(goodbye=not hasattr(sys, 'last_value'))
            self.thread.join(5)  # out of any store call: a thread still in C++ code aborts the finalizing interpreter

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if os.getpid() == self.pid:  # not a forked DataLoader worker (the launcher's killpg reaches them too)
            _wait(2.5 * INTERVAL)  # a launcher stops the others when one dies: let the thread name it first
            self.close()  # no dead peer: a plain SIGTERM (scheduler, user), so end as it would have
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def start_watchdog(accelerator: Any = None, hint: Optional[str] = None) -> Optional[PeerWatchdog]:
    """Start the watchdog once the process group exists, from the main thread; a no-op with one process.

    Args:
        accelerator: unused; it documents the place: right after ``Accelerator(...)`` created the process group.
        hint: the resume advice that ends the line; by default ``resume_hint(sys.argv)``.
    """
    global _watchdog
    if _watchdog is not None or not dist.is_initialized() or dist.get_world_size() < 2:
        return _watchdog
    try:  # a connection of its own: the process group's may be held by a blocking call of the main thread
        store = dist.PrefixStore(f'timm_icd_watchdog/{os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")}/',
                                 dist.distributed_c10d._get_default_store().clone())
    except Exception as e:  # a store that cannot be cloned (file, hash): no watchdog
        _logger.debug(f'No peer watchdog: {e}')
        return None
    _watchdog = PeerWatchdog(store, dist.get_rank(), dist.get_world_size(), hint or resume_hint(sys.argv),
                             float(os.environ.get('TIMM_ICD_PEER_TIMEOUT', '30')))
    atexit.register(_watchdog._at_exit)
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _watchdog._on_sigterm)
    _watchdog.thread.start()
    return _watchdog


def wait_for_dead_peer() -> None:
    """In a SIGTERM handler: give the watchdog's thread the time to name a peer that just died (a one-machine launcher
    sends the survivors SIGTERM within 0.1 s of a death); it then ends this process with its line. Returns at once
    without a watchdog, and when no peer died."""
    _wait(2.5 * INTERVAL)


def install_sigterm_handler() -> None:
    """Give SIGTERM to the watchdog where it has no handler: a run's pre-emption handler, which held it while the run
    trained, hands it back here, so a launcher's SIGTERM after a peer's death still ends with the dead peer named."""
    if _watchdog is not None and threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _watchdog._on_sigterm)


def explain_failure(error: BaseException) -> None:
    """Let the watchdog replace an exception that ends a run by its line, if a dead or failed peer caused it.

    Waits up to the peer timeout after a distributed error (gloo: a reset connection), briefly after any other;
    returns when no peer died or failed, or at once without a watchdog.
    """
    if _watchdog is not None:
        distributed = isinstance(error, dist.DistError) or any(w in str(error) for w in ('gloo', 'NCCL', 'onnection'))
        _wait(_watchdog.timeout + 2 * INTERVAL if distributed else 2 * INTERVAL)
        failed = _watchdog.peer_error() if _watchdog.left else None
        if failed:  # a peer stopped on a user error, which broke the collective this process was in
            _watchdog.stop(failed, code=USER_ERROR_CODE, hint='')


def report_user_error(line: str, own: bool = False) -> bool:
    """Publish this process's user error for its peers (which then stop with one line naming it), and say whether
    this process prints it: rank 0 does; another rank does unless rank 0 reports the very same line within a few
    seconds (a check that fails alike everywhere is printed once). Without a watchdog (one process, or no c10d
    store): rank 0, or another rank when ``own`` says the error may be its alone (raised once training started)."""
    rank = int(os.environ.get('RANK', '0'))
    if _watchdog is None:
        return rank == 0 or own
    if not _stopping.acquire(blocking=False):  # the watchdog thread is ending this process with a peer's line
        threading.Event().wait()
    _watchdog.closed = True  # this process reports its own error: no peer's line on top of it
    try:
        _watchdog.store.set(f'error/{_watchdog.rank}', line)
        if _watchdog.rank == 0:
            return True
        deadline = time.monotonic() + 3 * INTERVAL
        while time.monotonic() < deadline:
            if _watchdog.store.check(['error/0']):
                return _watchdog.store.get('error/0').decode() != line
            time.sleep(0.1)
    except Exception:  # the store is gone with rank 0's launcher: say it here
        pass
    return True


def _wait(seconds: float) -> None:
    """Give the watchdog ``seconds`` to find a dead peer (it ends the process); stop when a peer ended normally."""
    deadline = time.monotonic() + seconds
    while _watchdog is not None and not _watchdog.closed and not _watchdog.left and time.monotonic() < deadline:
        time.sleep(0.1)
