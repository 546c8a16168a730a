"""Write a teacher cache ahead of the runs that will read it.

    python -m timm_icd.cache TEACHER --teacher-cache DIR --dataset ... --epochs E [train_icd.py's data flags]
    accelerate launch -m timm_icd.cache TEACHER ...      # every process writes its share of the rows
"""
import sys
from typing import List, Optional

from ..base import UserError
from ..run import parse_and_validate, write_ahead
from .common import is_main_process, run_command


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and not argv[0].startswith('-'):  # the teacher, positionally
        argv = ['--teacher', *argv]

    def body() -> int:
        args = parse_and_validate(argv)
        if not args.teacher_cache:
            raise UserError('name the cache folder with --teacher-cache DIR.')
        cache = write_ahead(args)['cache']
        if is_main_process():
            print(f"done: {args.teacher_cache} holds epochs {cache.manifest['epochs']} of {cache.rows} rows "
                  f"({cache.bytes_per_row()} bytes per row, {cache.bytes_per_row() * cache.rows / 2 ** 20:.1f} MiB "
                  f"per epoch)")
        return 0

    return run_command(body)


if __name__ == '__main__':
    sys.exit(main())
