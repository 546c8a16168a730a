"""timm's own distillation tasks, run by this tool's loop so they can be compared in one tool.

``--method feature`` is ``FeatureTask``: ``timm.task.FeatureDistillationTask`` (CE plus the MSE between the student's
pooled pre-logits, projected to the teacher's width, and the teacher's). ``--method token`` (timm's
``--kd-distill-type token``) is ``TokenTask``: ``timm.task.TokenDistillationTask``, for a student with a distillation
token and head (DeiT's distilled models): CE on the class head, KL to the teacher (or CE to its argmax) on the
distillation head. Each adds what ``protocol.DistillationTask`` asks of a distiller; the losses are timm's,
unchanged. Both are declared in the table of terms (``terms.py``).
"""
import logging
from typing import Any, Dict, Mapping, Optional, Sequence

import torch
import torch.nn as nn
from timm.task import FeatureDistillationTask, TokenDistillationTask
from timm.utils import unwrap_model

from ..base import UserError

_logger = logging.getLogger(__name__)

TOKEN_TEMPERATURE = 1.0  # timm's TokenDistillationTask default


class _TimmTask:
    """What a timm distillation task needs to be a timm_icd distiller (mixed in before the timm class)."""
    method = ''

    def _adopt(self, teacher_model: nn.Module, student_mean: Optional[Sequence[float]],
               student_std: Optional[Sequence[float]]) -> None:
        self._teacher_classes = unwrap_model(teacher_model).num_classes
        with torch.no_grad():
            if student_mean is not None:
                self.student_mean.copy_(torch.tensor(student_mean).view_as(self.student_mean))
            if student_std is not None:
                self.student_std.copy_(torch.tensor(student_std).view_as(self.student_std))

    @property
    def teacher_classes(self) -> int:
        return self._teacher_classes

    def set_epoch(self, epoch: int) -> None:
        """timm's loss does not change over epochs."""

    def _record(self, **own) -> Dict[str, Any]:
        """The loss as distillation.json records it; the distillation term's weight is the 'kd' weight."""
        return {'method': self.method, 'method_title': self.title,
                'loss_weights': {'task': self.task_loss_weight, 'kd': self.distill_loss_weight, 'icd': 0.0},
                'logit_loss': None, 'kd_temperature': None, 'kd_standardize': None, 'dkd': None, 'dist': None,
                'icd': None, **own}

    @torch.no_grad()
    def teacher_logits(self, input: torch.Tensor) -> torch.Tensor:
        """Teacher logits for a student-normalised batch (to measure the teacher)."""
        return self.teacher(self.teacher.normalize_input(input, self.student_mean, self.student_std))

    def _parts(self, loss: torch.Tensor, output: torch.Tensor, task_loss: torch.Tensor,
               distill_loss: torch.Tensor) -> Dict[str, torch.Tensor]:
        """timm's loss parts under this tool's names (the distillation term is the run's ``loss_kd`` column)."""
        zero = loss.new_zeros(()).detach()
        return {'loss': loss, 'output': output, 'loss_ce': task_loss.detach(), 'loss_kd': distill_loss.detach(),
                'loss_icd': zero, 'tau': zero}

    def remove_hooks(self) -> None:
        """timm's tasks put no hooks on the models."""


class FeatureTask(_TimmTask, FeatureDistillationTask):
    """timm's FeatureDistillationTask as a timm_icd distiller.

    Args:
        student_model, teacher_model: timm models (the teacher may predict another label space: only its pre-logit
            features are used).
        criterion_kwargs: For timm's ``create_classification_loss`` (label smoothing, Mixup soft targets).
        task_loss_weight, kd_loss_weight: CE and feature-MSE weights (timm's rule when None: ``resolve_method``).
        student_mean, student_std: Normalisation of the student's batches (the teacher's input is re-normalised).
        verbose: Log the task's set-up.
        terms: The table's parameters (``{name: params}``); timm's feature task has none.
    """
    method = 'feature'
    title = "timm's feature distillation (pooled pre-logit MSE)"

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
            terms: Optional[Mapping[str, Any]] = None,
    ):
        super().__init__(student_model, teacher_model, criterion_kwargs=criterion_kwargs,
                         distill_loss_weight=kd_loss_weight, task_loss_weight=task_loss_weight, verbose=verbose)
        self._adopt(teacher_model, student_mean, student_std)
        if verbose:
            _logger.info(f'Method feature (timm.task.FeatureDistillationTask): loss = {self.task_loss_weight} * ce + '
                         f'{self.distill_loss_weight} * feature MSE')

    @property
    def student(self) -> nn.Module:
        """The bare student model (no DDP or compile wrapper)."""
        return unwrap_model(self.trainable_module).student

    def loss_record(self) -> Dict[str, Any]:
        return self._record()

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        out = super().forward(input, target)
        return self._parts(out['loss'], out['output'], out['task_loss'], out['kd_loss'])

    def convert_sync_batchnorm(self) -> 'FeatureTask':
        """The student's BatchNorm as SyncBatchNorm (see ``ICDDistillationTask.convert_sync_batchnorm``)."""
        module = unwrap_model(self.trainable_module)
        module.student = nn.SyncBatchNorm.convert_sync_batchnorm(module.student)
        return self


class TokenTask(_TimmTask, TokenDistillationTask):
    """timm's TokenDistillationTask as a timm_icd distiller: a student with a distillation token (DeiT distilled).

    Args:
        student_model: A timm model with ``set_distilled_training`` (e.g. ``deit_tiny_distilled_patch16_224``).
        teacher_model: A timm model of the dataset's classes.
        criterion_kwargs, task_loss_weight, kd_loss_weight, student_mean, student_std, verbose: As ``FeatureTask``.
        terms: The table's parameters: ``token`` (``TokenParams``: soft or hard) and ``kd`` (its temperature;
            None: ``temperature``, timm's 1).
        temperature: The soft term's temperature when ``terms`` gives none.
    """
    method = 'token'
    title = "timm's token distillation (DeiT's distillation head)"

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
            terms: Optional[Mapping[str, Any]] = None,
            temperature: float = TOKEN_TEMPERATURE,
    ):
        if not hasattr(unwrap_model(student_model), 'set_distilled_training'):
            raise UserError(f'--method token trains a distillation token, which student '
                            f'{type(unwrap_model(student_model)).__name__} does not have: use a distilled DeiT '
                            f'(e.g. deit_tiny_distilled_patch16_224) or --method kd.')
        token = (terms or {}).get('token')
        kd = (terms or {}).get('kd')
        if kd is not None and kd.temperature is not None:
            temperature = float(kd.temperature)
        super().__init__(student_model, teacher_model, criterion_kwargs=criterion_kwargs,
                         distill_type=getattr(token, 'distill_type', 'soft'), distill_loss_weight=kd_loss_weight,
                         task_loss_weight=task_loss_weight, temperature=temperature, verbose=verbose)
        self._adopt(teacher_model, student_mean, student_std)

    @property
    def student(self) -> nn.Module:
        """The bare student model (no DDP or compile wrapper); in eval mode it averages its two heads."""
        return unwrap_model(self.trainable_module)

    def loss_record(self) -> Dict[str, Any]:
        return self._record(kd_temperature=self.temperature if self.distill_type == 'soft' else None,
                            token={'distill_type': self.distill_type})

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        out = super().forward(input, target)
        return self._parts(out['loss'], out['output'], out['task_loss'], out['distill_loss'])

    def convert_sync_batchnorm(self) -> 'TokenTask':
        """A ViT student has no BatchNorm; any it has becomes SyncBatchNorm."""
        self.trainable_module = nn.SyncBatchNorm.convert_sync_batchnorm(self.trainable_module)
        return self
