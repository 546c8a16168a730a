"""What ``distillation.json`` says about how a run made its student; every number in it comes from the run."""
import shlex
import sys
from typing import List, Optional

import timm
import torch

from ..base import __version__
from ..distill import is_hub_or_local, teacher_source


def run_record(r, argv: Optional[List[str]], metrics: dict, ema: bool = False) -> dict:
    """The record of run ``r`` (a ``build.Run``) after the epoch whose summary row is ``metrics``.

    With ``ema`` it describes the EMA student: its own accuracy, and which weights the folder holds.
    """
    m, task, data, state = r.config.model, r.task, r.data, r.state
    teacher = None
    if task.teacher is not None:
        hub_id = None  # the Hub repository the teacher's weights came from
        if m.teacher.startswith('hf-hub:'):
            hub_id = m.teacher[len('hf-hub:'):]
        elif m.teacher_pretrained and not m.teacher_checkpoint and not is_hub_or_local(m.teacher):
            hub_id = task.teacher.model.pretrained_cfg.get('hf_hub_id')
        teacher = {
            'name': m.teacher, 'source': teacher_source(m.teacher, m.teacher_pretrained, m.teacher_checkpoint),
            'architecture': task.teacher.model.pretrained_cfg.get('architecture'),
            'hf_hub_id': hub_id, 'num_classes': task.teacher_classes,
            'top1': (state.teacher or {}).get('top1'), 'top5': (state.teacher or {}).get('top5'),
            'measured_with': "the student's eval preprocessing" if state.teacher else None,
            'adapted': _adapted(r.adaptation),
        }
    student_hub_id = None  # the weights the student started from, where they came from the Hub
    if m.student.startswith('hf-hub:'):
        student_hub_id = m.student[len('hf-hub:'):]
    elif m.pretrained and not m.student_checkpoint and not is_hub_or_local(m.student):
        student_hub_id = task.student.pretrained_cfg.get('hf_hub_id')
    return {
        'student': m.student,
        'architecture': task.student.pretrained_cfg.get('architecture'),
        'parameters': sum(p.numel() for p in task.student.parameters()),  # the bare student's, no ICD heads
        'student_hf_hub_id': student_hub_id,
        'teacher': teacher,
        **task.loss_record(),
        'dataset': {'name': data.name, 'train_split': data.train_split, 'eval_split': data.eval_split,
                    'num_classes': data.num_classes, 'train_rows': data.train_rows, 'eval_rows': data.eval_rows,
                    'streamed': data.streaming or None,
                    'skipped_images': data.skipped_images or None},
        'epochs': r.num_epochs,
        'epoch': metrics.get('epoch'),
        'weights': (f'EMA of the student (decay {r.config.train.model_ema_decay})' if ema
                    else 'the student at the final epoch'),
        'top1': metrics.get('eval_ema_top1' if ema else 'eval_top1'),
        'top5': metrics.get('eval_ema_top5' if ema else 'eval_top5'),
        'best_top1': None if ema else state.best_top1,
        'best_epoch': None if ema else state.best_epoch,
        'wall_seconds': state.seconds,
        'command': 'train_icd.py ' + shlex.join(sys.argv[1:] if argv is None else argv),
        'versions': {'timm_icd': __version__, 'timm': timm.__version__, 'torch': torch.__version__},
    }


def _adapted(adaptation: Optional[dict]) -> Optional[dict]:
    """How the teacher was adapted to the dataset's classes (``run/adapt.py``'s record), or None."""
    if not adaptation:
        return None
    fit, features = adaptation['fit'], adaptation['features']
    return {'mode': adaptation['valid_for']['mode'], 'folder': adaptation['folder'], 'l2': fit['l2'],
            'holdout_top1': fit['holdout_top1'], 'holdout_rows': fit['holdout_rows'], 'features': features,
            'seconds': adaptation['seconds']['total']}
