"""timm_icd: distill any timm teacher into any timm student with Invariant Consistency Distillation (ICD).

The package's layers, lowest first (``docs/architecture.md``): ``base`` (errors, files, version); ``distill``
(losses, hooks, teacher, tasks, models), ``data`` (sources, pipeline, streaming, shards), ``publish`` (student
folders, Hub, reports); ``teacher_cache``; ``run`` (flags, the loop, checkpoints); ``cli`` (the commands).
"""
from .base import UserError, __version__
from .distill import (
    METHOD_WEIGHTS, METHODS, DistillationTask, FeatureHook, ICDDistillationTask, ICDLoss, ICDTeacher,
    ICDTrainableModule, Method, create_distiller, create_student, create_teacher, icd_terms, kd_loss,
    load_weights_file, method_table, pool_features, probe_feature_dim, register_loss, resolve_method)
from .publish import load_student, push_student

__all__ = [
    'DistillationTask', 'FeatureHook', 'ICDDistillationTask', 'ICDLoss', 'ICDTeacher', 'ICDTrainableModule',
    'METHODS', 'METHOD_WEIGHTS', 'Method', 'UserError', 'create_distiller', 'create_student', 'create_teacher',
    'icd_terms', 'kd_loss', 'load_student', 'load_weights_file', 'method_table', 'pool_features',
    'probe_feature_dim', 'push_student', 'register_loss', 'resolve_method',
]
