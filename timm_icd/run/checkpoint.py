"""Run folders and crash-safe checkpoints.

A checkpoint is ``accelerator.save_state`` (student + ICD heads, optimizer, grad scaler, every process's RNG
states) plus the schedule's state and ``run_state.json`` (epoch, step, best metric, metric history). It is written
to ``checkpoints/.tmp-NAME`` and renamed to ``checkpoints/NAME`` only when complete, so a kill while saving leaves
the previous checkpoint intact; old ones are pruned only after that rename.

A checkpoint damaged after it was written (a truncated or garbled file, one gone) is passed over by
``--resume auto``: ``load_first`` tries the complete checkpoints newest first, every process agreeing, and warns
naming each one that does not load.
"""
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import List, Optional, Tuple

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


def find_checkpoints(output: Path) -> List[Path]:
    """The complete checkpoints of a run folder, newest first."""
    root = output / CHECKPOINTS
    if not root.is_dir():
        return []
    complete = [(step, p) for p in root.iterdir() if (step := checkpoint_step(p)) is not None]
    return [p for _, p in sorted(complete, reverse=True)]


def find_latest_checkpoint(output: Path) -> Optional[Path]:
    """The newest complete checkpoint of a run folder, or None."""
    found = find_checkpoints(output)
    return found[0] if found else None


def resolve_resume(output: Path, resume: str) -> List[Path]:
    """The checkpoints ``--resume`` may continue from, to try in order: 'auto' gives the run folder's complete ones,
    newest first (none: start fresh); a path gives that one alone. Each has a readable run state."""
    if not resume:
        return []
    if resume != 'auto':
        path = Path(resume)
        if not (path / RUN_STATE).is_file():
            raise UserError(f'--resume {resume}: not a complete checkpoint folder (no {RUN_STATE}).')
        _read_or_refuse(path)
        return [path]
    candidates = []
    for path in find_checkpoints(output):
        try:
            read_run_state(path)
            candidates.append(path)
        except (OSError, ValueError) as e:
            _logger.warning(f'Checkpoint {path.name} is damaged ({RUN_STATE}: {first_line(e, 120)}); passing over it.')
    if not candidates:
        results = [name for name in ('summary.csv', 'student', 'student_best') if (output / name).exists()]
        if find_checkpoints(output):
            raise UserError(f'--resume auto: no checkpoint in {output / CHECKPOINTS} has a readable {RUN_STATE}; pass '
                            f'--overwrite to start over.')
        if results:
            raise UserError(f'--resume auto: {output} holds results ({", ".join(results)}) but no complete '
                            f'checkpoint to continue from; pass --overwrite to start over.')
        _logger.info(f'--resume auto: no complete checkpoint in {output}, starting from the beginning.')
    return candidates


def _read_or_refuse(path: Path) -> dict:
    try:
        return read_run_state(path)
    except (OSError, ValueError) as e:
        raise UserError(f'--resume {path}: its {RUN_STATE} is unreadable ({first_line(e, 120)}).') from e


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
    state = json.loads((path / RUN_STATE).read_text())
    if not isinstance(state, dict) or not isinstance(state.get('fingerprint'), dict):
        raise ValueError(f'{RUN_STATE} is not a run state')
    return state


def load_checkpoint(accelerator, path: Path, scheduler) -> dict:
    """Restore model, optimizer, RNG and schedule from ``path`` and return its run state."""
    accelerator.load_state(str(path))
    scheduler.load_state_dict(torch.load(path / SCHEDULER_STATE, map_location='cpu', weights_only=True))
    return read_run_state(path)


def load_first(accelerator, candidates: List[Path], scheduler) -> Tuple[Path, dict]:
    """Load the first of ``candidates`` that loads on every process; warn naming each one passed over.

    A checkpoint counts as loaded only if every process loaded its part (a process's own RNG file can be the damaged
    one), so all continue from the same one; a later one that loads overwrites whatever a failed one left behind.
    """
    reasons = []
    for path in candidates:
        try:
            state, error = load_checkpoint(accelerator, path, scheduler), ''
        except Exception as e:  # safetensors, torch.load and pickle each fail on damage in their own way
            state, error = None, first_line(e, 160)
        failed = torch.tensor(float(state is None), device=accelerator.device)
        if accelerator.num_processes > 1:
            failed = accelerator.reduce(failed, reduction='sum')
        if failed.item() == 0:
            return path, state
        reasons.append(f'{path.name}: {error or "damaged on another process"}')
        _logger.warning(f'Checkpoint {path} does not load ({error or "on another process"}); '
                        + ('trying the one before it.' if path != candidates[-1] else 'none older is left.'))
    raise UserError(f'cannot resume: no checkpoint loads ({"; ".join(reasons)}); pass --overwrite to start over '
                    f'(the damaged checkpoints are left as they are).')
