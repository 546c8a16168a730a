"""Run folders and crash-safe checkpoints.

A checkpoint is ``accelerator.save_state`` (student + ICD heads, optimizer, grad scaler, every process's RNG
states) plus the schedule's state and ``run_state.json`` (epoch, step, best metric, metric history). It is written
to ``checkpoints/.tmp-NAME`` and renamed to ``checkpoints/NAME`` only when complete, so a kill while saving leaves
the previous checkpoint intact; old ones are pruned only after that rename.
"""
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch

from ..base import UserError, first_line, replace_dir
from .events import emit

_logger = logging.getLogger(__name__)

CHECKPOINTS = 'checkpoints'
RUN_STATE = 'run_state.json'
SCHEDULER_STATE = 'scheduler.pt'
_NAME = re.compile(r'^checkpoint-(\d+)$')
# files and folders a run writes; --overwrite removes these and nothing else
RUN_FILES = ('args.yaml', 'summary.csv', CHECKPOINTS, 'student', 'student_best')
OVERWRITTEN = '.overwritten-run'


def check_output_dir(output: Path, resume: str, overwrite: bool) -> None:
    """Refuse an occupied or unwritable run folder, without changing anything in it.

    A folder holding a run needs ``--resume`` (continue it) or ``--overwrite`` (replace the run's own files).
    """
    if output.exists() and not output.is_dir():
        raise UserError(f'--output {output} is a file, not a folder.')
    occupied = [name for name in RUN_FILES if (output / name).exists()]
    if occupied and not resume and not overwrite:
        raise UserError(f'--output {output} already holds a run ({", ".join(occupied)}); pass --resume auto to '
                        f'continue it or --overwrite to replace it.')
    parent = output
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f'cannot write to --output {output}: {parent} is not a writable folder.')


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def claim_output_dir(output: Path, overwrite: bool) -> None:
    """Create the run folder. With ``overwrite``, set an earlier run's files aside in ``.overwritten-run``:
    ``settle_overwrite`` drops them once the new run has a checkpoint, or puts them back if it fails before.

    Setting aside is atomic: files move into ``.overwritten-run.partial``, which is renamed when all are in; a
    partial set-aside left by a kill is put back first.
    """
    backup, partial = output / OVERWRITTEN, output / f'{OVERWRITTEN}.partial'
    try:
        output.mkdir(parents=True, exist_ok=True)
        if partial.exists():  # killed while setting aside: restore, then start over
            for path in partial.iterdir():
                os.replace(path, output / path.name)
            partial.rmdir()
        if not overwrite:
            return
        existing = [name for name in RUN_FILES if (output / name).exists()]
        if backup.exists():  # an earlier --overwrite run died before its first checkpoint: its files are partial
            for name in existing:
                _remove(output / name)
        elif existing:
            partial.mkdir()
            for name in existing:
                os.replace(output / name, partial / name)
            os.replace(partial, backup)
    except OSError as e:
        raise UserError(f'cannot prepare --output {output}: {e.strerror or e}.') from e


def settle_overwrite(output: Path, keep_new: bool) -> None:
    """After ``--overwrite``: delete the earlier run (``keep_new``) or restore it in place of the new one."""
    backup = output / OVERWRITTEN
    if not backup.exists():
        return
    if keep_new:
        shutil.rmtree(backup)
        return
    for name in RUN_FILES:
        _remove(output / name)
    for path in backup.iterdir():
        os.replace(path, output / path.name)
    backup.rmdir()


def checkpoint_step(path: Path) -> Optional[int]:
    match = _NAME.match(path.name)
    return int(match.group(1)) if match and (path / RUN_STATE).is_file() else None


def find_latest_checkpoint(output: Path) -> Optional[Path]:
    """The newest complete checkpoint of a run folder, or None."""
    root = output / CHECKPOINTS
    if not root.is_dir():
        return None
    complete = [(step, p) for p in root.iterdir() if (step := checkpoint_step(p)) is not None]
    return max(complete)[1] if complete else None


def resolve_resume(output: Path, resume: str) -> Optional[Path]:
    """The checkpoint ``--resume`` names: 'auto' (newest in the run folder, or None to start fresh) or a path."""
    if not resume:
        return None
    if resume == 'auto':
        latest = find_latest_checkpoint(output)
        if latest is None:
            results = [name for name in ('summary.csv', 'student', 'student_best') if (output / name).exists()]
            if results:
                raise UserError(f'--resume auto: {output} holds results ({", ".join(results)}) but no complete '
                                f'checkpoint to continue from; pass --overwrite to start over.')
            _logger.info(f'--resume auto: no complete checkpoint in {output}, starting from the beginning.')
        return latest
    path = Path(resume)
    if not (path / RUN_STATE).is_file():
        raise UserError(f'--resume {resume}: not a complete checkpoint folder (no {RUN_STATE}).')
    return path


def save_checkpoint(accelerator, output: Path, run_state: dict, scheduler, keep: int) -> Path:
    """Save a complete checkpoint named after the global step, atomically, then prune to the ``keep`` newest.

    ``run_state`` is ``RunState.to_json()`` (written last, as ``run_state.json``: it marks the folder complete).
    """
    root = output / CHECKPOINTS
    final = root / f"checkpoint-{run_state['global_step']:08d}"
    tmp = root / f'.tmp-{final.name}'
    try:
        if accelerator.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        if accelerator.is_main_process:
            torch.save(scheduler.state_dict(), tmp / SCHEDULER_STATE)
            emit('checkpoint')
            (tmp / RUN_STATE).write_text(json.dumps(run_state, indent=1))  # written last: marks completeness
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            replace_dir(tmp, final)
            prune_checkpoints(root, keep)
    except Exception as e:  # safetensors and torch.save report a failed write with their own exception types
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = getattr(e, 'strerror', None) or first_line(e, 200)
        raise UserError(f'cannot save checkpoint {final.name} ({reason}; a full disk?); earlier checkpoints are '
                        f'intact: free space, then rerun with --resume auto.') from e
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest complete checkpoints, and leftovers of interrupted saves."""
    complete = sorted((step, p) for p in root.iterdir() if (step := checkpoint_step(p)) is not None)
    for _, path in complete[:-keep]:
        shutil.rmtree(path)
    newest = complete[-1][0] if complete else -1
    for path in root.glob('.tmp-checkpoint-*'):
        if int(path.name.rsplit('-', 1)[1]) < newest:
            shutil.rmtree(path, ignore_errors=True)


def read_run_state(path: Path) -> dict:
    """The run state of a checkpoint (cheap: read before any weights, to check it fits the run)."""
    return json.loads((path / RUN_STATE).read_text())


def load_checkpoint(accelerator, path: Path, scheduler) -> dict:
    """Restore model, optimizer, RNG and schedule from ``path`` and return its run state."""
    try:
        accelerator.load_state(str(path))
    except Exception as e:
        raise UserError(f'cannot resume from {path}: {first_line(e)} (was it written by a run with the same '
                        f'models and method?).') from e
    scheduler.load_state_dict(torch.load(path / SCHEDULER_STATE, map_location='cpu', weights_only=True))
    return read_run_state(path)
