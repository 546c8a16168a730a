"""``python -m timm_icd.demo``: the README demo (``timm_icd/cli/demo.py``)."""
import sys

from .cli.demo import main

if __name__ == '__main__':
    sys.exit(main())
