"""``python -m timm_icd.cache``: write a teacher cache ahead of the runs that read it (``timm_icd/cli/cache.py``)."""
import sys

from .cli.cache import main

if __name__ == '__main__':
    sys.exit(main())
