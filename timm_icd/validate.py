"""``python -m timm_icd.validate``: evaluate published or local students (``timm_icd/cli/validate.py``)."""
import sys

from .cli.validate import main

if __name__ == '__main__':
    sys.exit(main())
