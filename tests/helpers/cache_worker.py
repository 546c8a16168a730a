"""Run by tests under ``accelerate launch``: a training run that records, per process, the cache rows each step
asked for, how often the live teacher ran and how many rows it wrote, then this rank's weights."""
import json
import os
import sys

from dist_worker import train_and_dump
from timm_icd import teacher_cache

SELECTED, LIVE_CALLS, ROWS = [], [0], [0]
_select, _write = teacher_cache.CachedTeacher.select, teacher_cache.TeacherCache.write


def _recording_select(self, epoch, index):
    SELECTED.append([epoch, index.tolist()])
    _select(self, epoch, index)


def _counting_write(self, epoch, index, *args, **kwargs):
    LIVE_CALLS[0] += 1
    ROWS[0] += len(index)
    _write(self, epoch, index, *args, **kwargs)


if __name__ == '__main__':
    teacher_cache.CachedTeacher.select = _recording_select
    teacher_cache.TeacherCache.write = _counting_write
    rank = train_and_dump(sys.argv[1], sys.argv[2:])
    with open(os.path.join(sys.argv[1], f'cache{rank}.json'), 'w') as f:
        json.dump({'selected': SELECTED, 'writes': LIVE_CALLS[0], 'rows': ROWS[0]}, f)
