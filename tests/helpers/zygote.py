"""A Python that has imported the commands' libraries once and forks a process per command the tests run.

A fresh ``python train_icd.py`` spends about 5 CPU-seconds importing torch, torchvision (and through it
torch._dynamo), timm, accelerate and datasets before it reads its first flag, and the suite starts over a hundred
commands. This process imports them once, in the one environment the tests give every command
(``helpers.offline_env()``, which it is started with), then forks a child per request. The child is a process of its
own: its own pid, exit status, standard streams, working directory and ``sys.argv``, run as ``python SCRIPT ARGS`` or
``python -m MODULE ARGS`` would (``runpy``), with the random modules reseeded as a fresh process's are. It exits as
the interpreter does (SystemExit's code; a traceback and status 1 for an uncaught exception; non-daemon threads
joined, atexit handlers run, streams flushed) but for the module teardown at the very end, which only frees memory
and, in a fork, would write to every page the child shares with the zygote (3 to 4 s here).

multiprocessing's forkserver is the standard library's version of this, and is not used because its children leave
through multiprocessing's bootstrap (no atexit handlers, no interpreter-style exit status or traceback), and its
server takes whatever environment the test process has when the first child starts.

What a fork cannot give: output a fresh interpreter prints while importing (a warning at import) is not in the child's
stderr, and settings read at import from the environment are the zygote's, so ``helpers.run_cli`` forks only for
commands that get exactly the zygote's environment (any other environment, or ``TIMM_ICD_TEST_FORK=0``, starts a real
interpreter).

Protocol, one JSON object per line: the request on stdin ``{"argv": [...], "script": path or null, "module": name or
null, "cwd": path, "stdout": path, "stderr": path}``; on stdout ``{"pid": N}`` once the child exists, then
``{"returncode": N}`` (negative: killed by that signal) when it has ended. End of stdin ends the zygote.
"""
import atexit
import gc
import importlib
import json
import os
import random
import runpy
import sys
import threading

PRELOAD = ('numpy', 'torch', 'timm', 'accelerate', 'datasets', 'timm_icd.cli.train', 'timm_icd.cli.validate',
           'timm_icd.cli.cache', 'timm_icd.cli.shards', 'timm_icd.cli.report', 'timm_icd.cli.push', 'timm_icd.cli.hub',
           'timm_icd.cli.demo')


def _reply(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + '\n')
    sys.stdout.flush()


def _run_child(request: dict) -> None:
    """In the forked child: become ``python SCRIPT ARGS`` (or ``-m MODULE``), run it, and exit with its status."""
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request['stdout'], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, request['stderr'], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        opened = os.open(path, flags, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    sys.stdin, sys.stdout = open(0, closefd=False), open(1, 'w', closefd=False)
    sys.stderr = open(2, 'w', buffering=1, errors='backslashreplace', closefd=False)
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr
    os.chdir(request['cwd'])
    random.seed()
    sys.modules['numpy'].random.seed()
    try:
        if request['module']:
            sys.path[0] = os.getcwd()
            sys.argv = [request['module'], *request['argv']]
            runpy.run_module(request['module'], run_name='__main__', alter_sys=True)
        else:
            sys.path[0] = os.path.dirname(os.path.abspath(request['script']))
            sys.argv = [request['script'], *request['argv']]
            runpy.run_path(request['script'], run_name='__main__')
        code = 0
    except SystemExit as e:  # the interpreter's reading of sys.exit(arg)
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    # the interpreter's exit, up to tearing down the modules: that last part would write to every page of the heap
    # this child shares with the zygote (3 to 4 s here) and only frees memory
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # the handlers the command registered (and torch's), as at interpreter exit
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    for name in PRELOAD:
        importlib.import_module(name)
    gc.freeze()  # the gc module's advice before forking: children's collections leave the shared pages alone
    _reply({'ready': True})
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _run_child(request)
        _reply({'pid': pid})
        _, status = os.waitpid(pid, 0)
        _reply({'returncode': os.waitstatus_to_exitcode(status)})


if __name__ == '__main__':
    main()
