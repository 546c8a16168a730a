"""The ICD distiller: a ``timm.task.TrainingTask`` that trains a student from a frozen teacher.

    loss = task_loss_weight * CE(student, y) + kd_loss_weight * LOGIT(student, teacher) + icd_loss_weight * ICD

LOGIT is the method's logit term from the table of terms (``terms.py``): Hinton KD, DKD (ramped up over
``dkd_warmup_epochs``, as its authors do), DIST, or a registered one; the task runs it as a ``LogitTerm`` module.

One trainable module holds the student and the ICD heads (so DDP syncs the heads with the student); the teacher
sits outside it, in eval mode with ``requires_grad=False``, runs under ``no_grad`` and is never wrapped for DDP.
Which terms and weights: ``methods.resolve_method``.
"""
import logging
from dataclasses import asdict
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.models import group_parameters
from timm.task import DistillationTeacher, TrainingTask, resolve_classification_loss
from timm.utils import unwrap_model

from .hooks import FeatureHook, probe_feature_dim
from ..base import UserError
from .gather import gather_with_grad
from .icd_loss import ICDLoss
from .methods import Method, resolve_method
from .terms import TERMS, KDParams, LossTerm, default_temperature, param_problems, record_of, split_settings
from .models import create_student, create_teacher
from .teacher import ICDTeacher

_logger = logging.getLogger(__name__)


class ICDTrainableModule(nn.Module):
    """The student and the ICD heads in one module, so a single DDP wrapper syncs both.

    ``forward(input, teacher_features)`` returns the student logits and, when the ICD term is active, the ICD loss
    dict, all computed inside this forward as DDP expects.
    """

    def __init__(self, student: nn.Module, icd: Optional[ICDLoss] = None, student_layer: Optional[str] = None):
        super().__init__()
        self.student = student
        self.icd = icd
        self.feature_hook = FeatureHook(student, student_layer) if icd is not None else None

    def no_weight_decay(self):
        """The student's own exclusions (e.g. ViT pos_embed, cls_token), as timm's trainable modules forward them."""
        student = unwrap_model(self.student)
        return {f'student.{n}' for n in student.no_weight_decay()} if hasattr(student, 'no_weight_decay') else set()

    def group_matcher(self, coarse: bool = False):
        """The student's layer groups for --layer-decay; the ICD heads join the last group (with the classifier)."""
        student = unwrap_model(self.student)
        if not hasattr(student, 'group_matcher'):
            return {}
        layer_of = group_parameters(student, student.group_matcher(coarse=coarse), reverse=True)
        last = max(layer_of.values(), default=0)
        return lambda name: layer_of.get(name[len('student.'):], last) if name.startswith('student.') else last

    def forward(
            self,
            input: torch.Tensor,
            teacher_features: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Optional[Dict[str, torch.Tensor]]]:
        logits = self.student(input)
        if self.feature_hook is None:
            return logits, None
        features = self.feature_hook.pop()
        if teacher_features is None:
            return logits, None
        return logits, self.icd(features, teacher_features)

    def remove_hooks(self) -> None:
        if self.feature_hook is not None:
            self.feature_hook.remove()
            self.feature_hook = None


class LogitTerm(nn.Module):
    """A logit term of the table with its parameters and the shared temperature, as the task runs it.

    ``forward(logits, teacher_logits, target)`` is the unweighted term; ``ramp(epoch)`` its weight's factor in that
    epoch (``warmup_epochs`` in its params: linear up to 1, as DKD's authors do; their epochs count from 1).
    """

    def __init__(self, term: LossTerm, params: Any, temperature: float, standardize: bool):
        super().__init__()
        self.term, self.params, self.temperature, self.standardize = term, params, temperature, standardize

    def ramp(self, epoch: int) -> float:
        warmup = getattr(self.params, 'warmup_epochs', 0)
        return min((epoch + 1) / warmup, 1.0) if warmup > 0 else 1.0

    def forward(self, logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.term.hard_labels and target.ndim != 1:
            raise UserError(f'{self.term.name.upper()} {self.term.hard_labels}, which needs hard labels: drop '
                            f'--mixup/--cutmix or use another method.')
        if getattr(self.params, 'batch', 'local') == 'global':  # a batch-level term over every process's batch
            logits, teacher_logits = gather_with_grad(logits), gather_with_grad(teacher_logits)
        return self.term.loss(logits, teacher_logits, target, self.temperature, self.standardize, self.params)


class ICDDistillationTask(TrainingTask):
    """Distill a frozen teacher into a student with CE + KD + ICD.

    ``forward(input, target)`` returns a dict with 'loss' (to back-propagate), 'output' (student logits, for
    metrics), and the detached parts 'loss_ce', 'loss_kd' (the logit term, unweighted), 'loss_icd' and 'tau' (parts
    of a method that does not use them are 0).

    Args:
        student_model: The student (a timm model).
        teacher_model: The teacher (a timm model, or an ``ICDTeacher``); None only for ``method='vanilla'``.
        method: A ``Method`` from ``resolve_method``, or its name (``METHODS``, or 'auto': icd+kd when the
            teacher has the student's classes, else plain cross-entropy, as the pre-registered study decided; see
            ``resolve_method``), resolved here.
        criterion: Classification loss; created with timm's ``create_classification_loss(**criterion_kwargs)``
            when None (so ``smoothing`` and Mixup/CutMix soft targets work as in timm).
        task_loss_weight, kd_loss_weight, icd_loss_weight: Override the method's weights (see METHOD_WEIGHTS); used
            only when ``method`` is a name.
        terms: Each term's parameters, ``{name: params}`` (``terms.KDParams`` for the temperature and logit
            standardisation every logit term shares, ``DKDParams``, ``DISTParams``, ``ICDParams``, or a registered
            term's); terms not given keep their defaults.
        **term_settings: The same as keywords ``TERM_FIELD``: ``kd_temperature`` (None: ``default_temperature`` of
            the resolved term: 4; 1 for DIST; 2 with ``kd_standardize``), ``kd_standardize`` (Z-score both logits
            per sample first, Sun et al., CVPR 2024), ``dkd_alpha``, ``dkd_beta`` (2, the study's choice on
            validation; the authors' 8 on CIFAR-100), ``dkd_warmup_epochs``, ``dist_beta``, ``dist_gamma``,
            ``dist_batch`` ('local': DIST's intra-class term over each process's batch; 'global': over every
            process's), ``icd_feat_dim``, ``icd_alpha``, ``icd_init_t``, ``icd_max_tau``, ``icd_negatives`` (see
            ``ICDLoss``); they override ``terms``.
        student_layer, teacher_layer: Module names to take features from; None takes each classifier's input.
        student_input_size: (C, H, W) of the student's batches; None uses its pretrained_cfg.
        teacher_input_size: (C, H, W) the teacher expects; None uses its pretrained_cfg.
        student_mean, student_std: Normalisation of the student's batches; None uses its pretrained_cfg.
        teacher_dtype: Dtype to run the teacher in, e.g. torch.bfloat16.
    """

    def __init__(
            self,
            student_model: nn.Module,
            teacher_model: Union[nn.Module, ICDTeacher, None] = None,
            method: Union[str, Method] = 'auto',
            criterion: Optional[nn.Module] = None,
            criterion_kwargs: Optional[Dict[str, Any]] = None,
            task_loss_weight: Optional[float] = None,
            kd_loss_weight: Optional[float] = None,
            icd_loss_weight: Optional[float] = None,
            terms: Optional[Mapping[str, Any]] = None,
            student_layer: Optional[str] = None,
            teacher_layer: Optional[str] = None,
            student_input_size: Optional[Sequence[int]] = None,
            teacher_input_size: Optional[Sequence[int]] = None,
            student_mean: Optional[Sequence[float]] = None,
            student_std: Optional[Sequence[float]] = None,
            teacher_dtype: Optional[torch.dtype] = None,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
            **term_settings,
    ):
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        params = split_settings(term_settings, terms)
        for name, value in params.items():
            problems = param_problems(name, value)
            if problems:
                raise ValueError(problems[0])
        student = unwrap_model(student_model)
        teacher_module = teacher_model.model if isinstance(teacher_model, DistillationTeacher) else teacher_model
        teacher_module = unwrap_model(teacher_module) if teacher_module is not None else None
        if not isinstance(method, Method):
            method = resolve_method(
                method, student.num_classes, teacher_classes=getattr(teacher_module, 'num_classes', None),
                task_loss_weight=task_loss_weight, kd_loss_weight=kd_loss_weight, icd_loss_weight=icd_loss_weight)
        self.spec = method
        self.method = method.name
        self.task_loss_weight, self.kd_loss_weight, self.icd_loss_weight = (
            method.task_loss_weight, method.kd_loss_weight, method.icd_loss_weight)
        self.params = params
        shared = params.get('kd', KDParams())
        self.kd_standardize = shared.standardize
        self.kd_temperature = float(shared.temperature) if shared.temperature is not None else default_temperature(
            method.logit_loss, shared.standardize)
        self.logit = LogitTerm(TERMS[method.logit_loss], params.get(method.logit_loss, TERMS[
            method.logit_loss].params()), self.kd_temperature, self.kd_standardize) if method.logit_loss else None
        self.logit_ramp = 1.0
        self.set_epoch(0)
        self.student_layer, self.teacher_layer = student_layer, teacher_layer
        if verbose:  # a warning when a given teacher goes unused (auto across label spaces)
            log = _logger.warning if method.name == 'vanilla' and teacher_module is not None else _logger.info
            log(f'Method {method.reason}; loss = {method.describe()}'
                + (', kd with logit standardisation' if self.kd_standardize and self.kd_loss_weight > 0 else ''))

        uses_icd = self.icd_loss_weight > 0
        self.teacher: Optional[ICDTeacher] = None
        if self.kd_loss_weight > 0 or uses_icd:
            if isinstance(teacher_model, ICDTeacher):
                self.teacher = teacher_model
            else:
                self.teacher = ICDTeacher(
                    teacher_module, teacher_input_size, layer=teacher_layer, need_features=uses_icd,
                    dtype=teacher_dtype)
            self.teacher.to(device=self.device)

        student_cfg = getattr(student, 'pretrained_cfg', {})
        student_input_size = tuple(student_input_size or student_cfg.get('input_size', (3, 224, 224)))
        self.student_input_size = student_input_size
        icd = None
        if uses_icd:
            student_dim = probe_feature_dim(student, student_input_size, student_layer, role='student')
            teacher_dim = probe_feature_dim(
                self.teacher.model, self.teacher.input_size or student_input_size, self.teacher.layer, role='teacher')
            p = params.get('icd', TERMS['icd'].params())
            icd = ICDLoss(student_dim, teacher_dim, **asdict(p), device=self.device)
            if verbose:
                _logger.info(f'ICD heads: student {student_dim} -> {p.feat_dim}, teacher {teacher_dim} -> '
                             f'{p.feat_dim}, alpha={p.alpha}, negatives={p.negatives}')
        self.trainable_module = ICDTrainableModule(student_model, icd, student_layer)
        self.criterion = resolve_classification_loss(criterion, self.device, criterion_kwargs=criterion_kwargs)

        mean = torch.tensor(student_mean or student_cfg.get('mean', (0.485, 0.456, 0.406)), device=self.device)
        std = torch.tensor(student_std or student_cfg.get('std', (0.229, 0.224, 0.225)), device=self.device)
        self.register_buffer('student_mean', mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer('student_std', std.view(1, -1, 1, 1), persistent=False)
        if self.teacher is not None:
            self.teacher.set_student_norm(self.student_mean, self.student_std)

    @property
    def student(self) -> nn.Module:
        """The bare student model (no DDP or compile wrapper)."""
        return unwrap_model(self.trainable_module).student

    @property
    def icd(self) -> Optional[ICDLoss]:
        """The ICD loss module with its heads and t, or None when the method has no ICD term."""
        return unwrap_model(self.trainable_module).icd

    def train(self, mode: bool = True) -> 'ICDDistillationTask':
        """Set training mode while keeping the teacher in evaluation mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def teacher_logits(self, input: torch.Tensor) -> torch.Tensor:
        """Teacher logits for a student-normalised batch (used to measure the teacher's accuracy)."""
        return self.teacher(self.teacher.prepare_input(input))[0]

    @property
    def teacher_classes(self) -> Optional[int]:
        """The teacher's number of outputs, or None without a teacher."""
        return self.teacher.num_classes if self.teacher is not None else None

    def loss_record(self) -> Dict[str, Any]:
        """The loss as distillation.json records it (method, weights, temperature, ICD settings and final tau)."""
        icd, logit = self.icd, self.spec.logit_loss
        shared = KDParams(self.kd_temperature, self.kd_standardize)  # as resolved
        record = record_of(self.method, logit, {**self.params, 'kd': shared})
        return {
            **record,
            'loss_weights': {'task': self.task_loss_weight, 'kd': self.kd_loss_weight, 'icd': self.icd_loss_weight},
            'icd': None if icd is None else {
                'feat_dim': icd.student_head.out_features, 'alpha': icd.alpha, 'negatives': icd.negatives,
                'max_tau': icd.max_tau, 'tau_final': float(icd.tau.item()),
                'student_layer': self.student_layer, 'teacher_layer': self.teacher_layer},
        }

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Distillation forward pass.

        Args:
            input: Student-normalised batch, B x C x H x W.
            target: Class indices (B) or soft targets (B x classes, from Mixup/CutMix).
        """
        teacher_logits = teacher_features = None
        if self.teacher is not None:
            teacher_logits, teacher_features = self.teacher(self.teacher.prepare_input(input))
        logits, icd_out = self.trainable_module(input, teacher_features)
        loss_ce = self.criterion(logits, target)
        loss = self.task_loss_weight * loss_ce
        zero = loss_ce.new_zeros(()).detach()
        loss_kd = loss_icd = tau = zero
        if self.kd_loss_weight > 0:
            loss_kd = self.logit(logits, teacher_logits, target)
            loss = loss + (self.kd_loss_weight * self.logit_ramp) * loss_kd
        if icd_out is not None:
            loss_icd, tau = icd_out['loss_icd'], icd_out['tau']
            loss = loss + self.icd_loss_weight * loss_icd
        return {
            'loss': loss,
            'output': logits,
            'loss_ce': loss_ce.detach(),
            'loss_kd': loss_kd.detach(),
            'loss_icd': loss_icd.detach(),
            'tau': tau.detach(),
        }

    def set_epoch(self, epoch: int) -> None:
        """Tell the task which epoch (from 0) is starting: the logit term's weight ramps up (``LogitTerm.ramp``)."""
        self.logit_ramp = self.logit.ramp(epoch) if self.logit is not None else 1.0

    def convert_sync_batchnorm(self) -> 'ICDDistillationTask':
        """Replace the student's BatchNorm layers with torch's SyncBatchNorm (before DDP wraps it, as timm does).

        The teacher runs in eval mode on its running statistics and the ICD heads have no BatchNorm: both stay as
        they are. Parameter and buffer names do not change, so checkpoints and the saved student are unaffected.
        """
        module = unwrap_model(self.trainable_module)
        module.student = nn.SyncBatchNorm.convert_sync_batchnorm(module.student)
        return self

    def compile(self, backend: str = 'inductor', mode: Optional[str] = None, **compile_kwargs) -> nn.Module:
        """torch.compile the student (with its heads) and the teacher; hooks are traced with the modules."""
        self.trainable_module = torch.compile(self.trainable_module, backend=backend, mode=mode, **compile_kwargs)
        self.eval_model = torch.compile(self.student, backend=backend, mode=mode, **compile_kwargs)
        if self.teacher is not None:
            self.teacher.model = torch.compile(self.teacher.model, backend=backend, mode=mode, **compile_kwargs)
        return self.eval_model

    def get_eval_model(self, module: Optional[nn.Module] = None, ema: bool = False) -> Optional[nn.Module]:
        if module is None and not ema and hasattr(self, 'eval_model'):
            return self.eval_model
        module = module if module is not None else self.get_trainable_module(ema=ema)
        return unwrap_model(module).student if module is not None else None

    def get_task_state(self, module: Optional[nn.Module] = None, ema: bool = False) -> Dict[str, Any]:
        """The ICD heads and t, which live outside the student's state_dict."""
        module = module if module is not None else self.get_trainable_module(ema=ema)
        icd = unwrap_model(module).icd if module is not None else None
        return {'icd': icd.state_dict()} if icd is not None else {}

    def load_task_state(self, state, strict: bool = True, module: Optional[nn.Module] = None, ema: bool = False):
        if not state or 'icd' not in state:
            return
        module = module if module is not None else self.get_trainable_module(ema=ema)
        unwrap_model(module).icd.load_state_dict(state['icd'], strict=strict)

    def remove_hooks(self) -> None:
        """Remove every hook this task put on the student and the teacher."""
        unwrap_model(self.trainable_module).remove_hooks()
        if self.teacher is not None:
            self.teacher.remove_hooks()


def create_distiller(
        student: Union[str, nn.Module],
        teacher: Union[str, nn.Module, None] = None,
        num_classes: Optional[int] = None,
        method: str = 'auto',
        pretrained_student: Optional[bool] = None,
        pretrained_teacher: bool = True,
        teacher_checkpoint: Optional[str] = None,
        **kwargs,
) -> ICDDistillationTask:
    """Build an ``ICDDistillationTask`` from models or timm names.

    Args:
        student: Student model, or a timm name (then ``num_classes`` is required).
        teacher: Teacher model, or a timm name; None for method 'vanilla'.
        num_classes: Classes of the dataset, for a student (or randomly initialised teacher) created by name.
        method: See ``ICDDistillationTask``.
        pretrained_student: Load pretrained student weights (default: only for hf-hub:/local-dir: names).
        pretrained_teacher: Load the teacher's pretrained weights when created by name.
        teacher_checkpoint: Weights file for a teacher created by name.
        **kwargs: Passed to ``ICDDistillationTask``.

    Example:
        >>> task = create_distiller('resnet18', 'local-dir:runs/teacher/student', num_classes=10)
        >>> out = task(images, labels)
        >>> out['loss'].backward()
    """
    if isinstance(student, str):
        if num_classes is None:
            raise ValueError('num_classes is required to create a student by name.')
        student = create_student(student, num_classes, pretrained=pretrained_student)
    if isinstance(teacher, str):
        teacher = create_teacher(
            teacher, num_classes=unwrap_model(student).num_classes, pretrained=pretrained_teacher,
            checkpoint=teacher_checkpoint)
    return ICDDistillationTask(student, teacher, method=method, **kwargs)
