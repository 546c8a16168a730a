"""``python -m timm_icd.push``: push a student folder to the Hugging Face Hub (``timm_icd/cli/push.py``)."""
import sys

from .cli.push import main

if __name__ == '__main__':
    sys.exit(main())
