"""``run_cli``: the commands as a user runs them, in processes forked from ``tests/helpers/zygote.py`` (a Python
that has imported their libraries once), or in fresh interpreters where the environment differs."""
import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional

from helpers.env import HELPERS, REPO, offline_env

ZYGOTE = HELPERS / 'zygote.py'


def _settled(env: dict) -> dict:
    """An environment without what pytest changes as it goes from test to test."""
    return {k: v for k, v in env.items() if k != 'PYTEST_CURRENT_TEST'}


class Zygote:
    """This test process's client of ``tests/helpers/zygote.py``: commands run in processes forked from one that has
    imported their libraries already, instead of fresh interpreters that import them again (about 5 CPU-seconds
    each)."""

    def __init__(self):
        self.env, self.proc, self.lock = offline_env(), None, threading.Lock()

    def _line(self, timeout: Optional[float] = None) -> Optional[dict]:
        """The zygote's next reply, read from the pipe unbuffered (so select sees what is not read yet); None when
        ``timeout`` seconds pass first."""
        fd, data = self.proc.stdout.fileno(), b''
        if timeout is not None and not select.select([fd], [], [], timeout)[0]:
            return None
        while not data.endswith(b'\n'):
            chunk = os.read(fd, 1)
            if not chunk:
                raise RuntimeError(f'tests/helpers/zygote.py ended (status {self.proc.wait()}); its stderr ends: '
                                   f'{Path(self.log).read_text()[-2000:]}')
            data += chunk
        return json.loads(data)

    def _start(self) -> None:
        if self.proc is None:
            fd, self.log = tempfile.mkstemp(prefix='zygote-', suffix='.log')
            self.proc = subprocess.Popen([sys.executable, str(ZYGOTE)], cwd=REPO, env=self.env,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=fd)
            os.close(fd)
            atexit.register(os.unlink, self.log)
            atexit.register(self.proc.kill)
            self._line()  # {"ready": true} once the libraries are imported

    def run(self, cmd: list, script: Optional[str], module: Optional[str], args: list,
            timeout: float) -> subprocess.CompletedProcess:
        self._start()
        with tempfile.TemporaryDirectory(prefix='zygote-') as tmp:
            out, err = Path(tmp) / 'stdout', Path(tmp) / 'stderr'
            request = dict(argv=args, script=script, module=module, cwd=str(REPO), stdout=str(out), stderr=str(err))
            self.proc.stdin.write(json.dumps(request).encode() + b'\n')
            self.proc.stdin.flush()
            pid = self._line()['pid']
            ended = self._line(timeout)
            if ended is None:  # as subprocess.run(timeout=...): the command is killed, its output so far kept
                os.kill(pid, signal.SIGKILL)
                self._line()
            stdout, stderr = out.read_text(), err.read_text()
        if ended is None:
            raise subprocess.TimeoutExpired(cmd, timeout, output=stdout, stderr=stderr)
        return subprocess.CompletedProcess(cmd, ended['returncode'], stdout, stderr)

    def try_run(self, env: dict, *call) -> Optional[subprocess.CompletedProcess]:
        """The command's result from a forked child, or None where only a fresh interpreter will do: another
        environment than the zygote's, a command already running from another thread, or TIMM_ICD_TEST_FORK=0."""
        if _settled(env) != _settled(self.env) or os.environ.get('TIMM_ICD_TEST_FORK') == '0' or \
                not self.lock.acquire(blocking=False):
            return None
        try:
            return self.run(*call)
        finally:
            self.lock.release()


_zygote = None


def run_cli(*args, env=None, timeout=600, script='train_icd.py', module=None,
            command=None) -> subprocess.CompletedProcess:
    """Run train_icd.py, another repo script, ``python -m module``, or ``python -m timm_icd COMMAND`` (``command``), as
    a user would (offline by default): in a process forked from ``tests/helpers/zygote.py`` when the environment is the
    default one, else in a fresh interpreter."""
    global _zygote
    if command:
        module, args = 'timm_icd', (command, *args)
    target = ['-m', module] if module else [str(REPO / script)]
    argv, env = [str(a) for a in args], env or offline_env()
    cmd = [sys.executable, *target, *argv]
    _zygote = _zygote or Zygote()
    forked = _zygote.try_run(env, cmd, None if module else str(REPO / script), module, argv, timeout)
    if forked is not None:
        return forked
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=timeout)
