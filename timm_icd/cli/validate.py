"""Evaluate published or local students like timm's validate.py: top-1, top-5, images per second, size and compute.

    python -m timm_icd validate --model hf-hub:ORG/NAME --dataset uoft-cs/cifar100 [--split test]
    python -m timm_icd validate --model hf-hub:ORG/A hf-hub:ORG/B OUT/student --dataset D \\
        [--results-md cmp.md] [--results-csv cmp.csv]

Several models are measured side by side on the same split, each with its own preprocessing; a student whose
distillation.json or model card claims a top-1 more than --claim-tolerance points from the measurement is marked.
"""
import json
import logging
import sys
import time
from typing import List, Optional

import torch
from accelerate import Accelerator
from timm.data import create_transform, resolve_data_config

from ..base import UserError, write_text_atomic
from ..data import ImageClassificationDataset, ImageData, load_image_data
from ..publish import (
    CLAIM_TOLERANCE, check_claim, count_macs, count_parameters, load_student, markdown_table, read_claims,
    write_comparison)
from ..run import ArgumentParser, evaluate
from .common import run_command

_logger = logging.getLogger(__name__)


def _measure(model_name: str, data: ImageData, accelerator: Accelerator, batch_size: int, workers: int,
             claim_tolerance: float) -> dict:
    """One model on ``data``'s eval split, with its own preprocessing."""
    model = load_student(model_name).eval()
    if model.num_classes != data.num_classes:
        raise UserError(f"'{model_name}' predicts {model.num_classes} classes but '{data.name}' has "
                        f"{data.num_classes}; evaluate it on the dataset it was trained for.")
    config = resolve_data_config(model=model)
    parameters, macs = count_parameters(model), count_macs(model, config['input_size'])
    ds = ImageClassificationDataset(data.eval, data.image_column, data.label_column, create_transform(**config),
                                    split_name=data.eval_split)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers)
    model, loader = accelerator.prepare(model, loader)
    started = time.time()
    metrics = evaluate(accelerator, model, loader)
    seconds = time.time() - started
    accelerator.free_memory()  # let go of this model before the next one is loaded
    claims = read_claims(model_name)
    return {'model': model_name, 'dataset': data.name, 'split': data.eval_split, 'top1': metrics['top1'],
            'top5': metrics['top5'], 'loss': metrics['loss'], 'images': metrics['count'],
            'images_per_second': metrics['count'] / seconds, 'input_size': list(config['input_size']),
            'parameters': parameters, 'macs': macs, 'gmacs': macs / 1e9, 'claimed_top1': claims.get('top1'),
            'claimed_on': claims.get('source'),
            'claim': check_claim(metrics['top1'], claims, data.name, data.eval_split, claim_tolerance)}


def validate_many(model_names: List[str], dataset: str, split: Optional[str] = None, batch_size: int = 256,
                  workers: int = 2, image_column: Optional[str] = None, label_column: Optional[str] = None,
                  claim_tolerance: float = CLAIM_TOLERANCE) -> List[dict]:
    """Each model's top-1 / top-5 (%), images/s, parameters and MACs on one dataset split, and its claim check.

    Args:
        model_names: ``hf-hub:ORG/NAME``, ``local-dir:PATH`` or student folders (``load_student`` names).
        dataset: What ``--dataset`` takes; loaded once, each model transforms it with its own data config.
        claim_tolerance: Top-1 points a measurement may differ from a student's claim before it is ``DIFFERS``.
    """
    data = load_image_data(dataset, val_split=split, image_column=image_column, label_column=label_column)
    accelerator = Accelerator()
    return [_measure(name, data, accelerator, batch_size, workers, claim_tolerance) for name in model_names]


def validate(model_name: str, dataset: str, split: Optional[str] = None, batch_size: int = 256, workers: int = 2,
             image_column: Optional[str] = None, label_column: Optional[str] = None) -> dict:
    """Top-1 / top-5 (%) of a student on a dataset split, with the student's own preprocessing (``validate_many``)."""
    return validate_many([model_name], dataset, split, batch_size, workers, image_column, label_column)[0]


def main(argv: Optional[List[str]] = None) -> int:
    parser = ArgumentParser(prog='python -m timm_icd validate', description=__doc__.splitlines()[0])
    parser.add_argument('--model', required=True, nargs='+', action='extend', metavar='MODEL',
                        help='one or more: hf-hub:ORG/NAME, local-dir:PATH or a student folder')
    parser.add_argument('--dataset', default='digits', help='Hub id, save_to_disk folder, imagefolder:PATH, digits')
    parser.add_argument('--split', default=None, help='split to evaluate (default: validation/val/test)')
    parser.add_argument('-b', '--batch-size', type=int, default=256)
    parser.add_argument('-j', '--workers', type=int, default=2)
    parser.add_argument('--image-column', default=None)
    parser.add_argument('--label-column', default=None)
    parser.add_argument('--claim-tolerance', type=float, default=CLAIM_TOLERANCE, metavar='POINTS',
                        help=f'mark a student whose claimed top-1 is further than this from the measured one '
                             f'(default: {CLAIM_TOLERANCE})')
    parser.add_argument('--results-file', default=None,
                        help='also write the results to this JSON file (one model: an object; several: a list)')
    parser.add_argument('--results-md', default=None, metavar='FILE', help='also write the markdown table here')
    parser.add_argument('--results-csv', default=None, metavar='FILE', help='also write the table as CSV here')

    def body() -> int:
        args = parser.parse_args(argv)
        if args.claim_tolerance < 0:
            raise UserError(f'--claim-tolerance must be >= 0, got {args.claim_tolerance}.')
        rows = validate_many(args.model, args.dataset, args.split, args.batch_size, args.workers, args.image_column,
                             args.label_column, args.claim_tolerance)
        for r in rows:
            print(f"{r['model']} on {r['dataset']} [{r['split']}]: top-1 {r['top1']:.3f}%, top-5 {r['top5']:.3f}%, "
                  f"{r['images']} images, {r['images_per_second']:.1f} img/s")
        print()
        print(markdown_table(rows, args.claim_tolerance), end='')
        write_comparison(rows, args.results_md, args.results_csv, args.claim_tolerance)
        if args.results_file:
            write_text_atomic(args.results_file, json.dumps(rows[0] if len(rows) == 1 else rows, indent=2))
        return 0

    return run_command(body)


if __name__ == '__main__':
    sys.exit(main())
