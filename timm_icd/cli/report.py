"""Compare finished runs: one table row per run and their eval top-1 curves in one PNG.

    python -m timm_icd report RUN [RUN ...] [--out runs.png]
"""
import sys
from pathlib import Path
from typing import List, Optional

from ..base import UserError
from ..publish import plot_runs, read_run, table
from ..run import ArgumentParser
from .common import run_command


def main(argv: Optional[List[str]] = None) -> int:
    parser = ArgumentParser(prog='python -m timm_icd report', description=__doc__.splitlines()[0])
    parser.add_argument('runs', nargs='+', help='run folders (train_icd.py --output)')
    parser.add_argument('--out', default='runs.png', help='PNG of every run\'s eval top-1 curve (default: runs.png)')

    def body() -> int:
        args = parser.parse_args(argv)
        runs = [read_run(Path(folder)) for folder in args.runs]
        if not all(run['rows'] for run in runs):
            raise UserError('a run has no finished epoch yet: nothing to compare.')
        print(table(runs))
        print(f'curves: {plot_runs(runs, Path(args.out))}')
        return 0

    return run_command(body)


if __name__ == '__main__':
    sys.exit(main())
