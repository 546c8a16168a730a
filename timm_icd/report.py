"""``python -m timm_icd.report``: compare finished runs (``timm_icd/cli/report.py``)."""
import sys

from .cli.report import main

if __name__ == '__main__':
    sys.exit(main())
