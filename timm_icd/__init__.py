"""timm_icd: distill any timm teacher into any timm student with Invariant Consistency Distillation (ICD)."""
__version__ = '0.1.0'

from .errors import UserError
from .hub import load_student, push_student
from .hooks import FeatureHook, pool_features, probe_feature_dim
from .loss import ICDLoss, icd_terms, kd_loss
from .models import create_student, create_teacher, load_weights_file
from .task import METHOD_WEIGHTS, METHODS, ICDDistillationTask, ICDTeacher, ICDTrainableModule, create_distiller

__all__ = [
    'ICDDistillationTask', 'ICDLoss', 'ICDTeacher', 'ICDTrainableModule', 'FeatureHook', 'METHODS', 'METHOD_WEIGHTS',
    'UserError', 'create_distiller', 'create_student', 'create_teacher', 'icd_terms', 'kd_loss',
    'load_student', 'load_weights_file', 'pool_features', 'probe_feature_dim', 'push_student',
]
