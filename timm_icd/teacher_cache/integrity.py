"""A teacher cache damaged after it was written never feeds a run garbage: it is refused in one line, or the damaged
epochs are dropped and computed again.

* The manifest must be JSON with the fields a cache has; a ``--teacher-cache`` path that is a file is refused.
* Every complete epoch's arrays are checked when a run opens the cache: each file exists and holds the shape and
  dtype the manifest implies, and every row is marked written. Cheap (headers and one small array).
* Each array's CRC32 is stored in the manifest when its epoch is marked complete, and checked the first time a run
  uses the epoch (``verify_epoch``): about 1.6 GiB/s on one core of the 2-core test machine (sha256: 0.66), so 4 ms
  for a 6 MiB Fashion-MNIST epoch and about 4.6 s for an ImageNet-1k resnet50 epoch in fp16 (7.27 GiB), once per
  run and epoch.
* A damaged epoch is dropped from the manifest (its folder deleted) with one warning line naming what is wrong, and
  the run computes it again with the live teacher, as for an epoch never cached.
"""
import json
import logging
import shutil
import zlib
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from ..base import UserError, first_line, write_text_atomic
from .claims import locked

_logger = logging.getLogger(__name__)

MANIFEST = 'manifest.json'
MANIFEST_KEYS = ('version', 'valid_for', 'rows', 'feature_dim', 'num_classes', 'storage', 'epochs')
CHUNK = 8 << 20


def read_manifest(root: Path) -> Optional[dict]:
    """The manifest of the cache at ``root`` (None when there is none yet), or one error line when unusable."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise UserError(f'--teacher-cache {root} is a file, not a folder: name a folder (new, empty, or a cache).')
    path = root / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f'--teacher-cache {root}: its {MANIFEST} is unreadable ({first_line(e, 120)}); move the folder '
                        f'aside or delete it, and the cache is written again.') from e
    missing = [key for key in MANIFEST_KEYS if key not in manifest] if isinstance(manifest, dict) else ['all']
    if missing or not isinstance(manifest['epochs'], list):
        raise UserError(f'--teacher-cache {root}: its {MANIFEST} lacks {", ".join(missing) or "a list of epochs"}; '
                        f'move the folder aside or delete it, and the cache is written again.')
    return manifest


def file_crc32(path: Path) -> str:
    """CRC32 of a file's bytes, read in chunks, as 8 hex digits."""
    crc = 0
    with open(path, 'rb') as f:
        while chunk := f.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f'{crc:08x}'


def epoch_checksums(cache, epoch: int) -> Dict[str, str]:
    """CRC32 of each array file of ``epoch`` (``cache`` is a ``TeacherCache``)."""
    return {name: file_crc32(cache.epoch_dir(epoch) / f'{name}.npy') for name in cache.array_specs()}


def check_epoch(cache, epoch: int, checksum: bool = False) -> Optional[str]:
    """Why the complete ``epoch`` cannot be read as it is, or None: missing or mis-shaped arrays, unwritten rows,
    and with ``checksum`` a CRC32 that differs from the one stored when the epoch was completed."""
    folder = cache.epoch_dir(epoch)
    for name, (shape, dtype) in cache.array_specs().items():
        path = folder / f'{name}.npy'
        if not path.is_file():
            return f'{path.relative_to(cache.root)} is missing'
        try:
            array = np.load(path, mmap_mode='r')
        except Exception as e:  # a truncated file: numpy cannot map the shape its header promises
            return f'{path.relative_to(cache.root)} is unreadable ({first_line(e, 80)})'
        if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
            return (f'{path.relative_to(cache.root)} holds {array.dtype}{list(array.shape)}, the manifest implies '
                    f'{np.dtype(dtype)}{list(shape)}')
        if name == 'written' and not bool(np.all(array == 1)):
            return f'{int(np.sum(array != 1))} rows of epoch {epoch} are not marked written'
    stored = cache.manifest.get('checksums', {}).get(str(epoch))
    if checksum and stored:
        actual = epoch_checksums(cache, epoch)
        changed = [name for name in stored if actual.get(name) != stored[name]]
        if changed:
            return f'the contents of {", ".join(f"{n}.npy" for n in changed)} changed since the epoch was written ' \
                   f'(CRC32 differs)'
    return None


def drop_epoch(cache, epoch: int, reason: str) -> None:
    """Take a damaged epoch out of the manifest and delete its folder (main process): it is computed again.

    Under the cache's lock, against the manifest as it is now: an epoch another run has meanwhile dropped and
    written again (other checksums than the ones found wrong) is left alone.
    """
    checked = cache.manifest.get('checksums', {}).get(str(epoch))
    with locked(cache.root):
        manifest = read_manifest(cache.root)
        if epoch in manifest['epochs'] and manifest.get('checksums', {}).get(str(epoch)) == checked:
            _logger.warning(f'Teacher cache {cache.root}: epoch {epoch} is damaged ({reason}); it is dropped and '
                            f'computed again with the live teacher.')
            shutil.rmtree(cache.epoch_dir(epoch), ignore_errors=True)  # before the manifest: no claim can come between
            manifest['epochs'] = [e for e in manifest['epochs'] if e != epoch]
            manifest.get('checksums', {}).pop(str(epoch), None)
            write_text_atomic(cache.root / MANIFEST, json.dumps(manifest, indent=1))
        cache.manifest = manifest
    cache.forget(epoch)
