"""Write a teacher cache ahead of the runs that will read it, or check one.

    python -m timm_icd cache TEACHER --teacher-cache DIR --dataset ... --epochs E [train_icd.py's data flags]
    accelerate launch -m timm_icd cache TEACHER ...      # every process writes its share of the rows
    python -m timm_icd cache --verify DIR                # check every epoch; say what a run would compute again

``--verify`` changes nothing and exits 0 when every complete epoch is intact, 1 when some are damaged (a run drops
and recomputes them), 2 when DIR is no usable cache.
"""
import sys
from typing import List, Optional

from ..base import UserError
from ..run import parse_and_validate, run_config, write_ahead
from ..teacher_cache import verify
from .common import is_main_process, run_command


def _verify(argv: List[str]) -> int:
    if len(argv) != 1:
        raise UserError('usage: python -m timm_icd cache --verify DIR')
    root = argv[0]
    report = verify(root)
    damaged, incomplete = report['damaged'], report['incomplete']
    mib = report['bytes_per_row'] * report['rows'] / 2 ** 20
    print(f"{root}: {len(report['epochs'])} complete epochs of {report['rows']} rows ({mib:.1f} MiB each), "
          f"{len(report['epochs']) - len(damaged)} intact")
    for epoch, reason in sorted(damaged.items()):
        print(f'epoch {epoch}: damaged: {reason}')
    if incomplete:
        print(f'epochs {incomplete}: incomplete (never used; a run reaching them computes them)')
    if damaged:
        print(f'a run would drop and compute again epochs {sorted(damaged)}')
        return 1
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ['--verify']:
        return run_command(lambda: _verify(argv[1:]))
    if argv and not argv[0].startswith('-'):  # the teacher, positionally
        argv = ['--teacher', *argv]

    def body() -> int:
        args = parse_and_validate(argv, prog='python -m timm_icd cache',
                                  description='Write a teacher cache ahead of the runs that read it, for every epoch '
                                              'they train, with their flags. The teacher may come first, without '
                                              '--teacher: "python -m timm_icd cache TEACHER --teacher-cache DIR '
                                              '...". Check a cache instead: "python -m timm_icd cache --verify DIR" '
                                              '(exit 0 when every complete epoch is intact, 1 when some are damaged, '
                                              '2 when DIR is no usable cache).')
        if not args.teacher_cache:
            raise UserError('name the cache folder with --teacher-cache DIR.')
        cache = write_ahead(run_config(args))['cache']
        if is_main_process():
            print(f"done: {args.teacher_cache} holds epochs {cache.manifest['epochs']} of {cache.rows} rows "
                  f"({cache.bytes_per_row()} bytes per row, {cache.bytes_per_row() * cache.rows / 2 ** 20:.1f} MiB "
                  f"per epoch)")
        return 0

    return run_command(body)


if __name__ == '__main__':
    sys.exit(main())
