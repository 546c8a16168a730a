"""``--method feature``: timm's own feature distillation, run by this tool's loop so both can be compared in one tool.

``FeatureTask`` is ``timm.task.FeatureDistillationTask`` (CE plus the MSE between the student's pooled pre-logits,
projected to the teacher's width, and the teacher's) with what ``protocol.DistillationTask`` asks of a distiller;
the loss itself is timm's, unchanged.
"""
import logging
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn
from timm.task import FeatureDistillationTask
from timm.utils import unwrap_model

_logger = logging.getLogger(__name__)


class FeatureTask(FeatureDistillationTask):
    """timm's FeatureDistillationTask as a timm_icd distiller.

    Args:
        student_model, teacher_model: timm models (the teacher may predict another label space: only its pre-logit
            features are used).
        criterion_kwargs: For timm's ``create_classification_loss`` (label smoothing, Mixup soft targets).
        task_loss_weight, kd_loss_weight: CE and feature-MSE weights (timm's rule when None: ``resolve_method``).
        student_mean, student_std: Normalisation of the student's batches (the teacher's input is re-normalised).
        verbose: Log the task's set-up.
    """
    method = 'feature'

    def __init__(
            self,
            student_model: nn.Module,
            teacher_model: nn.Module,
            criterion_kwargs: Optional[Dict[str, Any]] = None,
            task_loss_weight: Optional[float] = None,
            kd_loss_weight: Optional[float] = None,
            student_mean: Optional[Sequence[float]] = None,
            student_std: Optional[Sequence[float]] = None,
            verbose: bool = True,
    ):
        super().__init__(student_model, teacher_model, criterion_kwargs=criterion_kwargs,
                         distill_loss_weight=kd_loss_weight, task_loss_weight=task_loss_weight, verbose=verbose)
        self._teacher_classes = unwrap_model(teacher_model).num_classes
        with torch.no_grad():
            if student_mean is not None:
                self.student_mean.copy_(torch.tensor(student_mean).view_as(self.student_mean))
            if student_std is not None:
                self.student_std.copy_(torch.tensor(student_std).view_as(self.student_std))
        if verbose:
            _logger.info(f'Method feature (timm.task.FeatureDistillationTask): loss = {self.task_loss_weight} * ce + '
                         f'{self.distill_loss_weight} * feature MSE')

    @property
    def student(self) -> nn.Module:
        """The bare student model (no DDP or compile wrapper)."""
        return unwrap_model(self.trainable_module).student

    @property
    def teacher_classes(self) -> int:
        return self._teacher_classes

    def set_epoch(self, epoch: int) -> None:
        """timm's loss does not change over epochs."""

    def loss_record(self) -> Dict[str, Any]:
        """The loss as distillation.json records it; the feature MSE's weight is the 'kd' weight."""
        return {'method': self.method,
                'loss_weights': {'task': self.task_loss_weight, 'kd': self.distill_loss_weight, 'icd': 0.0},
                'logit_loss': None, 'kd_temperature': None, 'kd_standardize': None, 'dkd': None, 'dist': None,
                'icd': None}

    @torch.no_grad()
    def teacher_logits(self, input: torch.Tensor) -> torch.Tensor:
        """Teacher logits for a student-normalised batch (to measure the teacher)."""
        return self.teacher(self.teacher.normalize_input(input, self.student_mean, self.student_std))

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """timm's loss; its parts under this tool's names (the feature MSE is the run's ``loss_kd`` column)."""
        out = super().forward(input, target)
        zero = out['loss'].new_zeros(()).detach()
        return {'loss': out['loss'], 'output': out['output'], 'loss_ce': out['task_loss'].detach(),
                'loss_kd': out['kd_loss'].detach(), 'loss_icd': zero, 'tau': zero}

    def convert_sync_batchnorm(self) -> 'FeatureTask':
        """The student's BatchNorm as SyncBatchNorm (see ``ICDDistillationTask.convert_sync_batchnorm``)."""
        module = unwrap_model(self.trainable_module)
        module.student = nn.SyncBatchNorm.convert_sync_batchnorm(module.student)
        return self

    def remove_hooks(self) -> None:
        """timm's task puts no hooks on the models."""
