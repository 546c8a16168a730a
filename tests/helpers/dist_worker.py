"""Run by tests under ``accelerate launch`` with 2 CPU processes: the real training run, then this rank's weights
(the student's, and the teacher's where the run had one)."""
import os
import sys

import safetensors.torch

from timm_icd.run import parse_and_validate
from timm_icd.run import run


def train_and_dump(dump_dir: str, argv: list) -> int:
    """Train as train_icd.py would with ``argv``, save this rank's final weights in ``dump_dir``; return the rank."""
    result = run(parse_and_validate(argv), argv)
    rank = int(os.environ.get('RANK', '0'))
    state = {k: v.contiguous() for k, v in result['model'].state_dict().items()}
    safetensors.torch.save_file(state, os.path.join(dump_dir, f'rank{rank}.safetensors'))
    if result.get('teacher_model') is not None:  # the teacher each process distilled from (an adapted one's head)
        teacher = {k: v.contiguous() for k, v in result['teacher_model'].state_dict().items()}
        safetensors.torch.save_file(teacher, os.path.join(dump_dir, f'teacher{rank}.safetensors'))
    return rank


if __name__ == '__main__':
    train_and_dump(sys.argv[1], sys.argv[2:])
