"""Distill a teacher into a student (``train_icd.py``): check the flags, run, and say where the student is."""
import sys
from typing import List, Optional

from ..run import parse_and_validate, run, run_config
from .common import is_main_process, run_command


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv

    def body() -> int:
        result = run(run_config(parse_and_validate(argv)), argv)
        if is_main_process():
            top1 = f"{result['top1']:.2f}%" if result['top1'] is not None else 'n/a'
            print(f"done: {result['method']} student top-1 {top1} after {result['epochs']} epochs in "
                  f"{result['seconds']:.0f}s; saved to {result['student']}")
        return 0

    return run_command(body, interrupted='interrupted: resume with --resume auto')


if __name__ == '__main__':
    sys.exit(main())
