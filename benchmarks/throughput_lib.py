"""What ``data_throughput.py`` measures besides speed: how often reduced decoding applies and how close its crops are
to full decoding, and how close crops of images bounded by ``--max-size`` are to crops of the originals.

Both compare the output of timm's random resized crop (the step the levers change) for the same draws: each image
``i`` draws its box and interpolation with Python's ``random`` seeded by ``i``, as a loader worker seeds a sample.
PSNR is over the uint8 RGB crop (peak 255); an identical crop is left out of the statistics (it has no PSNR).
"""
import io
import random
from pathlib import Path
from typing import Dict, List

import numpy as np
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation, interp_mode_to_str, str_to_pil_interp

from timm_icd.data import ReducedDecodeCrop
from timm_icd.data.shards import bounded


def psnr(a, b) -> float:
    """PSNR in dB of two uint8 images (inf when equal)."""
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float('inf') if mse == 0 else float(10 * np.log10(255 ** 2 / mse))


def _summary(values: List[float], count: int, applied: int) -> Dict[str, float]:
    finite = [v for v in values if np.isfinite(v)]
    return {'images': count, 'applied': applied,
            'psnr_median': float(np.median(finite)) if finite else float('nan'),
            'psnr_p5': float(np.percentile(finite, 5)) if finite else float('nan'),
            'psnr_min': float(min(finite)) if finite else float('nan')}


def reduced_decoding_fidelity(files: List[Path], size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                              interpolation: str = 'random') -> Dict[str, float]:
    """How many of ``files`` (JPEGs) decode at a reduced scale for a ``size`` px crop, and the PSNR of those crops
    against full decoding (median, 5th percentile, lowest)."""
    crop = RandomResizedCropAndInterpolation(size, scale=scale, ratio=ratio, interpolation=interpolation)
    reduced = ReducedDecodeCrop.from_timm(crop)
    values, applied = [], 0
    for i, path in enumerate(files):
        data = Path(path).read_bytes()
        random.seed(i)
        image = Image.open(io.BytesIO(data))
        top, left, h, w, _ = reduced.draw(image)
        if reduced.factor(image, h, w) == 1:
            continue
        applied += 1
        random.seed(i)
        full = crop(Image.open(io.BytesIO(data)))
        random.seed(i)
        values.append(psnr(reduced(Image.open(io.BytesIO(data))), full))
    return _summary(values, len(files), applied)


def max_size_fidelity(files: List[Path], size: int, max_size: int, quality: int, scale=(0.08, 1.0),
                      ratio=(3 / 4, 4 / 3), interpolation: str = 'random') -> Dict[str, float]:
    """How many of ``files`` ``--max-size max_size`` resizes, and the PSNR of their ``size`` px crops against the
    same crops of the originals: the box drawn on the original, mapped onto the bounded image (median, 5th
    percentile, lowest)."""
    crop = RandomResizedCropAndInterpolation(size, scale=scale, ratio=ratio, interpolation=interpolation)
    values, applied = [], 0
    for i, path in enumerate(files):
        original = Image.open(path)
        original.load()
        if max(original.size) <= max_size:
            continue
        applied += 1
        small = Image.open(io.BytesIO(bounded(original, max_size, 'JPEG', quality)))
        random.seed(i)
        top, left, h, w, mode = ReducedDecodeCrop.draw(crop, original)
        want = TF.resized_crop(original, top, left, h, w, [size, size], mode)
        sx, sy = small.width / original.width, small.height / original.height
        got = small.resize((size, size), str_to_pil_interp(interp_mode_to_str(mode)),
                           box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))
        values.append(psnr(got, want))
    return _summary(values, len(files), applied)
