"""``python -m timm_icd.cli``: the same as ``train_icd.py``."""
import sys

from .train import main

sys.exit(main())
