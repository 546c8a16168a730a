"""Several runs writing one teacher cache at once: a lock for the manifest and a claim per epoch.

* ``DIR/.lock``: every change of the manifest is a read-modify-write under ``fcntl.flock`` on this file (re-read
  the manifest, change this run's part, write it through a temporary name unique to the writer, rename), so one
  writer never drops another's completed epochs. The kernel releases a dead process's lock. flock works between
  processes of one machine and, on Linux, between machines over NFS (the client turns it into a POSIX lock).
* ``DIR/.claim-epoch-NNNN``: the run that computes epoch NNNN. Made under the lock when the epoch is neither complete
  nor claimed by a live run; removed when the epoch is marked complete. It names the writer (machine, pid, the
  process's start time, a random token); a thread refreshes its mtime every ``HEARTBEAT_S`` seconds while the claim
  is held. A claim is free again when its writer is gone: on this machine (same boot and pid namespace) when its pid
  is gone or is another process now; elsewhere when the heartbeat is older than ``STALE_S`` seconds.

Only a run's main process claims: the processes of one run share its claim (they write disjoint rows of one set of
memory maps, as they always have).
"""
import contextlib
import fcntl
import json
import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

from ..base import write_text_atomic

_logger = logging.getLogger(__name__)

LOCK = '.lock'
HEARTBEAT_S = 30.0
STALE_S = 300.0  # ten heartbeats: NFS attribute caches lag by up to a minute


def machine() -> str:
    """Where pids compare: this boot of this machine and this pid namespace (without /proc: the host name)."""
    try:
        with open('/proc/sys/kernel/random/boot_id') as f:
            return f'{f.read().strip()}:{os.stat("/proc/self/ns/pid").st_ino}'
    except OSError:
        return socket.gethostname()


def process_started(pid: int) -> str:
    """The start time of a live process (so that a reused pid is not taken for it); '' when gone or a zombie."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            fields = f.read().rsplit(')', 1)[1].split()
        return '' if fields[0] in 'ZXx' else fields[19]
    except OSError:
        try:  # no /proc: existence only
            os.kill(pid, 0)
            return '?'
        except ProcessLookupError:
            return ''
        except PermissionError:
            return '?'


@contextlib.contextmanager
def locked(root: Path) -> Iterator[None]:
    """Hold the cache folder's lock (``DIR/.lock``, exclusive) for the block."""
    fd = os.open(Path(root) / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def claim_path(root: Path, epoch: int) -> Path:
    return Path(root) / f'.claim-epoch-{epoch:04d}'


def read_claim(root: Path, epoch: int) -> Optional[dict]:
    """The claim on ``epoch`` with its heartbeat (``mtime``), or None when there is none."""
    path = claim_path(root, epoch)
    try:
        mtime, text = path.stat().st_mtime, path.read_text()
    except FileNotFoundError:
        return None
    try:
        claim = json.loads(text)
    except ValueError:
        claim = {}  # written atomically, so never half: judged by its heartbeat alone
    return {**(claim if isinstance(claim, dict) else {}), 'mtime': mtime}


def why_free(claim: dict, stale_after: float = STALE_S, now: Optional[float] = None) -> Optional[str]:
    """Why a claim no longer holds (its writer is gone), or None while it does."""
    if claim.get('machine') == machine() and isinstance(claim.get('pid'), int):
        started = process_started(claim['pid'])
        if not started or (started != '?' and started != claim.get('started')):
            return f'its process {claim["pid"]} on this machine is gone'
    age = (time.time() if now is None else now) - claim['mtime']
    if age > stale_after:
        return f'its heartbeat stopped {age:.0f} s ago'
    return None


def describe(claim: dict) -> str:
    return f'pid {claim.get("pid", "?")} on {claim.get("host", "an unknown machine")}'


class Claim:
    """This process's claim on one epoch of a cache, kept alive by a heartbeat thread until ``release``.

    Args:
        root: The cache folder.
        epoch: The epoch claimed.
    """

    def __init__(self, root: Path, epoch: int):
        self.root, self.epoch, self.token = Path(root), epoch, secrets.token_hex(8)
        self.path = claim_path(root, epoch)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def write(self) -> None:
        """Write the claim file (call under the lock) and start its heartbeat."""
        write_text_atomic(self.path, json.dumps({
            'host': socket.gethostname(), 'machine': machine(), 'pid': os.getpid(),
            'started': process_started(os.getpid()), 'token': self.token, 'since': time.time()}))
        self._thread = threading.Thread(target=self._beat, name=f'cache-claim-{self.epoch}', daemon=True)
        self._thread.start()

    def held(self) -> bool:
        """Whether the claim file is still this claim (not taken over after a stall)."""
        claim = read_claim(self.root, self.epoch)
        return claim is not None and claim.get('token') == self.token

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if not self.held():
                    return
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        """Stop the heartbeat and remove the claim file if it is still this claim (call under the lock)."""
        self._stop.set()
        if self.held():
            self.path.unlink(missing_ok=True)
