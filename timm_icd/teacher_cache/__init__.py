from .runtime import fill_missing, finish_epoch, open_for_run
from .storage import MANIFEST, CachedTeacher, TeacherCache, dataset_fingerprint, sample_indices, weights_hash
