"""Find the students published with this tool on the Hugging Face Hub, with what they measured.

    python -m timm_icd hub search [--student ARCH] [--teacher ARCH] [--dataset NAME] [--author ORG] [--method M]
                                  [--sort accuracy|downloads|recent] [--limit N] [--json]

Prints a table (``--json``: a JSON list for scripts). No match is not an error: one line saying so (``[]`` with
``--json``), exit 0. A Hub that cannot be reached is one ``error: cannot reach the Hub at ...`` line, exit 2.
A listed model whose distillation.json cannot be read is left out, with a ``note:`` line on standard error.
"""
import json
import sys
from typing import List, Optional

from ..distill import method_names
from ..publish import SORTS, format_students, search_students
from ..run import ArgumentParser
from .common import run_command


def create_parser() -> ArgumentParser:
    parser = ArgumentParser(prog='python -m timm_icd hub', description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
    search = commands.add_parser(
        'search', help='list the students pushed with timm_icd',
        description='List the students pushed with timm_icd (Hub tag timm_icd), best first. Filters take '
                    'shell-style wildcards (resnet*) and ignore case.')
    search.add_argument('--student', default=None, metavar='ARCH', help="the student's timm architecture")
    search.add_argument('--teacher', default=None, metavar='ARCH',
                        help="the teacher's architecture, timm name or Hub id")
    search.add_argument('--dataset', default=None, metavar='NAME',
                        help='the dataset: a Hub id, or a local folder (matched by its name)')
    search.add_argument('--author', default=None, metavar='ORG', help='the user or organisation that pushed it')
    search.add_argument('--method', default=None, choices=method_names(), metavar='M',
                        help=f"the method: {', '.join(method_names())}")
    search.add_argument('--sort', default='accuracy', choices=list(SORTS),
                        help='accuracy (top-1, default), downloads, or recent (last updated)')
    search.add_argument('--limit', type=int, default=20, metavar='N', help='students shown at most (default: 20)')
    search.add_argument('--json', action='store_true', help='print a JSON list instead of the table')
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = create_parser()

    def body() -> int:
        args = parser.parse_args(argv)
        result = search_students(architecture=args.student, teacher=args.teacher, dataset=args.dataset,
                                 author=args.author, method=args.method, sort=args.sort, limit=args.limit)
        for note in result.skipped:
            print(f'note: {note}', file=sys.stderr)
        if args.json:
            print(json.dumps([s.to_json() for s in result.students], indent=2))
        if not result.students:
            print('no published timm_icd student matches these filters.', file=sys.stderr if args.json else sys.stdout)
        elif not args.json:
            print(format_students(result.students))
        return 0

    return run_command(body)


if __name__ == '__main__':
    sys.exit(main())
