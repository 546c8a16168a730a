"""What every command shares: its exit codes, and how an error ends it (one line, never a traceback for a mistake).

    0    done
    2    a user error: one line, ``error: ...``, on standard error
    3    a peer process died (the watchdog's line; ``run/watchdog.py``)
    75   pre-empted: a signal or the time limit stopped the run at a step boundary, with a checkpoint there
         (``run/preempt.py``: EX_TEMPFAIL, "retry later"; resume with ``--resume auto``)
    130  interrupted (Ctrl-C)

Rank policy, for commands that run under ``accelerate launch``: every process ends with one line. A user error that
every process meets alike (a flag, a missing file) is printed by rank 0 alone; one that a single process meets (a bad
image in its shard) is printed by that process, naming its rank (``[rank 1] error: ...``), and every other process
stops with ``error: rank 1 stopped: ...`` (``run.watchdog.report_user_error``).
"""
import os
import sys
from typing import Callable

from ..base import UserError, error_line
from ..run import PREEMPTED_EXIT_CODE, Preempted, explain_failure, report_user_error


def _rank() -> int:
    return int(os.environ.get('RANK', '0'))


def is_main_process() -> bool:
    """Whether this process prints a command's results (rank 0 of a launch, or a plain process)."""
    return _rank() == 0


def run_command(body: Callable[[], int], interrupted: str = 'interrupted') -> int:
    """Run a command's ``body`` and return its exit code, turning a ``UserError`` into its one line and exit 2.

    Args:
        body: The command's work; returns its exit code.
        interrupted: The line printed on Ctrl-C (e.g. how to resume).
    """
    try:
        return body()
    except UserError as e:
        line = error_line(e)
        if report_user_error(line, own=e.rank is not None):
            print(f'[rank {_rank()}] error: {line}' if _rank() else f'error: {line}', file=sys.stderr)
        return 2
    except Preempted as e:  # every process saved its part of the checkpoint and agrees: one line, from rank 0
        if is_main_process():
            print(str(e), file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    except Exception as e:  # in a multi-process run, a peer's death: the watchdog's one line instead of a traceback
        explain_failure(e)
        raise
