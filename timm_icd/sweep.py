"""``python -m timm_icd.sweep``: methods x seeds on your teacher, student and dataset (``timm_icd/cli/sweep.py``)."""
import sys

from .cli.sweep import main

if __name__ == '__main__':
    sys.exit(main())
