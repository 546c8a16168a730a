"""What every command shares: its exit codes, and how an error ends it (one line, never a traceback for a mistake).

    0    done
    2    a user error: one line, ``error: ...``, on standard error
    3    a peer process died (the watchdog's line; ``run/watchdog.py``)
    130  interrupted (Ctrl-C)

Rank policy, for commands that run under ``accelerate launch``: checks before training fail the same way on every
process, so only the main process (``RANK`` 0, or no ``RANK``) prints them; an error raised after training started on
another process may be that process's alone (a bad image in its shard), so that process prints it, naming its rank
(``[rank 1] error: ...``).
"""
import os
import sys
from typing import Callable

from ..base import UserError, error_line
from ..run import explain_failure


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
        if e.rank is not None:
            print(f'[rank {e.rank}] error: {error_line(e)}', file=sys.stderr)
        elif is_main_process():
            print(f'error: {error_line(e)}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    except Exception as e:  # in a multi-process run, a peer's death: the watchdog's one line instead of a traceback
        explain_failure(e)
        raise
