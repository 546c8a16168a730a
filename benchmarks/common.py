"""What the benchmark scripts share: the machine's description, and peak CPU memory of a piece of work.

Peak memory uses Linux's /proc (NaN elsewhere).

The process's RSS high-water mark (VmHWM) is reset to the current RSS through ``/proc/self/clear_refs`` just before
the work, after freed heap is handed back to the OS (``malloc_trim``), so the peak reflects this work rather than
model creation or earlier steps. The "above rest" figure is that peak minus the RSS just before the work: the
work's own activations, gradients and temporaries. Allocations smaller than a few pages, or served from heap the
allocator kept, are not visible to it, so values under ~1 MiB are noise.

``imagenet_like_jpegs`` writes an ImageFolder tree of distinct ImageNet-sized JPEGs made from real photographs, for
the data loading benchmarks.
"""
import ctypes
import ctypes.util
import gc
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional, Tuple

import numpy as np
import torch

__all__ = ['imagenet_like_jpegs', 'machine', 'peak_rss_mib']

JPEG_SIZE = (500, 375)  # (width, height): the typical ImageNet photo
_MARKER = '.imagenet_like.json'  # hidden, so neither timm's reader nor datasets' imagefolder lists it


def _status_mib(key: str) -> float:
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(key + ':'))


def peak_rss_mib(work: Callable[[], object], repeats: int = 3) -> Tuple[float, float]:
    """(peak RSS, peak above the resting RSS) in MiB while calling ``work`` ``repeats`` times."""
    try:
        gc.collect()
        libc = ctypes.util.find_library('c')
        if libc:
            ctypes.CDLL(libc).malloc_trim(0)
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')  # resets VmHWM to the current RSS (Linux >= 4.0)
        rest = _status_mib('VmRSS')
    except (OSError, StopIteration, AttributeError):
        for _ in range(repeats):
            work()
        return float('nan'), float('nan')
    for _ in range(repeats):
        work()
    peak = _status_mib('VmHWM')
    return peak, peak - rest


def machine(device: Optional[torch.device] = None) -> str:
    """The GPU, or the CPU model, cores and threads, with the torch version: for a results file's header."""
    if device is not None and device.type == 'cuda':
        return f'{torch.cuda.get_device_name(device)}, torch {torch.__version__}'
    cpu = 'unknown CPU'
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    return f'{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}'


def imagenet_like_jpegs(folder: Path, count: int, classes: int = 10, seed: int = 0) -> Path:
    """An ImageFolder tree ``folder/class_k/img_i.jpg`` of ``count`` distinct 500x375 JPEGs (quality 90).

    Every image is a random 4:3 crop (30-100% of the largest one) of one of scikit-learn's two bundled photographs
    (china.jpg, flower.jpg, 640x427), resized to 500x375 (all landscape: one size, so an in-memory pipeline can hold
    them in one tensor), randomly flipped, brightened or darkened by up to 30% and given Gaussian noise (sigma 2-6
    grey levels), so no two files are alike. Image ``i`` is in class ``i % classes``. Deterministic from ``seed``;
    returns at once when ``folder`` already holds these files (a marker file records the settings).

    Args:
        folder: Root of the tree (created; class folders of other settings in it are replaced).
        count: Number of images.
        classes: Number of class folders.
        seed: Seed of every random draw.

    Returns:
        ``folder``.
    """
    from PIL import Image
    from sklearn.datasets import load_sample_images
    folder = Path(folder)
    settings = {'count': count, 'classes': classes, 'seed': seed, 'size': list(JPEG_SIZE), 'quality': 90, 'v': 1}
    marker = folder / _MARKER
    if marker.exists() and json.loads(marker.read_text()) == settings and \
            sum(1 for _ in folder.glob('class_*/img_*.jpg')) == count:
        return folder
    marker.unlink(missing_ok=True)
    for old in folder.glob('class_*'):
        shutil.rmtree(old)
    photos = [Image.fromarray(image) for image in load_sample_images().images]
    rng = np.random.default_rng(seed)
    width, height = JPEG_SIZE
    for k in range(classes):
        (folder / f'class_{k}').mkdir(parents=True, exist_ok=True)
    for i in range(count):
        photo = photos[rng.integers(len(photos))]
        max_w = min(photo.width, photo.height * width // height)
        crop_w = int(max_w * np.sqrt(rng.uniform(0.3, 1.0)))
        crop_h = crop_w * height // width
        left, top = rng.integers(photo.width - crop_w + 1), rng.integers(photo.height - crop_h + 1)
        image = photo.resize(JPEG_SIZE, Image.BILINEAR, box=(left, top, left + crop_w, top + crop_h))
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        pixels = np.asarray(image, dtype=np.float32) * rng.uniform(0.7, 1.3)
        pixels += rng.standard_normal(pixels.shape, dtype=np.float32) * rng.uniform(2.0, 6.0)
        Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8)).save(
            folder / f'class_{i % classes}' / f'img_{i:05d}.jpg', quality=90)
    marker.write_text(json.dumps(settings))
    return folder
