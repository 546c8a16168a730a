"""``python -m timm_icd.hub``: find the students published with this tool on the Hub (``timm_icd/cli/hub.py``)."""
import sys

from .cli.hub import main

if __name__ == '__main__':
    sys.exit(main())
