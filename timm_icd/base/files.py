"""Files that readers never see half-written: write to a hidden sibling, then rename into place."""
import contextlib
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator

from .errors import UserError


def unique_tmp(path: Path) -> Path:
    """A hidden temporary sibling of ``path`` that no other writer uses (this process's pid and a random part)."""
    path = Path(path)
    return path.with_name(f'.tmp-{os.getpid()}-{secrets.token_hex(4)}-{path.name}')


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file through a temporary sibling unique to this writer and a rename: readers never see half of it,
    and two writers of one file (runs sharing a teacher cache) never rename each other's temporary file."""
    path = Path(path)
    tmp = unique_tmp(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f'cannot write {path} ({e.strerror or e}; a full disk?); earlier files are intact.') from e


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a hidden temporary path next to ``path``; rename it to ``path`` if the block completes."""
    path = Path(path)
    tmp = path.with_name(f'.{path.name}.tmp')
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the complete folder ``tmp`` to ``final``, replacing an older ``final`` only once ``tmp`` is in place."""
    old = final.with_name(f'.old-{final.name}')
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)
