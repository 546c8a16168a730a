"""Evaluate a published or local student like timm's validate.py: top-1, top-5 and images per second.

    python -m timm_icd.validate --model hf-hub:ORG/NAME --dataset uoft-cs/cifar100 [--split test]
"""
import json
import logging
import sys
import time
from typing import List, Optional

import torch
from accelerate import Accelerator
from timm.data import create_transform, resolve_data_config

from ..base import UserError
from ..data import ImageClassificationDataset, load_image_data
from ..publish import load_student
from ..run import ArgumentParser, evaluate
from .common import run_command

_logger = logging.getLogger(__name__)


def validate(model_name: str, dataset: str, split: Optional[str] = None, batch_size: int = 256, workers: int = 2,
             image_column: Optional[str] = None, label_column: Optional[str] = None) -> dict:
    """Top-1 / top-5 (%) of a student on a dataset split, with the student's own preprocessing."""
    model = load_student(model_name).eval()
    data = load_image_data(dataset, val_split=split, image_column=image_column, label_column=label_column)
    if model.num_classes != data.num_classes:
        raise UserError(f"'{model_name}' predicts {model.num_classes} classes but '{dataset}' has "
                        f"{data.num_classes}; evaluate it on the dataset it was trained for.")
    config = resolve_data_config(model=model)
    ds = ImageClassificationDataset(data.eval, data.image_column, data.label_column, create_transform(**config),
                                    split_name=data.eval_split)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers)
    accelerator = Accelerator()
    model, loader = accelerator.prepare(model, loader)
    started = time.time()
    metrics = evaluate(accelerator, model, loader)
    seconds = time.time() - started
    return {'model': model_name, 'dataset': data.name, 'split': data.eval_split, 'top1': metrics['top1'],
            'top5': metrics['top5'], 'loss': metrics['loss'], 'images': metrics['count'],
            'images_per_second': metrics['count'] / seconds, 'input_size': list(config['input_size'])}


def main(argv: Optional[List[str]] = None) -> int:
    parser = ArgumentParser(prog='python -m timm_icd.validate', description=__doc__.splitlines()[0])
    parser.add_argument('--model', required=True, help='hf-hub:ORG/NAME, local-dir:PATH or a student folder')
    parser.add_argument('--dataset', default='digits', help='Hub id, save_to_disk folder, imagefolder:PATH, digits')
    parser.add_argument('--split', default=None, help='split to evaluate (default: validation/val/test)')
    parser.add_argument('-b', '--batch-size', type=int, default=256)
    parser.add_argument('-j', '--workers', type=int, default=2)
    parser.add_argument('--image-column', default=None)
    parser.add_argument('--label-column', default=None)
    parser.add_argument('--results-file', default=None, help='also write the results to this JSON file')

    def body() -> int:
        args = parser.parse_args(argv)
        results = validate(args.model, args.dataset, args.split, args.batch_size, args.workers, args.image_column,
                           args.label_column)
        print(f"{results['model']} on {results['dataset']} [{results['split']}]: top-1 {results['top1']:.3f}%, "
              f"top-5 {results['top5']:.3f}%, {results['images']} images, {results['images_per_second']:.1f} img/s")
        if args.results_file:
            with open(args.results_file, 'w') as f:
                json.dump(results, f, indent=2)
        return 0

    return run_command(body)


if __name__ == '__main__':
    sys.exit(main())
