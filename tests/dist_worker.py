"""Run by tests under ``accelerate launch`` with 2 CPU processes: the real training run, then this rank's weights."""
import os
import sys

import safetensors.torch

from timm_icd.config import parse_and_validate
from timm_icd.train import run

if __name__ == '__main__':
    dump_dir = sys.argv[1]
    args = parse_and_validate(sys.argv[2:])
    result = run(args, sys.argv[2:])
    rank = int(os.environ['RANK'])
    state = {k: v.contiguous() for k, v in result['model'].state_dict().items()}
    safetensors.torch.save_file(state, os.path.join(dump_dir, f'rank{rank}.safetensors'))
