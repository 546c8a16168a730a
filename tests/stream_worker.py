"""Run by tests under ``accelerate launch``: a real streaming run that also records, per process, the train samples
of every batch it trained on (a digest of each row's encoded image and its label), then this rank's weights."""
import hashlib
import json
import os
import sys

import safetensors.torch

import timm_icd.streaming as streaming
from timm_icd.config import parse_and_validate
from timm_icd.train import run

SEEN = []
_batches = streaming.StreamLoader._batches


def _recording(self, epoch, start):
    for rows, seeds, position in _batches(self, epoch, start):
        if self.train:
            SEEN.append([epoch, [hashlib.sha1(row[self.image_column]['bytes']).hexdigest() + f':{row[self.label_column]}'
                                 for row in rows]])
        yield rows, seeds, position


if __name__ == '__main__':
    streaming.StreamLoader._batches = _recording
    dump_dir = sys.argv[1]
    args = parse_and_validate(sys.argv[2:])
    result = run(args, sys.argv[2:])
    rank = int(os.environ['RANK'])
    state = {k: v.contiguous() for k, v in result['model'].state_dict().items()}
    safetensors.torch.save_file(state, os.path.join(dump_dir, f'rank{rank}.safetensors'))
    with open(os.path.join(dump_dir, f'seen{rank}.json'), 'w') as f:
        json.dump(SEEN, f)
