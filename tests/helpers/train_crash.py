"""``train_icd.py`` with crash injection (``crash.py``): what the kill-and-resume tests run."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import crash  # noqa: E402,F401  (registers the crash point named by TIMM_ICD_CRASH_AT)
from timm_icd.cli.train import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main())
