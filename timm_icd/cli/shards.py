"""Write any dataset ``--dataset`` reads as streaming shards (webdataset tars or parquet files), in one command.

    python -m timm_icd shards SRC OUT --shard-size N [--format webdataset|parquet] [--splits train,test]
        [--image-column C] [--label-column C] [--max-size [S]] [--quality Q]

What is written, and how: ``timm_icd/data/shards.py``.
"""
import logging
import sys
from typing import List, Optional

from ..data.shards import DEFAULT_MAX_SIZE, DEFAULT_QUALITY, SUFFIX, write_shards
from ..run import ArgumentParser
from .common import run_command


def main(argv: Optional[List[str]] = None) -> int:
    parser = ArgumentParser(prog='python -m timm_icd shards', description=__doc__.splitlines()[0])
    parser.add_argument('src', help='what --dataset takes: Hub id, save_to_disk folder, imagefolder:PATH or digits')
    parser.add_argument('out', help='a new or empty folder for the shards')
    parser.add_argument('--shard-size', type=int, required=True, metavar='N', help='most rows per shard')
    parser.add_argument('--format', default='webdataset', choices=sorted(SUFFIX), help='default: webdataset')
    parser.add_argument('--splits', default=None, help='comma-separated source splits (default: train/val/test ones)')
    parser.add_argument('--image-column', default=None, help='image column (default: detected)')
    parser.add_argument('--label-column', default=None, help='label column (default: detected)')
    parser.add_argument('--max-size', type=int, nargs='?', const=DEFAULT_MAX_SIZE, default=None, metavar='S',
                        help=f'resize images whose longer side exceeds S px to S and encode them again (alone: '
                             f'{DEFAULT_MAX_SIZE}, for 224 px training; default: keep every image as it is)')
    parser.add_argument('--quality', type=int, default=DEFAULT_QUALITY, metavar='Q',
                        help=f'JPEG quality of the resized images (default: {DEFAULT_QUALITY})')

    def body() -> int:
        args = parser.parse_args(argv)
        logging.basicConfig(level=logging.INFO, format='%(message)s')
        write_shards(args.src, args.out, args.shard_size, args.format, args.splits.split(',') if args.splits else None,
                     args.image_column, args.label_column, max_size=args.max_size, quality=args.quality)
        return 0

    return run_command(body)


if __name__ == '__main__':
    sys.exit(main())
