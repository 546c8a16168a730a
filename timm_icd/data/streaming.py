"""Streamed training and eval batches (``--streaming``), resumable mid-epoch to the sample.

A split is a ``datasets.IterableDataset`` (Hub ``hfids/`` ids, local ``webdataset:``/``parquet:`` shards, or any
map-style source through ``to_iterable_dataset``). Each process reads its own part
(``datasets.distributed.split_dataset_by_node``); the shard order is reshuffled every epoch by ``datasets``.

Sample shuffling is done here, not by ``datasets.IterableDataset.shuffle(buffer_size)``: datasets' buffer loses its
contents on ``load_state_dict`` (its docs say so), so a resumed run would skip up to a buffer of samples. Instead the
stream is cut into blocks of ``--shuffle-buffer`` rows, each block permuted by a seed of (seed, epoch, rank, pass,
block). The position of the next sample is (pass, block, datasets state at the block's start, offset in the block),
so a resume re-reads at most one block of undecoded rows and continues with exactly the samples an uninterrupted run
would have used.

Rows are read undecoded in the main process (cheap: bytes) and decoded and augmented in a pool of worker processes,
one batch per task, results taken in submission order. Every sample's augmentation is seeded by (seed, epoch, rank,
its position in the process's epoch stream), so the batches do not depend on the number of workers. With
``decode_device`` (``--decode-device cuda``) the workers only read each JPEG's header and draw its crop and flips;
the main process decodes the batch on the device (``decode.py``).

Each process trains the same number of steps per epoch, ``train_num_samples // (processes * batch_size)``; a process
whose part of the stream is shorter starts it again (next pass), one with a longer part leaves the rest for later
epochs. With parts of equal size (equal shards, or ``datasets``' example-wise split) every sample is used exactly
once per epoch across the processes.
"""
import logging
import os
import tarfile
from collections import deque
from itertools import islice
from functools import partial
from typing import Any, Callable, Iterator, List, Optional, Tuple

import datasets
import numpy as np
import pyarrow.parquet as pq
import torch
from datasets.distributed import split_dataset_by_node

from ..base import UserError, first_line
from .decode import DeviceJpeg, decode_on_device, draw_crop, open_image, read_bytes, reducible, stack_images
from .integrity import shards_metadata
from .sources import (
    EVAL_SPLITS, IMAGE_COLUMNS, LABEL_COLUMNS, ImageData, _builder_kwargs, _detect_column, _to_rgb, load_dataset_dict,
    seeded_transform)

_logger = logging.getLogger(__name__)

# datasets warns that a shuffle buffer's rows are lost on load_state_dict; the one-row buffer that shuffles the shard
# order here never holds a row at a block's start, so nothing is lost
logging.getLogger('datasets.iterable_dataset').addFilter(lambda record: 'shuffle buffer' not in record.getMessage())


def _where(row: dict) -> str:
    """' (shard FILE, sample KEY)' for a webdataset row, else ''."""
    url, key = row.get('__url__'), row.get('__key__')
    return f' (shard {url}, sample {key})' if url or key else ''


def _sample(value: Any, seed: Optional[int], transform: Callable, device_decode: bool, where: str):
    """One sample: timm's transform of the image (seeded by ``seed``), or for the device an RGB JPEG's bytes and
    draws (``decode.DeviceJpeg``). Raises ``_Unreadable`` for an image that cannot be opened or decoded."""
    try:
        data = read_bytes(value) if isinstance(value, dict) else None
        image = _to_rgb(open_image({'bytes': data, 'path': None} if data is not None else value))
    except Exception as e:
        raise _Unreadable(first_line(e, 200)) from e
    try:
        if device_decode and reducible(image):
            draw = partial(draw_crop, transform)
            return DeviceJpeg(data, draw(image) if seed is None else seeded_transform(draw, image, seed), where)
        return transform(image) if seed is None else seeded_transform(transform, image, seed)
    except OSError as e:  # PIL decodes the pixels in the transform: a damaged file fails there
        raise _Unreadable(first_line(e, 200)) from e


class _Unreadable(Exception):
    """An image that cannot be opened or decoded."""


def _decode_batch(rows: List[dict], seeds: Optional[List[int]], transform: Callable, image_column: str,
                  label_column: str, num_classes: int, split: str, skip_bad: bool = False,
                  device_decode: bool = False) -> Tuple[Any, torch.Tensor, Optional[torch.Tensor], List[str]]:
    """Decode, transform and stack one batch of undecoded rows (runs in a pool worker, or inline with -j 0).

    Returns the images (with ``device_decode`` a list in which RGB JPEGs are left undecoded, ``decode.DeviceJpeg``),
    the labels, the seeds of the samples kept (train), and where each image skipped as unreadable came from
    (``skip_bad``).
    """
    images, labels, kept, skipped = [], [], [], []
    for i, row in enumerate(rows):
        label = row[label_column]
        if not isinstance(label, (int, np.integer)) or not 0 <= label < num_classes:
            raise UserError(f"split '{split}' holds label {label!r}{_where(row)}, outside 0..{num_classes - 1}; fix "
                            f"the labels, the label column or --num-classes.")
        seed = None if seeds is None else seeds[i]
        try:
            images.append(_sample(row[image_column], seed, transform, device_decode, _where(row)))
        except _Unreadable as e:
            if skip_bad:
                skipped.append(_where(row).strip(' ()') or f'a row of split {split!r}')
                continue
            raise UserError(f"cannot decode an image of split '{split}'{_where(row)} ({e}); fix or remove it in the "
                            f"shards, or pass --skip-bad-images to skip such images.") from e
        labels.append(int(label))
        kept.append(seed)
    if not images:
        raise UserError(f"every image of a batch of split '{split}' is unreadable (from {skipped[0]}): the shards are "
                        f"damaged beyond skipping; write them again.")
    return (images if device_decode else stack_images(images), torch.tensor(labels, dtype=torch.int64),
            None if seeds is None else torch.tensor(kept, dtype=torch.int64), skipped)


class _InlinePool:
    """The pool's ``apply_async`` run at once in this process (``--workers 0``)."""

    class _Done:
        def __init__(self, value):
            self.value = value

        def get(self):
            return self.value

    def apply_async(self, fn, args):
        return self._Done(fn(*args))


_POOLS = {}


def _pool(workers: int):
    """The process's decoding pool of ``workers`` processes, started once and shared by the train and eval streams.

    Spawned, not forked: forking a process whose torch already runs threads can deadlock the child.
    """
    if workers not in _POOLS:
        _POOLS[workers] = _InlinePool() if workers == 0 else torch.multiprocessing.get_context('spawn').Pool(
            workers, initializer=torch.set_num_threads, initargs=(1,))  # as DataLoader workers: one thread each
    return _POOLS[workers]


class StreamLoader:
    """Batches of uint8 images and labels from one process's part of a streamed split.

    Args:
        source: The split as an ``IterableDataset``, image column not decoded (``Image(decode=False)``).
        image_column, label_column: Its columns.
        num_classes: For the label check.
        transform: timm transform ending in a uint8 tensor.
        batch_size: Samples per batch.
        steps: Batches per epoch (train); None streams the split once and keeps the last partial batch (eval).
        seed: Data seed (shard order, block permutations, augmentation).
        rank, world: This process and the number of processes.
        shuffle_buffer: Rows per permuted block (0 or 1: stream order); None for eval.
        workers: Decoding processes (0 decodes in this process).
        split: Split name for messages.
        skip_bad: Skip images that cannot be decoded (each named in a warning, counted in ``skipped``); the batch
            that held them is that much smaller, the number of batches unchanged.
        decode_device: Decode RGB JPEGs in batches on this device (``decode.decode_on_device``; the transform must
            be crop and flips, ``decode.device_decode_reason``); None: the workers decode every image with PIL.
        with_ids: Batches are (images, labels, sample seeds): the seeds the device's colour jitter draws from.
    """

    def __init__(self, source: datasets.IterableDataset, image_column: str, label_column: str, num_classes: int,
                 transform: Callable, batch_size: int, steps: Optional[int], seed: int, rank: int, world: int,
                 shuffle_buffer: Optional[int], workers: int, split: str, skip_bad: bool = False,
                 decode_device: Optional[str] = None, with_ids: bool = False):
        self.source, self.image_column, self.label_column = source, image_column, label_column
        self.decode_device, self.with_ids = decode_device, with_ids
        self.num_classes, self.transform, self.batch_size, self.steps = num_classes, transform, batch_size, steps
        self.seed, self.rank, self.world, self.workers, self.split = seed, rank, world, workers, split
        self.train, self.skip_bad, self.skipped = steps is not None, skip_bad, 0
        self.block = max(shuffle_buffer or 1, 1)
        self.epoch = 0
        self.position = None  # where the next batch starts, after the last one yielded; None: the epoch's start
        self._resume = None
        self.dataset = self  # what the training loop calls set_epoch on for map-style loaders

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_from(self, position: Optional[list]) -> None:
        """Start the next iteration at a position saved with a checkpoint (``position`` after some batch)."""
        self._resume = position

    def _source(self, epoch: int, pass_index: int) -> datasets.IterableDataset:
        ds = self.source
        if self.train:  # shard order: a new draw per epoch (datasets' set_epoch) and per pass
            ds = ds.shuffle(seed=(self.seed + 1_000_003 * pass_index) % 2 ** 32, buffer_size=1)
        ds = split_dataset_by_node(ds, rank=self.rank, world_size=self.world) if self.world > 1 else ds
        ds.set_epoch(epoch)
        return ds

    def _rows(self, epoch: int, start: Optional[list]) -> Iterator[Tuple[dict, list]]:
        """Undecoded rows of this process's epoch stream, each with the position just after it."""
        pass_index, block_index, block_state, offset, ordinal = start or (0, 0, None, 0, 0)
        while True:
            ds = self._source(epoch, pass_index)
            if block_state is not None:
                ds.load_state_dict(block_state)
            iterator, read_any = iter(ds), False
            while True:
                block_state = ds.state_dict()
                try:
                    rows = list(islice(iterator, self.block))
                except Exception as e:  # datasets reading a damaged file (pyarrow, tarfile): name where it stopped
                    raise UserError(f"cannot read split '{self.split}' after {ordinal} rows of process {self.rank}'s "
                                    f"part ({first_line(e, 200)}): a damaged shard; write the shards again "
                                    f"(python -m timm_icd shards).") from e
                if not rows:
                    break
                read_any = True
                if self.train and self.block > 1:
                    order = np.random.default_rng([self.seed, epoch, self.rank, pass_index, block_index])
                    rows = [rows[i] for i in order.permutation(len(rows))]
                for i in range(offset, len(rows)):
                    ordinal += 1
                    yield rows[i], [pass_index, block_index, block_state, i + 1, ordinal]
                block_index, offset = block_index + 1, 0
            if not self.train:
                return
            if not read_any:
                raise UserError(f"split '{self.split}' gives process {self.rank} no rows: it has fewer shards or "
                                f"rows than processes.")
            pass_index, block_index, block_state, offset = pass_index + 1, 0, None, 0

    def _batches(self, epoch: int, start: Optional[list]) -> Iterator[Tuple[List[dict], List[int], list]]:
        """(rows, augmentation seeds, position after the batch) for each batch of the epoch."""
        rows = self._rows(epoch, start)
        done = start[4] // self.batch_size if start else 0
        while self.steps is None or done < self.steps:
            batch = list(islice(rows, self.batch_size))
            if not batch or (self.train and len(batch) < self.batch_size):
                return
            position = batch[-1][1]
            first = position[4] - len(batch)
            seeds = [hash((self.seed, epoch, self.rank, first + i)) & 0x7FFF_FFFF_FFFF_FFFF
                     for i in range(len(batch))] if self.train else None
            yield [row for row, _ in batch], seeds, position
            done += 1

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, ...]]:
        pool = _pool(self.workers)
        self.skipped = 0  # per pass: an epoch, or an evaluation
        start, self._resume = self._resume, None
        self.position = start
        pending = deque()
        batches = self._batches(self.epoch, start)
        args = (self.transform, self.image_column, self.label_column, self.num_classes, self.split, self.skip_bad,
                self.decode_device is not None)
        for rows, seeds, position in batches:
            pending.append((pool.apply_async(_decode_batch, (rows, seeds, *args)), position))
            if len(pending) > 2 * max(self.workers, 1):
                yield self._take(pending)
        while pending:
            yield self._take(pending)

    def _take(self, pending: deque) -> Tuple[torch.Tensor, ...]:
        result, position = pending.popleft()
        images, labels, ids, skipped = result.get()
        if self.decode_device is not None:
            try:
                images, kept, bad = decode_on_device(images, self.transform.transforms[0].size,
                                                     torch.device(self.decode_device), self.skip_bad)
            except ValueError as e:
                raise UserError(f"{first_line(e, 300)} (split '{self.split}'); fix or remove it in the shards, or pass "
                                f"--skip-bad-images to skip such images.") from e
            if not kept:
                raise UserError(f"every image of a batch of split '{self.split}' is unreadable (from {bad[0]}): the "
                                f"shards are damaged beyond skipping; write them again.")
            labels, ids, skipped = labels[kept], None if ids is None else ids[kept], skipped + bad
        for where in skipped:
            _logger.warning(f"Skipped an unreadable image of split '{self.split}': {where}.")
        self.skipped += len(skipped)
        self.position = position
        return (images, labels, ids) if self.with_ids else (images, labels)


def count_local_rows(files: List[str]) -> Optional[int]:
    """Rows in local parquet (from the footers) or webdataset shards (distinct sample keys), without decoding."""
    total = 0
    for path in files:
        path = str(path)
        if path.endswith('.parquet'):
            total += pq.read_metadata(path).num_rows
        elif path.endswith('.tar'):
            with tarfile.open(path) as tar:
                total += len({m.name.split('/')[-1].split('.', 1)[0] for m in tar.getmembers() if m.isfile()})
        else:
            return None
    return total


def _split_rows(spec: str, dd: datasets.IterableDatasetDict, split: str) -> Optional[int]:
    """Rows of a streamed split without reading it: dataset info, the shards helper's metadata, or the shards."""
    info = dd[split].info
    if info is not None and info.splits and split in info.splits and info.splits[split].num_examples:
        return info.splits[split].num_examples
    metadata = _shards_metadata(spec)
    if metadata and split in metadata.get('splits', {}):
        return metadata['splits'][split]['rows']
    builder, _, path = spec.partition(':')
    if builder in ('webdataset', 'parquet') and path:
        kwargs = _builder_kwargs(builder, path)
        files = kwargs.get('data_files') or datasets.load_dataset_builder(builder, **kwargs).config.data_files
        return count_local_rows(list(files[split])) if split in files else None
    return None


def _shards_metadata(spec: str) -> Optional[dict]:
    """What ``python -m timm_icd shards`` wrote next to the shards (row counts, label names), if anything."""
    _, _, path = spec.partition(':')
    return shards_metadata(path) if path and os.path.isdir(path) else None


def load_stream_data(spec: str, train_split: str = 'train', val_split: Optional[str] = None,
                     image_column: Optional[str] = None, label_column: Optional[str] = None,
                     num_classes: Optional[int] = None, train_rows: Optional[int] = None,
                     eval_rows: Optional[int] = None) -> ImageData:
    """Open the train and eval splits of ``spec`` as streams (image column left undecoded for the workers).

    The number of classes comes from a ClassLabel feature, the shards helper's metadata or ``num_classes``; the
    train split's length (which fixes the steps per epoch) from the dataset info, the shards or ``train_rows``.
    """
    dd = load_dataset_dict(spec, streaming=True)
    if train_split not in dd:
        raise UserError(f"no split '{train_split}' in dataset '{spec}'; its splits are: {', '.join(dd)}.")
    if val_split is None:
        val_split = next((s for s in EVAL_SPLITS if s in dd and s != train_split), None)
        if val_split is None:
            raise UserError(f"dataset '{spec}' has no eval split (validation/val/test) to stream; name one with "
                            f"--val-split (a hold-out of a stream is not offered).")
    elif val_split not in dd:
        raise UserError(f"no split '{val_split}' in dataset '{spec}'; its splits are: {', '.join(dd)}.")
    train, eval_ds = dd[train_split], dd[val_split]
    if train.features is None:
        raise UserError(f"dataset '{spec}' does not say its column types when streamed, which streaming needs.")
    image_column = _detect_column(train, image_column, datasets.Image, IMAGE_COLUMNS, 'image')
    label_column = _detect_column(train, label_column, datasets.ClassLabel, LABEL_COLUMNS, 'label')
    label_feature = train.features[label_column]
    metadata = _shards_metadata(spec) or {}
    if isinstance(label_feature, datasets.ClassLabel):
        label_names = list(label_feature.names)
    elif metadata.get('num_classes'):
        label_names = [str(n) for n in metadata.get('label_names') or range(metadata['num_classes'])]
    elif num_classes:
        label_names = [str(i) for i in range(num_classes)]
    else:
        raise UserError(f"label column '{label_column}' of '{spec}' has no class names to count; pass --num-classes.")
    if num_classes and num_classes != len(label_names):
        raise UserError(f"--num-classes {num_classes} contradicts the {len(label_names)} classes the dataset names.")
    train_rows = train_rows or _split_rows(spec, dd, train_split)
    if not train_rows:
        raise UserError(f"cannot tell how many rows split '{train_split}' of '{spec}' streams; pass "
                        f"--train-num-samples N.")
    splits = []
    for ds in (train, eval_ds):
        if image_column not in (ds.features or {}) or label_column not in (ds.features or {}):
            raise UserError(f"a split of '{spec}' lacks column '{image_column}' or '{label_column}'.")
        where = [c for c in ('__url__', '__key__') if c in ds.features]  # webdataset: which shard and sample
        ds = ds.select_columns([image_column, label_column, *where])
        if isinstance(ds.features[image_column], datasets.Image):  # decoded by the workers, not while reading
            ds = ds.cast_column(image_column, datasets.Image(decode=False))
        splits.append(ds)
    return ImageData(splits[0], splits[1], image_column, label_column, len(label_names), label_names, spec,
                     train_split, val_split, train_rows=train_rows,
                     eval_rows=eval_rows or _split_rows(spec, dd, val_split), streaming=True)
