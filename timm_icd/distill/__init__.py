from .feature_task import FeatureTask, TokenTask
from .gather import BATCHES, gather_with_grad
from .hooks import FeatureHook, check_input_size, pool_features, probe_feature_dim
from .icd_loss import ICD_NEGATIVES, ICDLoss, icd_terms
from .label_space import LabelSpace, imagenet_label_names, match_label_space, read_label_map
from .logit_losses import dist_loss, dkd_loss, kd_loss, standardize_logits
from .methods import (
    METHODS, Method, auto_adapts, auto_summary, logit_loss_of, method_names, resolve_method, timm_methods)
from .models import (
    check_model_name, create_student, create_student_ema, create_teacher, fixed_size_kwargs, is_hub_or_local,
    load_checkpoint_into, load_weights_file, reindex_classes, set_classifier, teacher_source)
from .probe import ProbeFit, fit_linear_probe
from .protocol import DistillationTask
from .task import ICDDistillationTask, ICDTrainableModule, LogitTerm, create_distiller
from .teacher import ICDTeacher
from .terms import (
    LOGIT_LOSSES, METHOD_WEIGHTS, TERMS, DISTParams, DKDParams, ICDParams, KDParams, LossTerm, TokenParams,
    default_temperature, load_plugins, method_table, method_title, param_problems, params_of, register_loss)
