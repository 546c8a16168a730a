"""Local shard files are checked before anything reads them: a truncated or unreadable tar or parquet file is named in
one line, instead of a stream that silently ends early or a traceback from deep inside ``datasets``.

* Shards written by ``python -m timm_icd shards`` carry their byte sizes in ``timm_icd_shards.json``: a ``stat`` per
  file tells a truncated or rewritten one (ImageNet's 1,282 shards: milliseconds).
* Other tars: the member headers are walked (seeks, no data read) and the end-of-archive marker must follow the last
  member; a size that is not a multiple of 512 bytes is truncated.
* Other parquet files: the footer must read (``pyarrow.parquet.read_metadata``).

Damage inside a file that keeps its size (flipped bytes in an image) shows when the row is decoded: the decoding
error names the shard and the sample, or ``--skip-bad-images`` skips it.
"""
import glob
import json
import os
import tarfile
from pathlib import Path
from typing import Dict, List, Optional

import pyarrow.parquet as pq

from ..base import UserError, first_line

META_FILE = 'timm_icd_shards.json'  # what python -m timm_icd shards writes last, beside the shards
SHARD_SUFFIXES = {'webdataset': '.tar', 'parquet': '.parquet'}


def shards_metadata(folder: str) -> Optional[dict]:
    """What ``python -m timm_icd shards`` wrote beside the shards (row counts, sizes, label names), if anything."""
    path = os.path.join(folder, META_FILE)
    if not os.path.isfile(path):
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f'{path} is unreadable ({first_line(e, 120)}); write the shards again with '
                        f'python -m timm_icd shards, or delete it to read the shards without it.') from e


def _tar_damage(path: Path) -> Optional[str]:
    size = path.stat().st_size
    if size % 512:
        return f'truncated: {size} bytes, not a whole number of 512-byte tar blocks'
    try:
        with tarfile.open(path) as tar:
            end = 0
            for member in tar:
                end = member.offset_data + member.size
    except (tarfile.TarError, OSError, EOFError) as e:
        return f'unreadable as a tar ({first_line(e, 100)})'
    with open(path, 'rb') as f:
        f.seek(-(-end // 512) * 512)
        marker = f.read(1024)
    if len(marker) < 1024 or any(marker):
        return 'truncated: no end-of-archive marker after its last complete member'
    return None


def _parquet_damage(path: Path) -> Optional[str]:
    try:
        pq.read_metadata(path)
    except Exception as e:  # pyarrow reports a bad footer as ArrowInvalid, a short file as OSError
        return f'unreadable as parquet ({first_line(e, 100)})'
    return None


def shard_damage(path: Path, expected_bytes: Optional[int] = None) -> Optional[str]:
    """Why the shard at ``path`` cannot be read whole, or None."""
    path = Path(path)
    if not path.is_file():
        return 'missing'
    if expected_bytes is not None:
        size = path.stat().st_size
        return None if size == expected_bytes else \
            f'{size} bytes where python -m timm_icd shards wrote {expected_bytes}: truncated or replaced'
    return _tar_damage(path) if path.suffix == '.tar' else _parquet_damage(path) if path.suffix == '.parquet' \
        else None


def local_shard_files(builder: str, path: str) -> List[Path]:
    """The shard files ``BUILDER:PATH`` names: a folder's files of the builder's kind, or a glob's."""
    suffix = SHARD_SUFFIXES.get(builder)
    if suffix is None:
        return []
    names = sorted(Path(path).iterdir()) if os.path.isdir(path) else \
        [Path(p) for p in sorted(glob.glob(os.path.expanduser(path)))]
    return [p for p in names if p.suffix == suffix and not p.name.startswith('.')]


def check_shards(builder: str, path: str) -> None:
    """Refuse, in one line naming the first damaged file, shards that cannot be read whole."""
    files = local_shard_files(builder, path)
    metadata = shards_metadata(path) if os.path.isdir(path) else None
    sizes: Dict[str, int] = {}
    for split in (metadata or {}).get('splits', {}).values():
        sizes.update(zip(split.get('files', []), split.get('shard_bytes', [])))
    damaged = [(p, reason) for p in files if (reason := shard_damage(p, sizes.get(p.name)))]
    if damaged:
        first, reason = damaged[0]
        more = f' (and {len(damaged) - 1} more)' if len(damaged) > 1 else ''
        raise UserError(f'shard {first} is damaged: {reason}{more}; write the shards again (python -m timm_icd shards) '
                        f'or move the file out of the folder.')
