"""What the benchmark scripts share: the machine's description, and peak CPU memory of a piece of work.

Peak memory uses Linux's /proc (NaN elsewhere).

The process's RSS high-water mark (VmHWM) is reset to the current RSS through ``/proc/self/clear_refs`` just before
the work, after freed heap is handed back to the OS (``malloc_trim``), so the peak reflects this work rather than
model creation or earlier steps. The "above rest" figure is that peak minus the RSS just before the work: the
work's own activations, gradients and temporaries. Allocations smaller than a few pages, or served from heap the
allocator kept, are not visible to it, so values under ~1 MiB are noise.

``imagenet_like_jpegs`` writes an ImageFolder tree of distinct ImageNet-sized JPEGs made from real photographs, for
the data loading benchmarks; ``realistic_jpegs`` one with a mix of sizes and a tail of large photographs.
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

__all__ = ['imagenet_like_jpegs', 'machine', 'peak_rss_mib', 'realistic_jpegs']

JPEG_SIZE = (500, 375)  # (width, height): the typical ImageNet photo
# realistic_jpegs: (width, height, share) of the bulk, and the tail's share and long-side range (see its docstring)
BULK_SIZES = ((500, 375, 0.40), (375, 500, 0.20), (500, 333, 0.15), (333, 500, 0.05), (500, 500, 0.05),
              (400, 300, 0.05))
TAIL_SHARE, TAIL_LONG_SIDE = 0.10, (1000, 3000)
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
    settings = {'count': count, 'classes': classes, 'seed': seed, 'size': list(JPEG_SIZE), 'quality': 90, 'v': 1}
    rng = np.random.default_rng(seed)
    return _write_tree(Path(folder), [JPEG_SIZE] * count, classes, rng, settings)


def realistic_jpegs(folder: Path, count: int, classes: int = 10, seed: int = 0) -> Path:
    """An ImageFolder tree ``folder/class_k/img_i.jpg`` of ``count`` distinct JPEGs (quality 90) in a mix of sizes.

    ImageNet's training photographs average about 469x387 px; most are at most 500 px on the long side and a long
    tail is much larger. This set has that shape, not ImageNet's measured proportions (it does not claim them): 90%
    of the images in ``BULK_SIZES`` (500x375, 375x500, 500x333, 333x500, 500x500, 400x300), 10% (``TAIL_SHARE``)
    large photographs whose long side is log-uniform in 1000-3000 px, 4:3 or 3:2, 70% landscape. Its tail is
    heavier than ImageNet's can be (its mean size is about 580x470 px, above ImageNet's average): what the levers for
    large photographs (``--max-size``, reduced decoding) gain on it is more than ImageNet would show, and the 500x375
    set shows the other end. The tail holds most of the pixels, which decide decoding cost. The images are made like
    ``imagenet_like_jpegs``' (crops of two real photographs of 640x427 px, so the large ones are enlarged; their
    noise of sigma 2-6 grey levels keeps their files far from the smooth, small files of a plain enlargement).
    Sizes are drawn per image from ``seed``; returns at once when ``folder`` already holds these files.
    """
    settings = {'count': count, 'classes': classes, 'seed': seed, 'bulk': [list(b) for b in BULK_SIZES],
                'tail': [TAIL_SHARE, *TAIL_LONG_SIDE], 'quality': 90, 'v': 1}
    rng = np.random.default_rng(seed)
    sizes, bulk = [], np.array([b[2] for b in BULK_SIZES]) / sum(b[2] for b in BULK_SIZES)
    for _ in range(count):
        if rng.random() < TAIL_SHARE:
            long_side = int(np.exp(rng.uniform(*np.log(TAIL_LONG_SIDE))))
            short_side = round(long_side / (4 / 3 if rng.random() < 0.5 else 3 / 2))
            sizes.append((long_side, short_side) if rng.random() < 0.7 else (short_side, long_side))
        else:
            sizes.append(BULK_SIZES[rng.choice(len(BULK_SIZES), p=bulk)][:2])
    return _write_tree(Path(folder), sizes, classes, rng, settings)


def _write_tree(folder: Path, sizes: list, classes: int, rng: np.random.Generator, settings: dict) -> Path:
    """Write ``folder/class_{i % classes}/img_{i:05d}.jpg`` of ``sizes[i]`` (see ``imagenet_like_jpegs``), unless a
    marker with ``settings`` says it is there."""
    from PIL import Image
    from sklearn.datasets import load_sample_images
    marker = folder / _MARKER
    if marker.exists() and json.loads(marker.read_text()) == settings and \
            sum(1 for _ in folder.glob('class_*/img_*.jpg')) == len(sizes):
        return folder
    marker.unlink(missing_ok=True)
    for old in folder.glob('class_*'):
        shutil.rmtree(old)
    photos = [Image.fromarray(image) for image in load_sample_images().images]
    for k in range(classes):
        (folder / f'class_{k}').mkdir(parents=True, exist_ok=True)
    for i, (width, height) in enumerate(sizes):
        photo = photos[rng.integers(len(photos))]
        max_w = min(photo.width, photo.height * width // height)
        crop_w = int(max_w * np.sqrt(rng.uniform(0.3, 1.0)))
        crop_h = crop_w * height // width
        left, top = rng.integers(photo.width - crop_w + 1), rng.integers(photo.height - crop_h + 1)
        image = photo.resize((width, height), Image.BILINEAR, box=(left, top, left + crop_w, top + crop_h))
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        pixels = np.asarray(image, dtype=np.float32) * rng.uniform(0.7, 1.3)
        pixels += rng.standard_normal(pixels.shape, dtype=np.float32) * rng.uniform(2.0, 6.0)
        Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8)).save(
            folder / f'class_{i % classes}' / f'img_{i:05d}.jpg', quality=90)
    marker.write_text(json.dumps(settings))
    return folder
