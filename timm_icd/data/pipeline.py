"""The input pipeline: uint8 images to normalised batches on the device, by one of two paths.

* ``loader``: DataLoader workers decode, crop, resize and flip each sample with timm's transforms (seeded per sample,
  see ``ImageClassificationDataset``; a JPEG decoded at a reduced DCT scale where the crop allows, ``decode.py``) and
  return uint8 tensors; the batch goes to the device as uint8 (a quarter of the float32 bytes; pinned memory and a
  non-blocking copy on GPU). On a GPU it gets timm's colour jitter there, batched (``BatchAugment.jitter``,
  per-sample draws hashed from (seed, epoch, row), the memory path's); on a CPU the workers keep timm's jitter,
  cheaper on uint8 PIL images than on float batches. Then the batch is normalised. Where nothing moved to the device
  this gives exactly the numbers of normalising in the workers: the same ``x / 255``, ``- mean``, ``/ std``.
* ``memory``: a dataset that fits in memory is decoded once into one uint8 tensor on the device; the loader yields
  only row indices and ``BatchAugment`` augments whole batches there. Per-sample Python work disappears, which is
  what decides epoch time at 28-32 px. The eval split is decoded once with timm's eval transform itself, so eval
  images are the loader path's to the bit.

A stream (``streaming.StreamLoader``) is the loader path's work on a pool of processes, its jitter drawn from each
sample's seed; with ``decode_device`` its JPEGs are decoded in batches on the device.

Either way the student normalisation happens once on the device; the teacher's normalisation is one fused affine
map from it (``ICDTeacher.prepare_input``). Random erasing runs on the normalised device batch (timm's
``RandomErasing``, as timm's prefetcher does), seeded per batch from (seed, epoch, step, rank) like Mixup, so resumed
runs erase exactly as uninterrupted ones.

timm's ``PrefetchLoader`` is not used: it reads one batch ahead of Accelerate's prepared loader, which would mark
the end of the loader one batch early for ``gather_for_metrics``, and its erasing draws from the unseeded global RNG.
"""
import contextlib
import logging
import random
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from timm.data.random_erasing import RandomErasing

from ..base import UserError
from .augment import AugmentConfig, BatchAugment, epoch_key, unsupported_reason
from .decode import DECODE_SCALES, collate_images, create_train_transform, device_decode_reason
from .sources import ImageClassificationDataset, ImageData
from .streaming import StreamLoader

_logger = logging.getLogger(__name__)

PIPELINES = ('auto', 'memory', 'loader')  # and 'stream', which a streamed dataset selects
MEMORY_LIMIT_BYTES = 4 << 30  # auto keeps a dataset in memory up to this many decoded bytes (train + eval)


def batch_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """Seed of one batch's random draws on the device (Mixup/CutMix, random erasing), a pure function of its place."""
    return int(np.random.SeedSequence([seed, epoch, step, rank]).generate_state(1)[0])


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device):
    """Seed Python's and the device's torch RNG for a block, then restore them (dropout draws as before)."""
    states = random.getstate(), torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if device.type == 'cuda' else None
    random.seed(seed)
    torch.default_generator.manual_seed(seed)
    if cuda_state is not None:
        torch.cuda.default_generators[device.index or 0].manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        torch.set_rng_state(states[1])
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)


class IndexDataset(torch.utils.data.Dataset):
    """(row index, label) pairs: what the loader yields when the images live in memory on the device."""

    def __init__(self, labels: Sequence[int]):
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Tuple[int, torch.Tensor]:
        return index, self.labels[index]

    def set_epoch(self, epoch: int) -> None:
        """Augmentation takes the epoch from the training loop; kept for the loader-path interface."""


class InputStage:
    """Turns a loader batch into a normalised float batch on the device.

    Args:
        mean, std: Normalisation (the student's).
        images: The split decoded in memory (N x C x H x W uint8); batches are then (row index, label).
        augment: Batched augmentation for in-memory training images.
        erasing: timm ``RandomErasing`` for the normalised batch.
        seed: Run seed (augmentation stream and erasing draws).
        jitter: Colour jitter for uint8 batches from workers (``BatchAugment.jitter``); they then are (images, labels,
            sample ids): dataset rows, or a stream's sample seeds.

    ``keep_unit``: keep each batch before normalisation ([0, 1]) in ``unit``, for a teacher cache's writer.
    """

    def __init__(
            self,
            mean: Sequence[float],
            std: Sequence[float],
            images: Optional[torch.Tensor] = None,
            augment: Optional[BatchAugment] = None,
            erasing: Optional[RandomErasing] = None,
            seed: int = 0,
            jitter: Optional[BatchAugment] = None,
    ):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.images, self.augment, self.erasing, self.seed, self.jitter = images, augment, erasing, seed, jitter
        self._key = (None, None)
        self.keep_unit, self.unit = False, None

    def _epoch_key(self, epoch: int) -> int:
        if self._key[0] != epoch:  # one host-side hash per epoch
            self._key = (epoch, epoch_key(self.seed, epoch))
        return self._key[1]

    def to(self, device: torch.device) -> 'InputStage':
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        if self.images is not None:
            self.images = self.images.to(device)
        if self.erasing is not None:
            self.erasing.device = device
        return self

    def __call__(self, batch, epoch: int = 0, step: int = 0, rank: int = 0) -> Tuple[torch.Tensor, Any]:
        data, target = batch[0], batch[1]
        if self.images is None:  # a prepared loader has moved the batch already; a stream has not
            x = data.to(self.mean.device, non_blocking=True).float().div_(255)
            target = target.to(self.mean.device, non_blocking=True) if torch.is_tensor(target) else target
            if self.jitter is not None:
                x = self.jitter.jitter(x, batch[2], self._epoch_key(epoch))
        else:
            index = data.to(self.images.device)
            x = self.images[index]
            if self.augment is not None:
                x = self.augment(x, index, self._epoch_key(epoch))
            else:
                x = x.float().div_(255)
        self.unit = x if self.keep_unit else None  # for a teacher that normalises the batch its own way
        x = x.sub_(self.mean).div_(self.std) if x.is_contiguous() and not self.keep_unit else (x - self.mean) / self.std
        if self.erasing is not None:
            with seeded_rng(batch_seed(self.seed + 1, epoch, step, rank), x.device):
                x = self.erasing(x)
        return x, target


@dataclass
class Pipeline:
    """The loaders and the device stages that finish their batches."""
    kind: str
    train_loader: torch.utils.data.DataLoader
    eval_loader: torch.utils.data.DataLoader
    train_stage: InputStage
    eval_stage: InputStage
    description: str
    views: dict = field(default_factory=dict)  # settings beyond the augmentation flags that decide each sample's view

    def to(self, device: torch.device) -> 'Pipeline':
        self.train_stage.to(device)
        self.eval_stage.to(device)
        return self


def _decode(ds, image_column: str, transform: Optional[Callable], split: str, workers: int,
            limit: Optional[int]) -> Optional[torch.Tensor]:
    """A whole split as one uint8 N x C x H x W tensor, or None when its images differ in size or exceed ``limit``.

    Greyscale splits stay one channel (expanded to three on the device); any other mode becomes RGB.
    """
    def to_array(image) -> np.ndarray:
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image))
        if transform is not None:
            return np.asarray(transform(image.convert('RGB')))  # CHW uint8 from timm's uint8 eval transform
        if image.mode not in ('L', 'RGB'):
            image = image.convert('RGB')
        array = np.asarray(image)
        return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)

    rows = ImageClassificationDataset(ds, image_column, None, transform=None, split_name=split, rgb=False)
    loader = torch.utils.data.DataLoader(rows, batch_size=512, num_workers=min(workers, 4),
                                         collate_fn=lambda items: [to_array(image) for image, _ in items])
    out, shape = None, None
    for start, arrays in zip(range(0, len(rows), 512), loader):
        for offset, array in enumerate(arrays):
            if out is None:
                shape = array.shape
                if limit is not None and len(rows) * array.size > limit:
                    return None
                out = torch.empty((len(rows), *shape), dtype=torch.uint8)
            if array.shape != shape:
                if array.shape[1:] == shape[1:] and transform is None:  # greyscale and colour rows: all RGB
                    out = out.expand(-1, 3, -1, -1).contiguous() if out.shape[1] == 1 else out
                    shape = out.shape[1:]
                    array = np.broadcast_to(array, shape)
                else:
                    return None
            out[start + offset] = torch.from_numpy(np.array(array))  # a writable copy
    return out


def _erasing(augment: AugmentConfig) -> Optional[RandomErasing]:
    if augment.reprob <= 0:
        return None
    return RandomErasing(augment.reprob, mode=augment.remode, max_count=augment.recount, device='cpu')


def _per_sample(data_config: dict, augment: AugmentConfig, decode_scale: str, jitter_on_device: Optional[bool],
                decode_device: Optional[str] = None):
    """The per-sample paths' train transform, their device jitter (or None), what decides the views, and the log's
    words for the decoding and the jitter."""
    if decode_scale not in DECODE_SCALES:
        raise UserError(f"decode scale {decode_scale!r} is not one of {', '.join(DECODE_SCALES)}.")
    if decode_device is not None:  # the device decodes, crops and flips: the jitter follows it there
        jitter_on_device = True
    jitter_on_device = torch.cuda.is_available() if jitter_on_device is None else jitter_on_device
    cj = augment.applied_color_jitter() if jitter_on_device else 0.0
    transform = create_train_transform(data_config, augment, decode_scale, jitter_in_workers=not jitter_on_device)
    jitter = BatchAugment(data_config['input_size'][1:], color_jitter=cj) if cj > 0 else None
    # named only where the views differ from what earlier versions made (full decoding, jitter in the workers), so
    # a teacher cache they wrote stays valid for runs that ask for the same (--decode-scale off on a CPU)
    views = {**({'decode_scale': 'auto'} if decode_scale == 'auto' else {}),
             **({'color_jitter_on': 'device'} if jitter is not None else {})}
    words = 'decode: ' + ('JPEGs at 1/2, 1/4 or 1/8 scale where the crop is shrunk 2x or more, else in full'
                          if decode_scale == 'auto' else 'in full')
    if decode_device is not None:
        views['decode_device'] = decode_device
        words = f'decode: RGB JPEGs in batches on {decode_device} (torchvision), other images by the workers'
    if augment.applied_color_jitter() > 0:
        words += f"; colour jitter {'on the device' if jitter is not None else 'in the workers'}"
    return transform, jitter, views, words


@dataclass(frozen=True)
class PipelineConfig:
    """How the input pipeline batches the data (``create_pipeline``): the data section of a run's config
    (``run.config.DataConfig.pipeline``); the defaults are the Python API's.

    Attributes:
        kind: 'auto', 'memory' or 'loader' (a streamed dataset always takes 'stream').
        batch_size, eval_batch_size: Per process; eval defaults to the train batch size.
        workers: Loader (or stream decoding) processes.
        seed: Data seed: shuffling and every sample's augmentation.
        with_index: Loader batches also carry each sample's row (what a teacher cache keys on).
        shuffle_buffer, grad_accum_steps: For a stream (rows permuted together; whole accumulation cycles).
        rank, world: This process and the number of processes (streams split by process).
        skip_bad_images: A stream skips images it cannot decode (a map-style split is cleaned before:
            ``sources.find_bad_images``).
        decode_scale: Per-sample paths: 'auto' decodes a JPEG at 1/2, 1/4 or 1/8 scale when its random crop is
            shrunk by that much or more (``decode.ReducedDecodeCrop``); 'off' decodes every image in full.
        decode_device: A stream's train JPEGs are decoded in batches on this device ('cuda'; 'cpu' runs the same
            logic on the CPU); None: by the workers (``decode.decode_on_device``).
        jitter_on_device: Per-sample paths: timm's colour jitter runs on the device batch (``BatchAugment.jitter``),
            not in the workers (PIL's, as timm). None: on the device when it is a GPU (``torch.cuda.is_available``)
            or when it decodes the JPEGs (``decode_device``). On a CPU the "device" is the main process, where the
            float jitter of whole 224 px batches costs more CPU time than PIL's uint8 jitter in the workers, and
            runs in one process (``benchmarks/data_throughput.py`` measures both).
    """
    kind: str = 'auto'
    batch_size: int = 64
    eval_batch_size: Optional[int] = None
    workers: int = 0
    seed: int = 0
    with_index: bool = False
    shuffle_buffer: int = 4096
    grad_accum_steps: int = 1
    rank: int = 0
    world: int = 1
    skip_bad_images: bool = False
    decode_scale: str = 'auto'
    decode_device: Optional[str] = None
    jitter_on_device: Optional[bool] = None


def create_stream_pipeline(data: ImageData, data_config: dict, augment: AugmentConfig,
                           config: PipelineConfig) -> Pipeline:
    """Streamed train and eval batches (``streaming.StreamLoader``) for process ``config.rank`` of ``config.world``."""
    c = config
    batch_size, world, workers, seed, shuffle_buffer = c.batch_size, c.world, c.workers, c.seed, c.shuffle_buffer
    steps = data.train_rows // (world * batch_size)
    steps -= steps % c.grad_accum_steps  # whole accumulation cycles: the stream loader does not end them early
    if steps < 1:
        raise UserError(f"split '{data.train_split}' streams {data.train_rows} rows: too few for one step of "
                        f"--batch-size {batch_size} on {world} processes; lower it.")
    reason = device_decode_reason(augment) if c.decode_device is not None else None
    if reason:
        raise UserError(f'--decode-device {c.decode_device} crops and flips on the device and cannot apply {reason}.')
    mean, std = data_config['mean'], data_config['std']
    columns = (data.image_column, data.label_column, data.num_classes)
    transform, jitter, views, words = _per_sample(data_config, augment, c.decode_scale, c.jitter_on_device,
                                                  c.decode_device)
    train = StreamLoader(data.train, *columns, transform, batch_size, steps, seed, c.rank, world, shuffle_buffer,
                         workers, data.train_split, c.skip_bad_images, c.decode_device, with_ids=jitter is not None)
    eval_loader = StreamLoader(data.eval, *columns, create_transform(**data_config, is_training=False,
                               use_prefetcher=True), c.eval_batch_size or batch_size, None,
                               seed, c.rank, world, None, workers, data.eval_split, c.skip_bad_images)
    return Pipeline('stream', train, eval_loader, InputStage(mean, std, erasing=_erasing(augment), seed=seed,
                                                             jitter=jitter),
                    InputStage(mean, std), f'stream ({steps} steps of {batch_size} per process and epoch from '
                    f'{data.train_rows} rows; shuffled in blocks of {shuffle_buffer}; {workers} decoding '
                    f'workers per process; {words})', views)


def create_pipeline(data: ImageData, data_config: dict, augment: AugmentConfig = AugmentConfig(),
                    config: Optional[PipelineConfig] = None, **settings: Any) -> Pipeline:
    """Train and eval loaders and their device stages.

    ``kind='auto'`` keeps the data in memory when the augmentation is one ``BatchAugment`` does and the decoded
    splits (all images of one size) fit in ``MEMORY_LIMIT_BYTES``; otherwise it uses the per-sample loader
    (``'loader'``); ``'memory'`` insists on the first. The train loader shuffles and drops the last partial batch; its
    generator is private, so creating an iterator never draws from the global RNG (which dropout uses and checkpoints
    restore). A streamed dataset (``data.streaming``) takes ``create_stream_pipeline``.

    Args:
        data: The splits (``sources.load_image_data`` or ``streaming.load_stream_data``).
        data_config: timm's data config of the student (input_size, mean, std, interpolation, crop).
        augment: timm's augmentation flags.
        config: How to batch them (``PipelineConfig``; its defaults where None).
        **settings: ``PipelineConfig`` fields that replace ``config``'s (the Python API's keyword form:
            ``create_pipeline(data, data_config, kind='loader', batch_size=16)``).
    """
    c = replace(config or PipelineConfig(), **settings)
    if data.streaming:
        return create_stream_pipeline(data, data_config, augment, c)
    kind, batch_size, workers, seed, decode_device = c.kind, c.batch_size, c.workers, c.seed, c.decode_device
    if decode_device is not None:
        raise UserError(f'--decode-device {decode_device} decodes streamed batches: add --streaming (the loader '
                        f'path decodes in its workers).')
    if len(data.train) < batch_size:
        raise UserError(f"--batch-size {batch_size} is larger than the {len(data.train)} rows of split "
                        f"'{data.train_split}': lower it.")
    mean, std = data_config['mean'], data_config['std']
    erasing = _erasing(augment)
    eval_tf = create_transform(**data_config, is_training=False, use_prefetcher=True)
    common = dict(num_workers=workers, pin_memory=torch.cuda.is_available(), collate_fn=collate_images)
    eval_batch = c.eval_batch_size or batch_size

    if kind in ('auto', 'memory'):
        reason = unsupported_reason(augment)
        if reason and kind == 'memory':
            raise UserError(f'--input-pipeline memory cannot apply {reason}; use --input-pipeline loader.')
        limit = MEMORY_LIMIT_BYTES if kind == 'auto' else None
        train_images = None if reason else _decode(data.train, data.image_column, None, data.train_split,
                                                   workers, limit)
        eval_images = None if train_images is None else _decode(
            data.eval, data.image_column, eval_tf, data.eval_split, workers, limit)
        if train_images is None or eval_images is None:
            if kind == 'memory':
                raise UserError(f"--input-pipeline memory needs images of one size in split '{data.train_split}'"
                                f" that fit in memory; use --input-pipeline loader.")
            _logger.info(f'Input pipeline: loader ({reason or "images differ in size or exceed the memory limit"}).')
        else:
            no_aug = augment.no_aug
            batch_augment = BatchAugment(
                data_config['input_size'][1:], scale=augment.scale, ratio=augment.ratio,
                hflip=0.0 if no_aug else augment.hflip, vflip=0.0 if no_aug else augment.vflip,
                color_jitter=0.0 if no_aug else augment.color_jitter,
                interpolation='bilinear' if no_aug else augment.train_interpolation, crop=not no_aug)
            labels = (np.asarray(data.train[data.label_column]), np.asarray(data.eval[data.label_column]))
            train_loader = torch.utils.data.DataLoader(
                IndexDataset(labels[0]), batch_size=batch_size, shuffle=True, drop_last=True,
                generator=torch.Generator().manual_seed(seed))
            eval_loader = torch.utils.data.DataLoader(IndexDataset(labels[1]), batch_size=eval_batch)
            size = (train_images.numel() + eval_images.numel()) / 2 ** 20
            return Pipeline(
                'memory', train_loader, eval_loader,
                InputStage(mean, std, train_images, batch_augment, erasing, seed), InputStage(mean, std, eval_images),
                f'memory ({len(train_images)} train and {len(eval_images)} eval images decoded once, {size:.1f} MiB; '
                f'augmented in batches on the device)')

    transform, jitter, views, words = _per_sample(data_config, augment, c.decode_scale, c.jitter_on_device)
    train_set = ImageClassificationDataset(data.train, data.image_column, data.label_column, transform, seed=seed,
                                           split_name=data.train_split, with_index=c.with_index or jitter is not None)
    eval_set = ImageClassificationDataset(data.eval, data.image_column, data.label_column, eval_tf,
                                          split_name=data.eval_split)
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=batch_size, shuffle=True, drop_last=True,
        generator=torch.Generator().manual_seed(seed), **common)
    eval_loader = torch.utils.data.DataLoader(
        eval_set, batch_size=eval_batch, shuffle=False, generator=torch.Generator().manual_seed(seed), **common)
    return Pipeline('loader', train_loader, eval_loader, InputStage(mean, std, erasing=erasing, seed=seed,
                                                                    jitter=jitter),
                    InputStage(mean, std), f'loader ({workers} workers per process; {words}; uint8 batches '
                                           f'normalised on the device)', views)
