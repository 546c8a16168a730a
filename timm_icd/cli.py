"""``train_icd.py``'s main: parse, validate, run, and turn every user mistake into one line and exit code 2."""
import logging
import os
import sys
from typing import List, Optional

from .errors import UserError

_logger = logging.getLogger(__name__)


def error_line(e: BaseException) -> str:
    """The one line to show for a ``UserError``, also when a DataLoader worker raised it (and wrapped it)."""
    text = str(e).strip()
    if 'Original Traceback' in text:  # re-raised from a DataLoader worker: the message is the last line
        text = text.splitlines()[-1].split('UserError: ', 1)[-1]
    return ' '.join(text.split())


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        from .config import parse_and_validate
        args = parse_and_validate(argv)
        from .train import run
        result = run(args, argv)
    except UserError as e:
        rank = getattr(e, 'rank', None)  # set for errors raised once training started, on processes other than 0
        if rank is not None:
            print(f'[rank {rank}] error: {error_line(e)}', file=sys.stderr)
        elif int(os.environ.get('RANK', '0')) == 0:  # checks before training fail the same on every process
            print(f'error: {error_line(e)}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('interrupted: resume with --resume auto', file=sys.stderr)
        return 130
    except Exception as e:  # in a multi-process run, a peer's death: the watchdog's one line instead of a traceback
        from .watchdog import explain_failure
        explain_failure(e)
        raise
    if int(os.environ.get('RANK', '0')) == 0:
        top1 = f"{result['top1']:.2f}%" if result['top1'] is not None else 'n/a'
        print(f"done: {result['method']} student top-1 {top1} after {result['epochs']} epochs in "
              f"{result['seconds']:.0f}s; saved to {result['student']}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
