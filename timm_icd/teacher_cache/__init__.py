from .integrity import check_epoch, drop_epoch, read_manifest
from .runtime import acquire_epoch, ensure_epoch, fill_missing, finish_epoch, open_for_run, release_claims, verify
from .storage import MANIFEST, CachedTeacher, TeacherCache, dataset_fingerprint, sample_indices, weights_hash
