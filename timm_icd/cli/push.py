"""Push a finished run's student folder to the Hugging Face Hub (for runs made offline, or to push again).

    python -m timm_icd push OUT/student ORG/NAME [--private] [--revision BRANCH] [--baseline VANILLA/student]
                            [--hub-collection NAMESPACE/TITLE-ID]
"""
import sys
from typing import List, Optional

from ..publish import push_student
from ..run import ArgumentParser
from .common import run_command


def main(argv: Optional[List[str]] = None) -> int:
    parser = ArgumentParser(prog='python -m timm_icd push', description=__doc__.splitlines()[0])
    parser.add_argument('folder', help='a student folder written by train_icd.py (OUT/student)')
    parser.add_argument('repo_id', help='ORG/NAME of the Hub model repository (created if needed)')
    # train_icd.py's names (--hub-*) and the short ones both work
    parser.add_argument('--hub-private', '--private', dest='private', action='store_true',
                        help='create the repository as private')
    parser.add_argument('--hub-revision', '--revision', dest='revision', default=None,
                        help='branch to push to (created if needed)')
    parser.add_argument('--hub-license', '--license', dest='license', default='apache-2.0',
                        help="the card's license (default: apache-2.0)")
    parser.add_argument('--baseline', default=None, metavar='FOLDER',
                        help='student folder of the same student trained --method vanilla, for the results table')
    parser.add_argument('--hub-collection', '--collection', dest='collection', default=None, metavar='SLUG',
                        help="then add the repository to this Hub collection (its URL's NAMESPACE/TITLE-ID)")

    def body() -> int:
        args = parser.parse_args(argv)
        url = push_student(args.folder, args.repo_id, private=args.private, revision=args.revision,
                           license=args.license, baseline=args.baseline, collection=args.collection)
        also = f' and added it to collection {args.collection}' if args.collection else ''
        print(f'pushed {args.folder} to {url}{also}')
        return 0

    return run_command(body)


if __name__ == '__main__':
    sys.exit(main())
