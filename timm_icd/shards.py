"""``python -m timm_icd.shards``: write a dataset as streaming shards (``timm_icd/cli/shards.py``)."""
import sys

from .cli.shards import main

if __name__ == '__main__':
    sys.exit(main())
