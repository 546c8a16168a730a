"""Image classification data through Hugging Face ``datasets``, one path for every source.

``--dataset`` takes a Hub dataset id (or timm's ``hfds/ID``, ``hfids/ID``), a local ``save_to_disk`` folder,
``imagefolder:PATH``, ``webdataset:PATH`` or ``parquet:PATH`` shards, or ``digits`` (scikit-learn's real 8x8
handwritten digits, the embedded default). ``--streaming`` reads any of them as a stream (``streaming.py``).
Image and label columns are detected from the features; transforms come from ``timm.data.create_transform``.

Augmentation randomness is a pure function of (seed, epoch, sample index): a resumed run, a different worker count
or skipped batches give every sample the same augmentation an uninterrupted run would.
"""
import glob
import logging
import os
import random
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple, Union

import datasets
import numpy as np
import torch
from PIL import Image

from ..base import UserError, first_line
from .decode import open_image
from .integrity import SHARD_SUFFIXES, check_shards

_logger = logging.getLogger(__name__)

IMAGE_COLUMNS = ('image', 'img', 'pixel_values', 'picture')
LABEL_COLUMNS = ('label', 'labels', 'fine_label', 'target', 'class', 'category', 'cls')  # cls: webdataset
EVAL_SPLITS = ('validation', 'valid', 'val', 'test')
HOLDOUT = 'holdout'  # --val-split holdout: a hold-out of train even where the dataset has an eval split


@dataclass
class ImageData:
    """The train and eval splits of an image classification dataset, and what describes them."""
    train: Union[datasets.Dataset, datasets.IterableDataset]
    eval: Union[datasets.Dataset, datasets.IterableDataset]
    image_column: str
    label_column: str
    num_classes: int
    label_names: List[str]
    name: str
    train_split: str
    eval_split: str
    skipped_images: dict = field(default_factory=dict)
    train_rows: Optional[int] = None  # streamed splits: from the dataset info, the shards or --train-num-samples
    eval_rows: Optional[int] = None
    streaming: bool = False

    def __post_init__(self):
        if not self.streaming:
            self.train_rows, self.eval_rows = len(self.train), len(self.eval)


def digits_dataset() -> datasets.DatasetDict:
    """scikit-learn's 1,797 real 8x8 handwritten digits (0..16 grey levels) as a stratified 80/20 train/test split."""
    from sklearn.datasets import load_digits  # lazy: about a second to import, for the built-in digits only
    digits = load_digits()
    images = [Image.fromarray((img * 255.0 / 16.0).round().astype(np.uint8), mode='L') for img in digits.images]
    features = datasets.Features({
        'image': datasets.Image(),
        'label': datasets.ClassLabel(names=[str(i) for i in range(10)]),
    })
    ds = datasets.Dataset.from_dict({'image': images, 'label': digits.target.tolist()}, features=features)
    return ds.train_test_split(test_size=0.2, stratify_by_column='label', seed=0)


SHARD_BUILDERS = ('webdataset', 'parquet', 'imagefolder')  # BUILDER:PATH, read by datasets' packaged builders
STREAM_SHARDS = 64  # shards of a map-style split streamed with --streaming (split among processes by shard)


def _builder_kwargs(builder: str, path: str) -> dict:
    """``load_dataset`` arguments for ``BUILDER:PATH``: a folder (splits from its file names) or one split's glob."""
    if os.path.isdir(path):
        return {'data_dir': path}
    files = sorted(glob.glob(os.path.expanduser(path)))
    if not files:
        what = 'folder' if builder == 'imagefolder' else f'{builder} shards'
        raise UserError(f"dataset {what} not found: {path} (from --dataset {builder}:{path}).")
    return {'data_files': {'train': files}}


def _to_iterable(dd: datasets.DatasetDict) -> datasets.IterableDatasetDict:
    """Map-style splits as streams, their lengths in the info (where streamed Hub datasets keep them)."""
    streams = datasets.IterableDatasetDict()
    for name, ds in dd.items():
        streams[name] = ds.to_iterable_dataset(num_shards=max(1, min(STREAM_SHARDS, len(ds))))
        streams[name].info.splits = datasets.SplitDict()
        streams[name].info.splits.add(datasets.SplitInfo(name, num_examples=len(ds)))
    return streams


def load_dataset_dict(spec: Union[str, datasets.DatasetDict], streaming: bool = False
                      ) -> Union[datasets.DatasetDict, datasets.IterableDatasetDict]:
    """Load ``spec`` as a DatasetDict, or with ``streaming`` as an IterableDatasetDict.

    ``spec`` is a Hub id (also timm's ``hfds/ID``, and ``hfids/ID``, which streams), a save_to_disk folder,
    ``webdataset:PATH``, ``parquet:PATH`` or ``imagefolder:PATH`` (PATH a folder whose file names give the splits,
    or a glob of the train split's files), ``digits``, or a DatasetDict itself.
    """
    if isinstance(spec, datasets.DatasetDict):
        return _to_iterable(spec) if streaming else spec
    if spec == 'digits':
        return _to_iterable(digits_dataset()) if streaming else digits_dataset()
    builder, _, path = spec.partition(':')
    if builder in SHARD_BUILDERS and path:
        kwargs = _builder_kwargs(builder, path)
        if builder in SHARD_SUFFIXES:
            check_shards(builder, path)
        try:
            return datasets.load_dataset(builder, **kwargs, streaming=streaming)
        except Exception as e:
            raise UserError(f'cannot read {builder} data from {path}: {first_line(e)}') from e
    if os.path.isdir(spec):
        try:
            loaded = datasets.load_from_disk(spec)
        except Exception as e:
            raise UserError(
                f'{spec} is not a datasets save_to_disk folder ({first_line(e)}); for a folder of class '
                f'sub-folders use --dataset imagefolder:{spec}, for shards webdataset:{spec} or parquet:{spec}.'
            ) from e
        loaded = loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict(train=loaded)
        return _to_iterable(loaded) if streaming else loaded
    hub_id = spec.split('/', 1)[1] if spec.startswith(('hfds/', 'hfids/')) else spec  # timm's names
    streaming = streaming or spec.startswith('hfids/')
    if spec.startswith(('/', '.', '~')) or hub_id.count('/') > 1:  # a path, not a Hub id (NAME or ORG/NAME)
        raise UserError(f'dataset folder not found: {spec}.')
    try:
        return datasets.load_dataset(hub_id, streaming=streaming)
    except Exception as e:
        raise UserError(
            f"cannot load dataset '{hub_id}' from the Hub ({first_line(e)}); pass a Hub id, a save_to_disk folder, "
            f"webdataset:PATH, parquet:PATH, imagefolder:PATH or digits.") from e


def _detect_column(ds: datasets.Dataset, wanted: Optional[str], feature_type, names: Sequence[str], what: str):
    columns = list(ds.features)
    if wanted:
        if wanted not in ds.features:
            raise UserError(f"no {what} column '{wanted}' in the dataset; its columns are: {', '.join(columns)}.")
        return wanted
    for name, feature in ds.features.items():
        if isinstance(feature, feature_type):
            return name
    for name in names:
        if name in ds.features:
            return name
    flag, article = ('--image-column', 'an') if what == 'image' else ('--label-column', 'a')
    raise UserError(f"cannot find {article} {what} column among: {', '.join(columns)}; name it with {flag}.")


def load_image_data(
        spec: Union[str, datasets.DatasetDict] = 'digits',
        train_split: str = 'train',
        val_split: Optional[str] = None,
        image_column: Optional[str] = None,
        label_column: Optional[str] = None,
        val_fraction: float = 0.1,
        seed: int = 0,
) -> ImageData:
    """Load a dataset and resolve its splits, columns, number of classes and label names.

    Args:
        spec: What ``--dataset`` takes.
        train_split: Split to train on.
        val_split: Split to evaluate on; None takes the first of validation/valid/val/test, or holds out
            ``val_fraction`` of the train split (stratified, fixed seed) when there is none; ``HOLDOUT`` holds it out
            in any case (unless the dataset has a split of that name), so a test split stays unseen.
        image_column, label_column: Column names; None detects them from the features.
        val_fraction: Fraction held out when the dataset has no eval split.
        seed: Seed of that hold-out split.
    """
    dd = load_dataset_dict(spec)
    spec = spec if isinstance(spec, str) else 'in-memory DatasetDict'
    if train_split not in dd:
        raise UserError(f"no split '{train_split}' in dataset '{spec}'; its splits are: {', '.join(dd)}.")
    train = dd[train_split]
    hold_out = val_split == HOLDOUT and HOLDOUT not in dd
    if val_split is not None and val_split not in dd and not hold_out:
        raise UserError(f"no split '{val_split}' in dataset '{spec}'; its splits are: {', '.join(dd)}.")
    if val_split is None:
        val_split = next((s for s in EVAL_SPLITS if s in dd and s != train_split), None)
    if hold_out:
        val_split = None
    image_column = _detect_column(train, image_column, datasets.Image, IMAGE_COLUMNS, 'image')
    label_column = _detect_column(train, label_column, datasets.ClassLabel, LABEL_COLUMNS, 'label')
    train = train.select_columns([image_column, label_column])
    if val_split is None:
        if len(train) < 2:
            raise UserError(f"split '{train_split}' of dataset '{spec}' has {len(train)} rows: too few to train on.")
        stratify = label_column if isinstance(train.features[label_column], datasets.ClassLabel) else None
        try:
            parts = train.train_test_split(test_size=val_fraction, stratify_by_column=stratify, seed=seed)
        except ValueError:  # too few rows per class to stratify
            parts = train.train_test_split(test_size=val_fraction, seed=seed)
        train, eval_ds = parts['train'], parts['test']
        val_split = f'{train_split}[holdout {val_fraction:g}]'
        _logger.info(f"Dataset '{spec}': holding out {len(eval_ds)} rows of '{train_split}' to evaluate on.")
    else:
        eval_ds = dd[val_split]
        for column in (image_column, label_column):
            if column not in eval_ds.features:
                raise UserError(f"split '{val_split}' has no column '{column}'.")
        eval_ds = eval_ds.select_columns([image_column, label_column])
    for split, ds in ((train_split, train), (val_split, eval_ds)):
        if len(ds) == 0:
            raise UserError(f"split '{split}' of dataset '{spec}' is empty.")

    label_feature = train.features[label_column]
    if isinstance(label_feature, datasets.ClassLabel):
        num_classes, label_names = label_feature.num_classes, list(label_feature.names)
    else:
        if not (isinstance(label_feature, datasets.Value) and label_feature.dtype.startswith(('int', 'uint'))):
            kind = label_feature.dtype if isinstance(label_feature, datasets.Value) else type(label_feature).__name__
            raise UserError(f"column '{label_column}' of split '{train_split}' is not a label column: it holds "
                            f"{kind} values, not class indices; name the label column with --label-column.")
        num_classes = int(max(np.max(train[label_column]), np.max(eval_ds[label_column]))) + 1
        label_names = [str(i) for i in range(num_classes)]
    for split, ds in ((train_split, train), (val_split, eval_ds)):
        labels = np.asarray(ds[label_column])
        if labels.dtype.kind not in 'iu':
            raise UserError(f"label column '{label_column}' holds {labels.dtype} values, not class indices.")
        bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
        if len(bad):
            raise UserError(f"split '{split}' row {bad[0]} has label {labels[bad[0]]}, outside 0..{num_classes - 1} "
                            f"({len(bad)} such rows); fix the labels or the label column.")
    return ImageData(train, eval_ds, image_column, label_column, num_classes, label_names, spec, train_split,
                     val_split)


def _to_rgb(image) -> Image.Image:
    """The image in RGB; an RGB JPEG opened by ``decode.open_image`` stays undecoded (its crop may decode less)."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    return image if image.mode == 'RGB' else image.convert('RGB')


def seeded_transform(transform: Callable, image: Image.Image, sample_seed: int):
    """Run ``transform`` on ``image`` with the CPU torch, Python and numpy RNGs seeded for this sample.

    timm's transforms draw from all three (RandAugment and AugMix use numpy). Only the CPU torch generator is seeded
    (``torch.manual_seed`` would also seed every device, ~100x slower). In a DataLoader or pool worker nothing else
    uses these RNGs; in the main process their states are restored afterwards, so dropout and the rest of training
    draw exactly what they would without augmentation.
    """
    in_worker = torch.utils.data.get_worker_info() is not None
    if not in_worker:
        states = torch.get_rng_state(), random.getstate(), np.random.get_state()
    torch.default_generator.manual_seed(sample_seed)
    random.seed(sample_seed)
    np.random.seed(sample_seed & 0xFFFF_FFFF)
    try:
        return transform(image)
    finally:
        if not in_worker:
            torch.set_rng_state(states[0])
            random.setstate(states[1])
            np.random.set_state(states[2])


def find_bad_images(ds: datasets.Dataset, image_column: str, num_workers: int = 0) -> List[int]:
    """Rows whose image cannot be decoded, found by decoding each one once."""
    probe = ImageClassificationDataset(ds, image_column, None, transform=None, check_only=True)
    loader = torch.utils.data.DataLoader(probe, batch_size=256, num_workers=num_workers, collate_fn=list)
    return [i for batch in loader for i, ok in batch if not ok]


class ImageClassificationDataset(torch.utils.data.Dataset):
    """A ``datasets.Dataset`` split as (image tensor, label) samples, with optionally seeded augmentation.

    Images are opened with ``decode.open_image``: the pixels of a JPEG are decoded by the transform, which may decode
    only what its crop needs (``decode.ReducedDecodeCrop``); a decoding error there is reported like one on opening.

    Args:
        ds: The split.
        image_column, label_column: Its columns.
        transform: timm transform applied to the RGB PIL image.
        seed: When set, each sample's transform runs with RNG seeded from (seed, epoch, index); see ``set_epoch``.
        split_name: For error messages.
        check_only: Return (index, decodable) instead of the sample (see ``find_bad_images``).
        rgb: Convert every image to RGB (False keeps the PIL image as it is).
        with_index: Return (image, label, row index) (what a teacher cache keys rows on, and the device's colour
            jitter draws from).
    """

    def __init__(
            self,
            ds: datasets.Dataset,
            image_column: str,
            label_column: Optional[str],
            transform: Optional[Callable] = None,
            seed: Optional[int] = None,
            split_name: str = 'train',
            check_only: bool = False,
            rgb: bool = True,
            with_index: bool = False,
    ):
        feature = ds.features[image_column]
        self.mode = feature.mode if isinstance(feature, datasets.Image) else None
        if isinstance(feature, datasets.Image) and feature.decode:  # rows give the encoded bytes: opened here
            ds = ds.cast_column(image_column, datasets.Image(mode=feature.mode, decode=False))
        self.ds = ds
        self.image_column = image_column
        self.label_column = label_column
        self.transform = transform
        self.seed = seed
        self.split_name = split_name
        self.check_only = check_only
        self.rgb = rgb
        self.with_index = with_index
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation stream samples draw from."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ds)

    def _row(self, index: int, row: Optional[dict] = None):
        """(image, label) of one row (``row``: its values, when read already): the image opened (RGB unless ``rgb``
        is False), its pixels perhaps not yet decoded."""
        try:
            row = self.ds[index] if row is None else row
            image = open_image(row[self.image_column], self.mode)
            image = _to_rgb(image) if self.rgb else image
            return image, (row[self.label_column] if self.label_column else None)
        except Exception as e:
            if self.check_only:
                raise
            raise self._error(index, e) from e

    def _error(self, index: int, e: Exception) -> UserError:
        return UserError(f"cannot decode the image in row {index}{self._file(index)} of split '{self.split_name}' "
                         f"({first_line(e)}); fix or remove it, or pass --skip-bad-images to skip such rows.")

    def _file(self, index: int) -> str:
        """' (file PATH)' for an image stored as a file, else ''."""
        try:
            raw = self.ds[index][self.image_column]
            return f" (file {raw['path']})" if isinstance(raw, dict) and raw.get('path') else ''
        except Exception:
            return ''

    def __getitem__(self, index: int, row: Optional[dict] = None) -> Tuple[torch.Tensor, int]:
        if self.check_only:
            try:
                image = self._row(index, row)[0]
                if isinstance(image, Image.Image):
                    image.load()
                return index, True
            except Exception:
                return index, False
        image, label = self._row(index, row)
        try:  # PIL decodes the pixels here, in the transform (or for the caller): a damaged file fails here
            if self.transform is None and isinstance(image, Image.Image):
                image.load()
            elif self.transform is not None:
                image = self.transform(image) if self.seed is None else seeded_transform(
                    self.transform, image, hash((self.seed, self.epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF)
        except OSError as e:
            raise self._error(index, e) from e
        return (image, label, index) if self.with_index else (image, label)

    def __getitems__(self, indices: List[int]) -> list:
        """The samples of a batch (torch's DataLoader fetches through this when it exists), their rows read from
        the Arrow table in one query: reading rows one by one through ``datasets`` cost about 0.35 CPU-ms per image,
        ~5% of the loader's (``benchmarks/results/loader_profile.md``)."""
        try:
            columns = self.ds[list(indices)]
            rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
        except Exception:  # a row that cannot be read, or a format that is no dict of columns: one row at a time
            return [self[index] for index in indices]
        return [self.__getitem__(index, row) for index, row in zip(indices, rows)]
