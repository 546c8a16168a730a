"""What the benchmark scripts share: the machine, peak CPU memory of a piece of work, JPEG trees and Fashion-MNIST.

Peak memory uses Linux's /proc (NaN elsewhere).

The process's RSS high-water mark (VmHWM) is reset to the current RSS through ``/proc/self/clear_refs`` just before
the work, after freed heap is handed back to the OS (``malloc_trim``), so the peak reflects this work rather than
model creation or earlier steps. The "above rest" figure is that peak minus the RSS just before the work: the
work's own activations, gradients and temporaries. Allocations smaller than a few pages, or served from heap the
allocator kept, are not visible to it, so values under ~1 MiB are noise.

``imagenet_like_jpegs`` writes an ImageFolder tree of distinct ImageNet-sized JPEGs made from real photographs, for
the data loading benchmarks; ``realistic_jpegs`` one with a mix of sizes and a tail of large photographs.

Fashion-MNIST, for the studies and the quality measurements: ``fashion_mnist`` (Debian's IDX files, converted once),
``subset`` (stratified, relabelled, disjoint from rows held out), ``fashion_subset`` (one, saved), ``append_csv`` (one
results row at a time, so an interrupted benchmark resumes) and ``paired_rows`` (paired differences by seed of result
rows, with ``timm_icd.publish.stats.paired``).
"""
import csv
import ctypes
import ctypes.util
import gc
import gzip
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import datasets
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this repository's timm_icd, for every script
from timm_icd.publish.stats import paired  # noqa: E402

__all__ = ['LABELS', 'append_csv', 'fashion_mnist', 'fashion_subset', 'imagenet_like_jpegs', 'machine',
           'paired_rows', 'peak_rss_mib', 'realistic_jpegs', 'subset']

JPEG_SIZE = (500, 375)  # (width, height): the typical ImageNet photo
# realistic_jpegs: (width, height, share) of the bulk, and the tail's share and long-side range (see its docstring)
BULK_SIZES = ((500, 375, 0.40), (375, 500, 0.20), (500, 333, 0.15), (333, 500, 0.05), (500, 500, 0.05),
              (400, 300, 0.05))
TAIL_SHARE, TAIL_LONG_SIDE = 0.10, (1000, 3000)
_MARKER = '.imagenet_like.json'  # hidden, so neither timm's reader nor datasets' imagefolder lists it
FASHION_MNIST_IDX = Path('/usr/share/datasets/fashion-mnist')  # Debian's dataset-fashion-mnist
LABELS = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot']


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


# ----------------------------------------------------------------------------------------------------- Fashion-MNIST

def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path) as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def fashion_mnist(data_dir: Path) -> datasets.DatasetDict:
    """Fashion-MNIST as a DatasetDict (train 60,000 / test 10,000), converted once from Debian's IDX files into
    ``data_dir/fashion_mnist`` (online, zalando-datasets/fashion_mnist on the Hub is the same data)."""
    folder = data_dir / 'fashion_mnist'
    if (folder / 'dataset_dict.json').exists():
        return datasets.load_from_disk(str(folder))
    if not FASHION_MNIST_IDX.is_dir():
        raise SystemExit(f'{FASHION_MNIST_IDX} is missing: apt-get install dataset-fashion-mnist '
                         f'(or save zalando-datasets/fashion_mnist from the Hub to {folder}).')
    features = datasets.Features({'image': datasets.Image(), 'label': datasets.ClassLabel(names=LABELS)})
    splits = {}
    for split, prefix in (('train', 'train'), ('test', 't10k')):
        images = _read_idx(FASHION_MNIST_IDX / f'{prefix}-images-idx3-ubyte.gz')
        labels = _read_idx(FASHION_MNIST_IDX / f'{prefix}-labels-idx1-ubyte.gz')
        splits[split] = datasets.Dataset.from_dict({'image': list(images), 'label': labels.tolist()},
                                                   features=features)
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    return datasets.load_from_disk(str(folder))


def subset(ds: datasets.Dataset, per_class: int, classes: Sequence[int] = tuple(range(len(LABELS))), seed: int = 0,
           exclude: Optional[np.ndarray] = None) -> Tuple[datasets.Dataset, np.ndarray]:
    """``per_class`` rows of each of ``classes`` (0: all of them), never a row of ``exclude``, relabelled
    0..len(classes)-1; and the chosen row indices (sorted). The rows are drawn from ``seed`` alone.

    Args:
        ds: A Fashion-MNIST split (``label`` a ClassLabel of ``LABELS``).
        per_class: Rows per class; 0 keeps every row of the class.
        classes: The classes kept, in their new label order.
        seed: Seed of the draw.
        exclude: Row indices never chosen (a validation split held out of the training rows).
    """
    labels = np.asarray(ds['label'])
    rng = np.random.default_rng(seed)
    allowed = np.ones(len(labels), dtype=bool)
    if exclude is not None:
        allowed[exclude] = False
    idx = np.sort(np.concatenate([rng.permutation(np.flatnonzero((labels == c) & allowed))[:per_class or None]
                                  for c in classes]))
    out = ds.select(idx)
    if tuple(classes) != tuple(range(len(LABELS))):
        remap = {c: i for i, c in enumerate(classes)}
        out = out.map(lambda r: {'label': remap[r['label']]}, features=datasets.Features(
            {'image': datasets.Image(), 'label': datasets.ClassLabel(names=[LABELS[c] for c in classes])}))
    return out, idx


def fashion_subset(data_dir: Path, train: int, test: int) -> str:
    """A stratified Fashion-MNIST subset of ``train`` and ``test`` rows as a save_to_disk folder, made once."""
    folder = data_dir / f'fashion_mnist_{train}_{test}'
    if not (folder / 'dataset_dict.json').exists():
        dd = fashion_mnist(data_dir)
        datasets.DatasetDict(train=subset(dd['train'], train // 10)[0],
                             test=subset(dd['test'], test // 10)[0]).save_to_disk(str(folder))
    return str(folder)


def append_csv(path: Path, fields: List[str], row: dict) -> None:
    """Append ``row`` to the CSV at ``path`` (its header first when the file is new)."""
    new = not path.exists()
    with open(path, 'a', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerow(row)


def paired_rows(rows: List[dict], a: str, b: str, value: str = 'test_top1', arm: str = 'method') -> Optional[Dict]:
    """The paired difference ``a - b`` of result rows by seed (``timm_icd.publish.stats.paired``: mean, 95%
    t-interval ``low``/``high``, ``n``, t-test ``p``, ...), or None with fewer than 2 seeds.

    Args:
        rows: Result rows with ``seed``, the arm's name under ``arm`` and a number under ``value``.
        a, b: The two arms.
    """
    by_arm: Dict[str, Dict[int, float]] = {a: {}, b: {}}
    for r in rows:
        if r[arm] in by_arm:
            by_arm[r[arm]][int(r['seed'])] = float(r[value])
    result = paired(by_arm[a], by_arm[b])
    return result if result['n'] >= 2 else None
