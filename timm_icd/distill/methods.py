"""Which loss terms a run trains with, and their weights: decided here, in ``resolve_method``, and nowhere else.

    loss = task_loss_weight * CE + kd_loss_weight * LOGIT + icd_loss_weight * ICD

The methods and their default weights are combinations of the table of terms (``terms.py``): LOGIT is the method's
logit term (Hinton KD, DKD, DIST, or a registered one); ``feature`` (and ``token``) are timm's own tasks, run for
comparison. A logit term needs a teacher that predicts the dataset's classes; ``auto`` adds one only then.
"""
import logging
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

from ..base import UserError
from .label_space import ADAPTED, REINDEXED, LabelSpace, match_label_space
from .terms import LOGIT_LOSSES, METHOD_WEIGHTS, TERMS, TIMM, method_title

_logger = logging.getLogger(__name__)

METHODS = tuple(METHOD_WEIGHTS)  # the package's own methods (registered terms add theirs to METHOD_WEIGHTS)


def method_names() -> Tuple[str, ...]:
    """Every ``--method`` choice but auto: the table's combinations, then timm's own tasks."""
    return tuple(METHOD_WEIGHTS) + timm_methods()


def timm_methods() -> Tuple[str, ...]:
    """The methods a timm task runs (``feature``, ``token``), from the table of terms."""
    return tuple(t.name for t in TERMS.values() if t.kind == TIMM)


# What ``auto`` uses, as the pre-registered study decided it (benchmarks/results/study.md, "What the results decide",
# by benchmarks/results/protocol.md's rule); tests/test_study.py holds these to study_decision.json and the runs
STUDY = 'benchmarks/results/study.md'
AUTO_SAME_SPACE = 'icd+kd'  # the teacher predicts the dataset's classes
AUTO_SAME_SPACE_WHY = ('the pre-registered study established that ICD adds to KD (icd+kd - kd +0.88 points, Holm p '
                       '0.046) but not that it adds to DIST')
# The teacher predicts other classes and --teacher-adapt (auto: a linear probe) fitted it a head for the dataset's:
# what auto trains with then. 'vanilla' means auto does not adapt the teacher (no teacher pass is paid).
AUTO_ADAPTED = AUTO_SAME_SPACE
AUTO_ADAPTED_WHY = ('its adapted head predicts them, so auto makes the same-space choice; no study has yet tested an '
                    'adapted teacher against training alone (the second pre-registered study does: protocol2.md, C3)')
AUTO_ACROSS_SPACES = 'vanilla'  # the teacher predicts other classes and is not adapted: no logit term is possible
AUTO_ACROSS_SPACES_WHY = ('no feature method is established across label spaces: in the pre-registered study icd - '
                          'vanilla was -0.48 points (Holm p 1.0), so the teacher is not used; --method icd still '
                          'distills its features')


def auto_adapts() -> bool:
    """Whether ``auto`` has ``--teacher-adapt auto`` fit a teacher of other classes a head (``AUTO_ADAPTED``)."""
    return AUTO_ADAPTED != 'vanilla'


def auto_summary() -> str:
    """What ``auto`` chooses, in one sentence (``--method``'s help)."""
    other = (f'{AUTO_ADAPTED} after adapting it (--teacher-adapt), {AUTO_ACROSS_SPACES} with --teacher-adapt off'
             if auto_adapts() else AUTO_ACROSS_SPACES)
    return (f"{AUTO_SAME_SPACE} with a teacher of the dataset's classes; with one of other classes, {other} (the "
            f"log says why; docs/methods.md)")


@dataclass(frozen=True)
class Method:
    """A resolved method: its loss terms and weights, and why it was chosen (for the log)."""
    name: str
    task_loss_weight: float
    kd_loss_weight: float
    icd_loss_weight: float
    logit_loss: Optional[str]
    reason: str

    @property
    def uses_teacher(self) -> bool:
        return self.kd_loss_weight > 0 or self.icd_loss_weight > 0 or self.name in timm_methods()

    @property
    def title(self) -> str:
        """The method in words (the model card's method line)."""
        return method_title(self.name)

    def describe(self) -> str:
        """The loss as a formula, for the log."""
        if self.name in timm_methods():
            return f'{self.task_loss_weight} * ce + {self.kd_loss_weight} * {TERMS[self.name].short}'
        return (f'{self.task_loss_weight} * ce + {self.kd_loss_weight} * {self.logit_loss or "kd"} + '
                f'{self.icd_loss_weight} * icd')


def resolve_method(
        method: str,
        num_classes: int,
        teacher_classes: Optional[int] = None,
        teacher_label_names: Optional[Sequence] = None,
        label_names: Optional[Sequence] = None,
        task_loss_weight: Optional[float] = None,
        kd_loss_weight: Optional[float] = None,
        icd_loss_weight: Optional[float] = None,
        label_space: Optional[LabelSpace] = None,
) -> Method:
    """Resolve ``auto``, check the teacher's label space against the dataset's, and fix the loss weights.

    The teacher predicts the dataset's classes when ``label_space.match_label_space`` says so: the same names (up to
    case, whitespace and ImageNet synsets read as descriptions) in the same order, or as many classes and no names to
    compare. The same classes in another order are refused here: the teacher must be re-indexed first
    (``reindex_classes``, as train_icd.py does). A method with a logit term is refused for a teacher of other
    classes, unless the tool adapted it (``label_space.kind`` 'adapted'). ``auto`` follows the pre-registered studies:
    ``AUTO_SAME_SPACE`` for a teacher of the dataset's classes, ``AUTO_ADAPTED`` for an adapted one,
    ``AUTO_ACROSS_SPACES`` (no teacher term, unless ``icd_loss_weight`` asks for ICD) for one of other classes.

    Args:
        method: 'auto', or one of ``method_names()``.
        num_classes: Classes of the dataset (the student's outputs).
        teacher_classes: The teacher's outputs; None when there is no teacher.
        teacher_label_names, label_names: Class names of the teacher and the dataset, where known.
        task_loss_weight, kd_loss_weight, icd_loss_weight: Overrides of the method's weights.
        label_space: How the teacher's classes relate to the dataset's, where the caller decided it (train_icd.py
            does, after re-indexing or adapting the teacher); None: ``match_label_space`` on the names given.
    """
    if method not in ('auto',) + method_names():
        raise UserError(f"unknown method '{method}': choose one of auto, {', '.join(method_names())}.")
    if method == 'vanilla':
        return Method('vanilla', 1.0 if task_loss_weight is None else float(task_loss_weight), 0.0, 0.0, None,
                      'vanilla: cross-entropy only, no teacher')
    if teacher_classes is None:
        raise UserError(f"method '{method}' needs a teacher: pass --teacher NAME.")
    if method in timm_methods():  # timm's tasks' rule: independent weights, or distill = 1 - task
        term = TERMS[method]
        space = label_space or match_label_space(teacher_classes, num_classes, teacher_label_names, label_names)
        if term.same_label_space and not space.in_dataset_order:
            raise UserError(f"--method {method} needs a teacher that predicts the dataset's classes, but {space.why}: "
                            f"adapt the teacher (--teacher-adapt linear) or use --method feature or icd.")
        task = 1.0 if task_loss_weight is None else float(task_loss_weight)
        distill = float(kd_loss_weight) if kd_loss_weight is not None else (
            1.0 - task if task_loss_weight is not None else 1.0)
        return Method(method, task, distill, 0.0, None, f'{method}: {term.title}')

    space = label_space or match_label_space(teacher_classes, num_classes, teacher_label_names, label_names)
    if space.kind == REINDEXED:
        raise UserError(f'{space.why}: re-index the teacher first (timm_icd.distill.reindex_classes(teacher, '
                        f'{space.index[:3]}...)), as train_icd.py does.')
    same_space = space.in_dataset_order
    if method == 'auto':
        if space.kind == ADAPTED:
            method, reason = AUTO_ADAPTED, (f"auto chose {AUTO_ADAPTED}: {space.why}, and {AUTO_ADAPTED_WHY}")
        elif same_space:
            method, reason = AUTO_SAME_SPACE, (f"auto chose {AUTO_SAME_SPACE}: the teacher predicts the dataset's "
                                               f"{num_classes} classes, and {AUTO_SAME_SPACE_WHY} ({STUDY})")
        else:
            method, reason = AUTO_ACROSS_SPACES, (f"auto chose {AUTO_ACROSS_SPACES}: {space.why}, so logit KD is "
                                                  f"impossible, and {AUTO_ACROSS_SPACES_WHY} ({STUDY})")
            if method == 'vanilla' and icd_loss_weight:  # an ICD weight asks for the ICD term: honour it
                method, reason = 'icd', (f'auto chose icd: {space.why}, and --icd-loss-weight {icd_loss_weight} asks '
                                         f'for ICD')
    else:
        reason = f'{method} as asked'
    if method in LOGIT_LOSSES and TERMS[LOGIT_LOSSES[method]].same_label_space and not same_space:
        raise UserError(f"--method {method} needs a teacher that predicts the dataset's classes, but {space.why}: "
                        f"adapt the teacher (--teacher-adapt linear, what auto does), say which output is which "
                        f"class (--teacher-label-map FILE, --same-label-space), or use --method icd.")
    defaults = METHOD_WEIGHTS[method]
    ce, kd, icd = (float(w) if w is not None else d
                   for w, d in zip((task_loss_weight, kd_loss_weight, icd_loss_weight), defaults))
    if kd > 0 and not same_space:
        raise UserError(f"a KD weight of {kd} needs a teacher that predicts the dataset's classes, but {space.why}; "
                        f"set --kd-loss-weight 0 or adapt the teacher (--teacher-adapt linear).")
    return Method(method, ce, kd, icd, LOGIT_LOSSES.get(method, 'kd') if kd > 0 else None, reason)


def logit_loss_of(method: str) -> Optional[str]:
    """The logit term a method name carries ('kd', 'dkd', 'dist'), or None (flags check against it)."""
    return LOGIT_LOSSES.get(method)
