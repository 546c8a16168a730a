"""Run by tests under ``accelerate launch``: a real streaming run that also records, per process, the train samples
of every batch it trained on (a digest of each row's encoded image and its label), then this rank's weights."""
import hashlib
import json
import os
import sys

import timm_icd.data.streaming as streaming
from dist_worker import train_and_dump

SEEN = []
_batches = streaming.StreamLoader._batches


def _recording(self, epoch, start):
    for rows, seeds, position in _batches(self, epoch, start):
        if self.train:
            digests = [hashlib.sha1(row[self.image_column]['bytes']).hexdigest() for row in rows]
            SEEN.append([epoch, [f'{d}:{row[self.label_column]}' for d, row in zip(digests, rows)]])
        yield rows, seeds, position


if __name__ == '__main__':
    streaming.StreamLoader._batches = _recording
    rank = train_and_dump(sys.argv[1], sys.argv[2:])
    with open(os.path.join(sys.argv[1], f'seen{rank}.json'), 'w') as f:
        json.dump(SEEN, f)
