"""Several models side by side on one eval split: accuracy, speed, size and compute, and what their records claim.

``python -m timm_icd validate --model A B ...`` measures (``cli/validate.py``); this module counts parameters and
multiply-accumulates, reads what a student claims (its distillation.json, or its model card's model-index), marks a
claim the measurement does not bear out, and writes the comparison as markdown and CSV.
"""
import csv
import io
import json
import logging
from pathlib import Path
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
from huggingface_hub import ModelCard, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RemoteEntryNotFoundError
from torch.utils.flop_counter import FlopCounterMode

from ..base import first_line, write_text_atomic
from .export import DISTILLATION_JSON, public_name, read_record
from .search import card_claims, format_count

_logger = logging.getLogger(__name__)

CLAIM_TOLERANCE = 0.5  # top-1 points a measurement may differ from the claim before it is marked
CSV_COLUMNS = ('model', 'dataset', 'split', 'input_size', 'top1', 'top5', 'images', 'images_per_second',
               'parameters', 'macs', 'gmacs', 'claimed_top1', 'claimed_on', 'claim')


def count_parameters(model: nn.Module) -> int:
    """The model's parameters (buffers such as BatchNorm statistics not counted), as timm reports them."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass on one image of ``input_size`` (C, H, W).

    torch's ``FlopCounterMode`` counts the matrix products and convolutions, two FLOPs per multiply-accumulate;
    normalisation, activations and pooling are not counted, as in fvcore and timm's benchmarks.
    """
    param = next(model.parameters(), None)
    x = torch.zeros(1, *input_size, device=param.device if param is not None else 'cpu',
                    dtype=param.dtype if param is not None else torch.float32)
    training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(training)
    return counter.get_total_flops() // 2


def _record_claims(record: dict, source: str) -> dict:
    dataset = record.get('dataset') or {}
    return {'top1': record.get('top1'), 'top5': record.get('top5'), 'dataset': dataset.get('name'),
            'split': dataset.get('eval_split'), 'source': source}


def _hub_claims(repo_id: str) -> dict:
    try:
        with open(hf_hub_download(repo_id, DISTILLATION_JSON)) as f:
            return _record_claims(json.load(f), f'hf-hub:{repo_id}/{DISTILLATION_JSON}')
    except RemoteEntryNotFoundError:  # not made with this tool: the card's model-index, if it has one
        pass
    try:
        card = ModelCard.load(repo_id)
    except RemoteEntryNotFoundError:  # no card either: no claim
        return {}
    claims = card_claims(card.data)
    results = getattr(card.data, 'eval_results', None) or []
    if not claims or not results:
        return {}
    return {**claims, 'dataset': results[0].dataset_name, 'split': results[0].dataset_split,
            'source': f'hf-hub:{repo_id} model card'}


def read_claims(name: str) -> dict:
    """What a student says it measured: top-1 / top-5 (%), on which dataset and split, and where that is written.

    ``name`` as ``load_student`` takes it. A local student's claim is its distillation.json; a Hub student's is its
    distillation.json, else its model card's model-index. ``{}`` for a timm name or a model claiming nothing (a
    claim that cannot be read is logged and left out: it never stops a measurement).
    """
    try:
        if name.startswith('hf-hub:'):
            return _hub_claims(name[len('hf-hub:'):])
        folder = Path(name[len('local-dir:'):] if name.startswith('local-dir:') else name)
        record = read_record(folder) if folder.is_dir() else {}
        return _record_claims(record, str(folder / DISTILLATION_JSON)) if record else {}
    except (OSError, ValueError, HfHubHTTPError, EntryNotFoundError) as e:
        _logger.warning(f"Cannot read what '{name}' claims ({first_line(e, 200)}); comparing without it.")
        return {}


def check_claim(top1: float, claims: dict, dataset: str, split: str, tolerance: float = CLAIM_TOLERANCE) -> str:
    """``''`` without a claim, ``other data`` for a claim on another dataset or split, else ``ok`` or ``DIFFERS``
    (more than ``tolerance`` top-1 points from the measurement)."""
    if claims.get('top1') is None:
        return ''
    if public_name(claims.get('dataset') or '') != public_name(dataset) or claims.get('split') != split:
        return 'other data'
    return 'DIFFERS' if abs(top1 - claims['top1']) > tolerance else 'ok'


def markdown_table(rows: List[dict], tolerance: float = CLAIM_TOLERANCE) -> str:
    """The comparison as a markdown table, with a line on the data and one on what a mark means."""
    first = rows[0]
    headers = ['model', 'input', 'top-1', 'top-5', 'images/s', 'params', 'GMACs', 'claimed top-1', 'claim']
    body = [[f"`{r['model']}`", 'x'.join(map(str, r['input_size'])), f"{r['top1']:.2f}", f"{r['top5']:.2f}",
             f"{r['images_per_second']:.1f}", format_count(r['parameters']), f"{r['gmacs']:.3g}",
             '' if r['claimed_top1'] is None else f"{r['claimed_top1']:.2f}", r['claim']] for r in rows]
    lines = [f"Top-1 / top-5 (%) on `{public_name(first['dataset'])}` [{first['split']}], {first['images']} images, "
             f'each model with its own preprocessing; GMACs for one image at its input size.', '',
             '| ' + ' | '.join(headers) + ' |', '|' + '|'.join('---' for _ in headers) + '|']
    lines += ['| ' + ' | '.join(cells) + ' |' for cells in body]
    if any(r['claim'] for r in rows):
        lines += ['', f'claim: the top-1 the student\'s distillation.json or model card claims, on the same data: ok '
                      f'within {tolerance} points of the measurement, DIFFERS beyond.']
    return '\n'.join(lines) + '\n'


def csv_table(rows: List[dict]) -> str:
    """The comparison as CSV, one row per model, numbers unrounded."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction='ignore', lineterminator='\n')
    writer.writeheader()
    for r in rows:
        writer.writerow({**r, 'input_size': 'x'.join(map(str, r['input_size'])),
                         'claimed_top1': '' if r['claimed_top1'] is None else r['claimed_top1'],
                         'claimed_on': r['claimed_on'] or ''})
    return buf.getvalue()


def write_comparison(rows: List[dict], markdown: Optional[Path] = None, csv_path: Optional[Path] = None,
                     tolerance: float = CLAIM_TOLERANCE) -> None:
    """Write the comparison's markdown and/or CSV file (each replaced whole, never half-written)."""
    if markdown:
        write_text_atomic(Path(markdown), markdown_table(rows, tolerance))
    if csv_path:
        write_text_atomic(Path(csv_path), csv_table(rows))
