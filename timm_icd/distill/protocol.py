"""What the training loop, checkpoints and run records need of a distiller, written down.

``ICDDistillationTask`` (every method of this tool), ``FeatureTask`` and ``TokenTask`` (timm's
``FeatureDistillationTask`` and ``TokenDistillationTask``) satisfy it; a new task that does can be trained by
``timm_icd.run`` unchanged.
"""
from typing import Any, Dict, Optional, Protocol, runtime_checkable

import torch
import torch.nn as nn


@runtime_checkable
class DistillationTask(Protocol):
    """A ``timm.task.TrainingTask`` that trains a student, with what the run around it reads.

    Attributes:
        method: The resolved method name ('icd+kd', 'feature', ...), for logs and records.
        trainable_module: What the optimizer trains and Accelerate prepares (the student, plus any heads).
        teacher: The frozen teacher module, or None.
    """
    method: str
    trainable_module: nn.Module
    teacher: Optional[nn.Module]

    @property
    def student(self) -> nn.Module:
        """The bare student model (no DDP or compile wrapper): what is saved and evaluated."""

    @property
    def teacher_classes(self) -> Optional[int]:
        """The teacher's number of outputs, or None without a teacher."""

    def __call__(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """'loss' to back-propagate, 'output' (student logits) and the detached parts of ``run.state.LOSS_PARTS``
        it has (missing parts are logged as 0)."""

    def set_epoch(self, epoch: int) -> None:
        """The epoch (from 0) that starts now, before its first step (for terms that change over epochs)."""

    def train(self, mode: bool = True) -> 'DistillationTask':
        """Training mode for the student; the teacher stays in eval mode."""

    def eval(self) -> 'DistillationTask':
        ...

    def to(self, *args: Any, **kwargs: Any) -> 'DistillationTask':
        ...

    def teacher_logits(self, input: torch.Tensor) -> torch.Tensor:
        """Teacher logits for a student-normalised batch (to measure the teacher)."""

    def get_eval_model(self) -> nn.Module:
        """The student to evaluate (compiled, when the task was)."""

    def compile(self, backend: str = 'inductor', mode: Optional[str] = None, **kwargs: Any) -> nn.Module:
        """torch.compile the student (and teacher) in place; returns the eval model."""

    def convert_sync_batchnorm(self) -> 'DistillationTask':
        """The student's BatchNorm as torch's SyncBatchNorm (before DDP wraps it)."""

    def remove_hooks(self) -> None:
        """Leave the student and teacher as plain timm models."""

    def loss_record(self) -> Dict[str, Any]:
        """The loss as distillation.json records it: method, loss_weights, kd_temperature, kd_standardize, icd."""
