"""Run by tests under ``accelerate launch``: a training run that records, per process, the cache rows each step
asked for and how often the live teacher ran, then this rank's weights."""
import json
import os
import sys

import safetensors.torch

from timm_icd import teacher_cache
from timm_icd.config import parse_and_validate
from timm_icd.train import run

SELECTED, LIVE_CALLS = [], [0]
_select, _write = teacher_cache.CachedTeacher.select, teacher_cache.TeacherCache.write


def _recording_select(self, epoch, index):
    SELECTED.append([epoch, index.tolist()])
    _select(self, epoch, index)


def _counting_write(self, *args, **kwargs):
    LIVE_CALLS[0] += 1
    _write(self, *args, **kwargs)


if __name__ == '__main__':
    teacher_cache.CachedTeacher.select = _recording_select
    teacher_cache.TeacherCache.write = _counting_write
    dump_dir = sys.argv[1]
    args = parse_and_validate(sys.argv[2:])
    result = run(args, sys.argv[2:])
    rank = int(os.environ.get('RANK', '0'))
    state = {k: v.contiguous() for k, v in result['model'].state_dict().items()}
    safetensors.torch.save_file(state, os.path.join(dump_dir, f'rank{rank}.safetensors'))
    with open(os.path.join(dump_dir, f'cache{rank}.json'), 'w') as f:
        json.dump({'selected': SELECTED, 'writes': LIVE_CALLS[0]}, f)
