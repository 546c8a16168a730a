"""Write any dataset ``--dataset`` reads as streaming shards (webdataset tars or parquet files), in one command.

    python -m timm_icd shards SRC OUT --shard-size N [--format webdataset|parquet] [--splits train,test]
        [--image-column C] [--label-column C] [--max-size [S]] [--quality Q]     (the command: ``cli/shards.py``)

SRC is what ``--dataset`` takes; OUT must be new or empty. Each split becomes ``ceil(rows / N)`` contiguous shards
(in row order) named as ``datasets`` infers splits, ``OUT/train-00000-of-00003.tar`` (or ``.parquet``), so
``datasets.load_dataset('webdataset' or 'parquet', data_dir=OUT)`` reads them back, streaming too. That inference
only knows train, validation and test: aliases are renamed (val/valid/dev -> validation, training -> train,
eval/testing/evaluation -> test), other splits left out.

webdataset: sample ``KEY = {split}_{row:08d}`` is ``KEY.jpg`` (.png, .webp, ...) and ``KEY.cls`` (the label, ASCII).
Images keep their encoded bytes when all share one format; else (or from decoded pixels) they become lossless PNG.
datasets reads back columns ``jpg``/``png`` (Image), ``cls`` (int64), ``__key__``, ``__url__``. parquet: columns
``image`` (Image, encoded bytes embedded) and ``label`` (ClassLabel with the source's names, else int64).

Bounded size (``max_size``, ``--max-size S``): an image whose longer side exceeds S is turned upright (its EXIF
orientation, as readers apply it), resized so that its longer side is S (PIL's antialiased Lanczos, ``reducing_gap``
3) and encoded again: a PNG, or an image that becomes PNG anyway, as lossless PNG, any other as JPEG at ``quality``
(in tars whose one format is neither JPEG nor PNG every image becomes PNG). Smaller images keep their bytes.
Decoding cost follows the stored pixel count (a photograph of 3000x2000 px holds 32 times the pixels of one of
500x375), and training at 224 px never needs all of them: FFCV stores ImageNet at a bounded resolution for this
reason. ``DEFAULT_MAX_SIZE`` 512 is 2.3x the 224 px output on the long side: crops of about a third of the image or
more (most of RandomResizedCrop's draws at scale 0.08-1) are still shrunk to 224 px, as on ImageNet's bulk of
500x375 photographs, which it leaves untouched. It changes the data, eval split included: a small crop of a large
photograph is now enlarged from fewer pixels (``benchmarks/throughput_lib.py`` on the 35 large images of a 400-image
realistic set, ``common.realistic_jpegs``: their 224 px crops move by a PSNR of 39 dB median, 32.5 dB at the 5th
percentile, against 48 and 43 dB for reduced decoding), and what that costs in top-1 is not measured here. So it is
off unless asked for (``--max-size`` alone means 512); the metadata records it.

Files are written under hidden temporary names and renamed when complete. ``OUT/README.md`` declares the features
(``datasets.load_dataset(OUT)`` then gives ``cls`` as a ClassLabel with names). ``OUT/timm_icd_shards.json``,
written last (a folder without it is incomplete), holds what streaming readers need::

    {"format": "webdataset", "source": SRC, "image_column": "png", "label_column": "cls",
     "label_names": ["0", ..., "9"] (null without a ClassLabel), "num_classes": 10,
     "max_size": null (or S), "quality": 90,
     "splits": {"train": {"source_split": "train", "rows": 256, "shard_rows": [86, 85, 85], "resized": 0,
                          "files": ["train-00000-of-00003.tar", ...], "shard_bytes": [...]}, ...}}

Readers compare each file's size with ``shard_bytes`` before reading (``integrity.py``).
"""
import io
import itertools
import json
import logging
import math
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasets.data_files import SPLIT_KEYWORDS
from datasets.info import DatasetInfosDict
from huggingface_hub import DatasetCardData
from PIL import Image, ImageOps

from ..base import UserError, atomic_path, first_line
from .integrity import META_FILE
from .sources import IMAGE_COLUMNS, LABEL_COLUMNS, _detect_column, load_dataset_dict

_logger = logging.getLogger(__name__)

SUFFIX = {'webdataset': 'tar', 'parquet': 'parquet'}
EXT = {'JPEG': 'jpg', 'PNG': 'png', 'WEBP': 'webp', 'GIF': 'gif', 'BMP': 'bmp', 'TIFF': 'tiff'}  # PIL format -> ext
PNG_MODES = ('1', 'L', 'LA', 'I', 'I;16', 'P', 'RGB', 'RGBA')
JPEG_MODES = ('L', 'RGB', 'CMYK')
DEFAULT_MAX_SIZE = 512  # --max-size without a value: see the module docstring
DEFAULT_QUALITY = 90
Sample = Tuple[str, str, bytes, int]  # key, extension, encoded image, label


@dataclass(frozen=True)
class Bound:
    """Bounded size: images whose longer side exceeds ``max_size`` are resized and encoded again (JPEG at
    ``quality``, or PNG); None keeps every image as it is."""
    max_size: Optional[int] = None
    quality: int = DEFAULT_QUALITY


def _split_names(dd: datasets.DatasetDict, wanted: Optional[List[str]]) -> List[Tuple[str, str]]:
    """(output name, source name) of the splits to write: the names datasets infers back from file names."""
    canonical = {kw: str(split) for split, keywords in SPLIT_KEYWORDS.items() for kw in keywords}
    for name in wanted or []:
        if name not in dd:
            raise UserError(f"no split '{name}' in the dataset; its splits are: {', '.join(dd)}.")
        if name not in canonical:
            raise UserError(f"split '{name}' cannot be sharded: datasets only infers the splits train, validation "
                            f"and test from file names; rename it or leave it out of --splits.")
    chosen = [(canonical[s], s) for s in wanted or dd if s in canonical]
    for left_out in [s for s in dd if s not in canonical] if wanted is None else []:
        _logger.warning(f"Leaving out split '{left_out}': datasets only infers train, validation and test splits.")
    if not chosen or len({name for name, _ in chosen}) < len(chosen):
        raise UserError(f"splits {', '.join(dd)} give no train/validation/test split, or one twice: use --splits.")
    return chosen


def _prepare(ds: datasets.Dataset, image_column: str, label_column: str, split: str) -> datasets.Dataset:
    """The split's image and label columns, the image undecoded; its labels checked to be integers."""
    for column in (image_column, label_column):
        if column not in ds.features:
            raise UserError(f"split '{split}' has no column '{column}'; its columns are: {', '.join(ds.features)}.")
    if len(ds) == 0:
        raise UserError(f"split '{split}' is empty; leave it out with --splits.")
    if np.asarray(ds[label_column]).dtype.kind not in 'iu':
        raise UserError(f"label column '{label_column}' of split '{split}' does not hold integer class indices.")
    ds = ds.select_columns([image_column, label_column])
    if isinstance(ds.features[image_column], datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    return ds


def _format(image: Image.Image) -> Optional[str]:
    return 'JPEG' if image.format == 'MPO' else image.format  # PIL names camera JPEGs (with a preview) MPO


def _sniff(value) -> Optional[str]:
    """PIL format of a stored image (read from its header only), else None."""
    try:
        with Image.open(value['path'] if value.get('bytes') is None else io.BytesIO(value['bytes'])) as image:
            return _format(image)
    except Exception:  # pixels, or unreadable: writing the row reports it
        return None


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    (image if image.mode in PNG_MODES else image.convert('RGB')).save(buffer, format='PNG')
    return buffer.getvalue()


def bounded(image: Image.Image, max_size: int, fmt: str, quality: int = DEFAULT_QUALITY) -> bytes:
    """``image`` upright, its longer side resized to ``max_size`` (antialiased) and encoded as ``fmt`` ('JPEG' at
    ``quality``, or lossless 'PNG')."""
    image = ImageOps.exif_transpose(image)
    scale = max_size / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    if image.mode not in JPEG_MODES + ('LA', 'RGBA', 'I', 'F'):  # palette, bilevel, 16-bit: resample in colour
        image = image.convert('RGBA' if image.has_transparency_data else 'RGB')
    image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    if fmt == 'PNG':
        return _png(image)
    buffer = io.BytesIO()
    image = image if image.mode in JPEG_MODES else image.convert('RGB')
    image.save(buffer, format='JPEG', quality=quality, icc_profile=image.info.get('icc_profile'))
    return buffer.getvalue()


def _encoded(value, keep: Optional[Set[str]], bound: Bound = Bound()) -> Tuple[bytes, str, bool]:
    """(bytes, extension, resized) of one image: as stored when its format is in ``keep`` (None: any), else lossless
    PNG; resized and encoded again when it exceeds ``bound``."""
    if not isinstance(value, dict):  # decoded pixels (an array column)
        pixels = np.asarray(value)
        if pixels.dtype.kind not in 'iub':
            raise ValueError(f'pixels of type {pixels.dtype}, not 8-bit integers')
        image = Image.fromarray(pixels.astype(np.uint8))
        if bound.max_size and max(image.size) > bound.max_size:
            return bounded(image, bound.max_size, 'PNG'), 'png', True
        return _png(image), 'png', False
    data = value['bytes']
    if data is None:
        with open(value['path'], 'rb') as f:
            data = f.read()
    with Image.open(io.BytesIO(data)) as image:
        kept = keep is None or _format(image) in keep
        if bound.max_size and max(image.size) > bound.max_size:
            fmt = 'PNG' if not kept or _format(image) == 'PNG' else 'JPEG'
            return bounded(image, bound.max_size, fmt, bound.quality), EXT[fmt], True
        if kept:
            return data, EXT.get(_format(image), (image.format or 'bin').lower()), False
        return _png(image), 'png', False


def _tar_keep(parts: Dict[str, datasets.Dataset], image_column: str, bound: Bound = Bound()) -> Set[str]:
    """The one format kept as stored in tars: every image's format if they share one (JPEG or PNG when images are
    bounded: a resized image is encoded as one of them), else PNG."""
    formats = set()
    for ds in parts.values():
        for batch in ds.iter(batch_size=256):
            formats.update(map(_sniff, batch[image_column]))
            if len(formats) > 1:
                return {'PNG'}
    allowed = {'JPEG', 'PNG'} if bound.max_size else set(EXT)
    return formats if formats <= allowed else {'PNG'}


def _samples(ds: datasets.Dataset, split: str, offset: int, keep: Optional[Set[str]], bound: Bound,
             counts: Dict[str, int]) -> Iterator[Sample]:
    image_column, label_column = ds.column_names
    for i, row in enumerate(ds, start=offset):
        try:
            data, ext, resized = _encoded(row[image_column], keep, bound)
        except Exception as e:
            raise UserError(f"cannot read the image in row {i} of split '{split}': {first_line(e)}") from e
        counts['resized'] += resized
        yield f'{split}_{i:08d}', ext, data, int(row[label_column])


def _write_tar(path: Path, samples: Iterator[Sample]) -> None:
    with atomic_path(path) as tmp, tarfile.open(tmp, 'w', format=tarfile.PAX_FORMAT) as tar:
        for key, ext, data, label in samples:
            for name, payload in ((f'{key}.{ext}', data), (f'{key}.cls', str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(payload), 0o644
                tar.addfile(info, io.BytesIO(payload))


def _write_parquet(path: Path, samples: Iterator[Sample], features: datasets.Features) -> None:
    schema = features.arrow_schema  # carries datasets' features (Image, ClassLabel names) as metadata
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        while batch := list(itertools.islice(samples, 100)):  # row groups of 100 images: small reads when streaming
            images = [{'bytes': data, 'path': f'{key}.{ext}'} for key, ext, data, _ in batch]
            writer.write_table(pa.table({'image': images, 'label': [s[3] for s in batch]}, schema=schema))


def _write_split(out: Path, name: str, ds: datasets.Dataset, shard_size: int, fmt: str, keep: Optional[Set[str]],
                 features: datasets.Features, bound: Bound) -> dict:
    """Write one split as contiguous shards; return its entry of the metadata file."""
    num_shards, offset, files, rows, counts = math.ceil(len(ds) / shard_size), 0, [], [], {'resized': 0}
    for index in range(num_shards):
        shard = ds.shard(num_shards, index, contiguous=True)
        files.append(f'{name}-{index:05d}-of-{num_shards:05d}.{SUFFIX[fmt]}')
        samples = _samples(shard, name, offset, keep, bound, counts)
        if fmt == 'webdataset':
            _write_tar(out / files[-1], samples)
        else:
            _write_parquet(out / files[-1], samples, features)
        offset += len(shard)
        rows.append(len(shard))
    resized = f"; {counts['resized']} images above {bound.max_size} px resized" if bound.max_size else ''
    _logger.info(f"Split '{name}': {len(ds)} rows in {num_shards} {fmt} shards of at most {shard_size} rows{resized}.")
    return {'rows': len(ds), 'shard_rows': rows, 'resized': counts['resized'], 'files': files,
            'shard_bytes': [(out / name).stat().st_size for name in files]}


def _write_metadata(out: Path, meta: dict, features: datasets.Features) -> None:
    """README.md with the features (``load_dataset(OUT)`` reads them: class names), then the metadata file, last."""
    card = DatasetCardData()
    DatasetInfosDict({'default': datasets.DatasetInfo(features=features)}).to_dataset_card_data(card)
    with atomic_path(out / 'README.md') as tmp:
        tmp.write_text(f'---\n{card}\n---\n\nShards of {meta["source"]} written by `python -m timm_icd shards`.\n')
    with atomic_path(out / META_FILE) as tmp:
        tmp.write_text(json.dumps(meta, indent=1) + '\n')


def write_shards(src: str, out: str, shard_size: int, fmt: str = 'webdataset', splits: Optional[List[str]] = None,
                 image_column: Optional[str] = None, label_column: Optional[str] = None,
                 max_size: Optional[int] = None, quality: int = DEFAULT_QUALITY) -> dict:
    """Write ``src``'s splits to ``out`` as shards of at most ``shard_size`` rows; return the metadata written.

    Args:
        src: What ``--dataset`` takes.
        out: A new or empty folder.
        shard_size: Most rows per shard.
        fmt: 'webdataset' or 'parquet'.
        splits: Source splits to write; None writes every train/validation/test split.
        image_column, label_column: Column names; None detects them like ``--dataset`` does.
        max_size: Resize images whose longer side exceeds this many px to it and encode them again (see above);
            None keeps every image as it is.
        quality: JPEG quality of the images encoded again.
    """
    if shard_size < 1:
        raise UserError(f'--shard-size must be at least 1 (got {shard_size}).')
    if max_size is not None and max_size < 1:
        raise UserError(f'--max-size must be at least 1 px (got {max_size}).')
    if not 1 <= quality <= 100:
        raise UserError(f'--quality must be between 1 and 100 (got {quality}).')
    bound = Bound(max_size, quality)
    if Path(out).exists() and (not Path(out).is_dir() or any(Path(out).iterdir())):
        raise UserError(f'{out} already exists and is not an empty folder; shards are never written over existing '
                        f'data: choose a new folder.')
    dd = load_dataset_dict(src)
    chosen = _split_names(dd, splits)
    first = dd[chosen[0][1]]
    image_column = _detect_column(first, image_column, datasets.Image, IMAGE_COLUMNS, 'image')
    label_column = _detect_column(first, label_column, datasets.ClassLabel, LABEL_COLUMNS, 'label')
    parts = {name: _prepare(dd[source], image_column, label_column, source) for name, source in chosen}
    label_feature = first.features[label_column]
    names = list(label_feature.names) if isinstance(label_feature, datasets.ClassLabel) else None
    keep = _tar_keep(parts, image_column, bound) if fmt == 'webdataset' else None
    columns = (EXT[next(iter(keep))], 'cls') if keep else ('image', 'label')
    features = datasets.Features({columns[0]: datasets.Image(),
                                  columns[1]: label_feature if names else datasets.Value('int64')})
    num_classes = len(names) if names else max(int(np.max(ds[label_column])) for ds in parts.values()) + 1
    meta = {'format': fmt, 'source': src, 'image_column': columns[0], 'label_column': columns[1],
            'label_names': names, 'num_classes': num_classes, 'max_size': max_size, 'quality': quality, 'splits': {}}
    Path(out).mkdir(parents=True, exist_ok=True)
    for name, source in chosen:
        meta['splits'][name] = {'source_split': source,
                                **_write_split(Path(out), name, parts[name], shard_size, fmt, keep, features, bound)}
    _write_metadata(Path(out), meta, features)
    return meta
