from .feature_task import FeatureTask
from .gather import BATCHES, gather_with_grad
from .hooks import FeatureHook, check_input_size, pool_features, probe_feature_dim
from .icd_loss import ICD_NEGATIVES, ICDLoss, icd_terms
from .logit_losses import default_temperature, dist_loss, dkd_loss, kd_loss, standardize_logits
from .methods import LOGIT_LOSSES, METHOD_WEIGHTS, METHODS, Method, logit_loss_of, resolve_method
from .models import (
    check_model_name, create_student, create_student_ema, create_teacher, fixed_size_kwargs, is_hub_or_local,
    load_weights_file, teacher_source)
from .protocol import DistillationTask
from .task import ICDDistillationTask, ICDTrainableModule, create_distiller
from .teacher import ICDTeacher
