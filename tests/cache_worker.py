"""Run by tests under ``accelerate launch``: a training run that records, per process, the cache rows each step
asked for and how often the live teacher ran, then this rank's weights."""
import json
import os
import sys

from dist_worker import train_and_dump
from timm_icd import teacher_cache

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
    rank = train_and_dump(sys.argv[1], sys.argv[2:])
    with open(os.path.join(sys.argv[1], f'cache{rank}.json'), 'w') as f:
        json.dump({'selected': SELECTED, 'writes': LIVE_CALLS[0]}, f)
