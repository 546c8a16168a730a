"""Teacher cache storage (``--teacher-cache DIR``): the teacher's outputs for every (epoch, sample), paid for once.

Every training sample's augmentation is a pure function of (data seed, epoch, row index) (``data/sources.py``,
``data/augment.py``), so the teacher's view of a sample in an epoch is too, whatever the student, its ICD settings, its
initialisation, the batch size or the process count. The cache stores, per epoch and row, the teacher's pooled
feature (fp16, or int8 with a per-row scale: ``--cache-features int8``) and its logits (fp16, or with
``--cache-topk K`` the K largest in fp32 plus the log-sum-exp, from which the other classes share the remaining mass).

Layout: ``DIR/manifest.json`` (what the cache is valid for, and which epochs are complete) and per epoch
``DIR/epoch-0003/{features,scale,logits,topk_index,lse,written}.npy``: numpy arrays opened as memory maps. Memory
maps because reads are random rows (each process gathers its own batch's rows, in shuffled order) and writes are
random rows from several processes at once: a gather from a memory map reads only those rows, and the page cache
holds what is hot. safetensors would load whole tensors (or contiguous slices), and one file per sample would cost a
file open per sample.

Writing is crash-safe by construction: rows go into the epoch's files as the batches pass (with ``written`` set after
the row), and only when every row of the epoch is written, flushed, and checked does the main process add the epoch
to the manifest (written atomically). A run killed while writing leaves its epoch out of the manifest: a resumed run
rewrites the rows after its last checkpoint (the same values), another run recomputes the epoch. A reader uses only
complete epochs, so a cache is never silently wrong: mismatched settings are refused naming the field.

Several runs (different students, the same data settings; on several machines where the file system has working
``flock``, as Linux NFS does) may use one folder at the same time (``claims.py``): every manifest change is a
read-modify-write under ``DIR/.lock`` that adds this run's epoch to what the manifest holds now, temporary files carry
the writer's pid and a random part, and an epoch is computed by the run that claimed it (``DIR/.claim-epoch-NNNN``,
made under the lock; the processes of one run share its claim). A run that reaches an epoch another live run has
claimed waits for it (polling every second) and replays it. A claim whose writer is gone (its pid, on the same
machine; a heartbeat 5 minutes old, elsewhere) is taken over: the new writer keeps the rows already in the files
(each is what the teacher gives for that row), writes the rows it trains on again and fills the rest. A writer whose
claim was taken over after a stall does not mark the epoch complete; should its late writes change the files after
the new holder stored their checksums, the first run to use the epoch finds the CRC32 differs, drops the epoch and
computes it again (``integrity.py``): still never silently wrong.

Wait rather than compute one's own rows (and merge), measured (``benchmarks/cache_concurrency.py``, two runs started
together on 2 CPU cores, resnet18 teacher, 3 epochs, ``benchmarks/results/teacher_cache.md``): waiting ran the
teacher 3 epochs in all against 6, and used 31.4 and 36.7 CPU-s against 38.0 and 41.3 (two sessions); wall times
(21 s against 43 s, then 72 s against 67 s) followed the load other processes put on the machine, not the mode.
In steady state the waiting run trails the claimant by one cached epoch (it replays epoch e while the claimant
computes e + 1), so it ends about one cached epoch after it: 3.5 s at 224 px in the table there, against 13 s of
teacher per epoch that every run computing its own would pay again. The price: a fast student that shares a folder
with a slower one trains at the slower one's pace for the epochs the slower one claims.

Batch-level augmentations (Mixup, CutMix, random erasing) make the teacher's input depend on the rest of the batch,
and a stream's sample order depends on the process count: those are refused with a cache.
"""
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import datasets
import numpy as np
import torch
import torch.nn as nn

from ..base import UserError, unique_tmp, write_text_atomic
from ..data import InputStage
from .claims import LOCK, STALE_S, Claim, locked, read_claim, why_free
from .integrity import MANIFEST, epoch_checksums, read_manifest

_logger = logging.getLogger(__name__)

VERSION = 1
FEATURE_DTYPES = ('fp16', 'int8')


def weights_hash(model: nn.Module) -> str:
    """sha256 of a model's parameters and buffers (names, dtypes, shapes and bytes), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f'{name}:{tensor.dtype}:{tuple(tensor.shape)}'.encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b'')
    return digest.hexdigest()


def dataset_fingerprint(ds, image_column: str, label_column: str) -> str:
    """sha1 of a split's length, its labels and the encoded bytes of 16 rows spread over it (cheap, and it changes
    with the files, the order and the split; ``datasets``' own fingerprints are random for in-memory datasets)."""
    digest = hashlib.sha1(str(len(ds)).encode())
    digest.update(np.asarray(ds[label_column], dtype=np.int64).tobytes())
    raw = ds.cast_column(image_column, datasets.Image(decode=False)) \
        if isinstance(ds.features[image_column], datasets.Image) else ds
    for index in np.linspace(0, len(ds) - 1, num=min(16, len(ds)), dtype=np.int64):
        value = raw[int(index)][image_column]
        digest.update(value['bytes'] if isinstance(value, dict) and value.get('bytes') else repr(value).encode())
    return digest.hexdigest()


class TeacherCache:
    """One cache folder: its manifest and the memory-mapped arrays of its epochs.

    Args:
        root: The folder.
        manifest: Its manifest (``create_or_open`` reads or writes it).
    """

    def __init__(self, root: Path, manifest: dict):
        self.root, self.manifest = Path(root), manifest
        self.rows, self.dim, self.classes = manifest['rows'], manifest['feature_dim'], manifest['num_classes']
        self.features, self.topk = manifest['storage']['features'], manifest['storage']['topk']
        self._open: Dict[int, Dict[str, np.ndarray]] = {}
        self.verified = set()  # complete epochs whose checksums this process has checked (``runtime.ensure_epoch``)
        self.claims: Dict[int, Claim] = {}  # epochs this process computes for the other runs (main process)

    @classmethod
    def create_or_open(cls, root: Path, valid_for: dict, storage: dict, rows: int, feature_dim: int,
                       num_classes: int, is_main: bool) -> 'TeacherCache':
        """Open the cache at ``root`` if it is valid for these settings, refusing in one line if not; else start one.

        Only the main process writes the manifest; call ``sync`` on every process before using the cache.
        """
        root = Path(root)
        path = root / MANIFEST
        shape = {'rows': rows, 'feature_dim': feature_dim, 'num_classes': num_classes}
        manifest = read_manifest(root)
        if manifest is None and is_main:  # start it, unless another run does at the same moment
            root.mkdir(parents=True, exist_ok=True)
            with locked(root):
                manifest = read_manifest(root)
                if manifest is None:
                    if any(p.name != LOCK for p in root.iterdir()):
                        raise UserError(f'--teacher-cache {root} is a folder without a cache manifest; name a new or '
                                        f'empty one.')
                    manifest = {'version': VERSION, 'valid_for': valid_for, **shape, 'storage': storage, 'epochs': [],
                                'checksums': {}, 'teacher_metrics': None}
                    write_text_atomic(path, json.dumps(manifest, indent=1))
        if manifest is not None:
            if manifest.get('version') != VERSION:
                raise UserError(f'--teacher-cache {root} has format version {manifest.get("version")}, this tool '
                                f'writes {VERSION}: use another folder.')
            for key, value in {**valid_for, **shape}.items():
                saved = manifest['valid_for'].get(key) if key in valid_for else manifest.get(key)
                if json.loads(json.dumps(value)) != saved:
                    hint = ' (a teacher made without --teacher-checkpoint or pretrained weights is drawn from ' \
                           '--seed: save it and pass --teacher-checkpoint)' if key == 'teacher_weights' else ''
                    raise UserError(f'--teacher-cache {root} was written for another {key} ({_short(saved)}, this '
                                    f'run: {_short(value)}){hint}; use another cache folder or the settings it was '
                                    f'written with.')
            if manifest['storage'] != storage:
                raise UserError(f"--teacher-cache {root} stores {_short(manifest['storage'])}, this run asks for "
                                f"{_short(storage)} (--cache-features, --cache-topk): drop them or use another folder.")
            return cls(root, manifest)
        # another process of this run (the main one starts the cache first)
        return cls(root, {'version': VERSION, 'valid_for': valid_for, **shape, 'storage': storage, 'epochs': [],
                          'checksums': {}, 'teacher_metrics': None})

    def complete(self, epoch: int) -> bool:
        return epoch in self.manifest['epochs']

    def claim_epoch(self, epoch: int, stale_after: float = STALE_S) -> Union[str, dict]:
        """Main process: 'complete' when ``epoch`` is (another run may just have completed it), 'claimed' when this
        process now computes it (no claim, a claim whose writer is gone, or its own), else the live claim (a dict:
        who writes it). Reads the manifest again; takes the lock only to claim (a read-only cache stays readable)."""
        self.reload()
        if self.complete(epoch):
            return 'complete'
        with locked(self.root):
            self.reload()
            if self.complete(epoch):
                return 'complete'
            if epoch in self.claims and self.claims[epoch].held():
                return 'claimed'
            claim = read_claim(self.root, epoch)
            reason = why_free(claim, stale_after) if claim is not None else None
            if claim is not None and reason is None:
                return claim
            if reason:
                _logger.warning(f'Teacher cache {self.root}: the claim on epoch {epoch} by pid {claim.get("pid")} on '
                                f'{claim.get("host")} is void ({reason}); this run computes the epoch.')
            self.claims[epoch] = Claim(self.root, epoch)
            self.claims[epoch].write()
            return 'claimed'

    def release_claims(self) -> None:
        """Give up every claim this process holds (a run that stops early: the others need not wait for it)."""
        if self.claims:
            with locked(self.root):
                for claim in self.claims.values():
                    claim.release()
            self.claims = {}

    def array_specs(self) -> Dict[str, Tuple[tuple, np.dtype]]:
        """Name -> (shape, dtype) of the arrays every epoch holds."""
        arrays = {'written': ((self.rows,), np.uint8),
                  'features': ((self.rows, self.dim), np.int8 if self.features == 'int8' else np.float16)}
        if self.features == 'int8':
            arrays['scale'] = ((self.rows,), np.float32)
        if self.topk:
            # float32: the remaining mass is 1 minus the top K's, which fp16 logits would round away
            arrays.update(logits=((self.rows, self.topk), np.float32), topk_index=((self.rows, self.topk), np.int32),
                          lse=((self.rows,), np.float32))
        else:
            arrays['logits'] = ((self.rows, self.classes), np.float16)
        return arrays

    def epoch_dir(self, epoch: int) -> Path:
        return self.root / f'epoch-{epoch:04d}'

    def prepare_epoch(self, epoch: int, is_main: bool) -> None:
        """Create the epoch's files (main process; keeps rows a killed run wrote). Call ``sync`` before writing."""
        if is_main and not self.complete(epoch):
            folder = self.epoch_dir(epoch)
            folder.mkdir(parents=True, exist_ok=True)
            for name, (shape, dtype) in self.array_specs().items():
                path = folder / f'{name}.npy'
                if not path.exists():
                    tmp = unique_tmp(path)
                    np.lib.format.open_memmap(tmp, mode='w+', dtype=dtype, shape=shape).flush()
                    os.replace(tmp, path)

    def _maps(self, epoch: int, mode: str) -> Dict[str, np.ndarray]:
        if epoch not in self._open or (mode == 'r+' and self._open[epoch]['written'].mode == 'r'):
            self._open = {epoch: {name: np.load(self.epoch_dir(epoch) / f'{name}.npy', mmap_mode=mode)
                                  for name in self.array_specs()}}
        return self._open[epoch]

    def write(self, epoch: int, index: torch.Tensor, logits: torch.Tensor, features: Optional[torch.Tensor]) -> None:
        """Store the teacher's outputs for rows ``index`` of ``epoch`` (device tensors are copied to the host)."""
        maps = self._maps(epoch, 'r+')
        rows = index.cpu().numpy()
        if features is None:
            raise RuntimeError('a teacher cache needs the teacher features (ICDTeacher with need_features=True)')
        features = features.detach().float().cpu()
        if self.features == 'int8':
            scale = features.abs().amax(dim=1).clamp(min=1e-12) / 127
            maps['features'][rows] = (features / scale[:, None]).round().clamp(-127, 127).to(torch.int8).numpy()
            maps['scale'][rows] = scale.numpy()
        else:
            maps['features'][rows] = features.half().numpy()
        logits = logits.detach().float().cpu()
        if self.topk:
            values, top = logits.topk(self.topk, dim=1)
            maps['logits'][rows], maps['topk_index'][rows] = values.numpy(), top.int().numpy()
            maps['lse'][rows] = torch.logsumexp(logits, dim=1).numpy()
        else:
            maps['logits'][rows] = logits.half().numpy()
        maps['written'][rows] = 1

    def read(self, epoch: int, index: torch.Tensor, device: torch.device,
             written: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """(logits, features) of rows ``index`` of a complete epoch (or rows this process has just ``written``),
        float32 on ``device``."""
        maps = self._maps(epoch, 'r+' if written else 'r')
        rows = index.cpu().numpy()
        features = torch.from_numpy(np.ascontiguousarray(maps['features'][rows])).to(device, non_blocking=True)
        features = features.float()
        if self.features == 'int8':
            features = features * torch.from_numpy(maps['scale'][rows]).to(device)[:, None]
        values = torch.from_numpy(np.ascontiguousarray(maps['logits'][rows])).to(device).float()
        if not self.topk:
            return values, features
        # the other classes share the mass the top K leave, equally: softmax(logits) is exact on the top K
        lse = torch.from_numpy(maps['lse'][rows]).to(device)
        rest = (1 - torch.exp(values - lse[:, None]).sum(dim=1)).clamp(min=1e-12)
        fill = lse + torch.log(rest / max(self.classes - self.topk, 1))
        logits = fill[:, None].expand(-1, self.classes).clone()
        logits.scatter_(1, torch.from_numpy(maps['topk_index'][rows]).to(device).long(), values)
        return logits, features

    def missing(self, epoch: int) -> np.ndarray:
        """Rows of ``epoch`` not written yet."""
        return np.flatnonzero(self._maps(epoch, 'r+')['written'] == 0)

    def finish_epoch(self, epoch: int, is_main: bool, teacher_metrics: Optional[dict] = None) -> None:
        """Flush the epoch; the main process checks every row is written and adds the epoch to the manifest."""
        for array in self._maps(epoch, 'r+').values():
            array.flush()
        if not is_main:
            return
        missing = self.missing(epoch)
        if len(missing):
            raise RuntimeError(f'teacher cache epoch {epoch} lacks {len(missing)} rows (first {missing[:5]})')
        checksums = epoch_checksums(self, epoch)  # before the lock: a large epoch takes seconds
        with locked(self.root):  # read-modify-write: the epochs other runs completed meanwhile stay
            self.reload()
            claim = self.claims.pop(epoch, None)
            if claim is not None and not claim.held():  # taken over after a stall: the new holder completes it
                _logger.warning(f'Teacher cache {self.root}: another run took over epoch {epoch} from this one; it '
                                f'marks the epoch complete.')
                claim.release()
                return
            if not self.complete(epoch):
                self.manifest['epochs'] = sorted(set(self.manifest['epochs']) | {epoch})
                self.manifest.setdefault('checksums', {})[str(epoch)] = checksums
                if teacher_metrics and not self.manifest.get('teacher_metrics'):
                    self.manifest['teacher_metrics'] = teacher_metrics
                write_text_atomic(self.root / MANIFEST, json.dumps(self.manifest, indent=1))
                self.verified.add(epoch)
            if claim is not None:
                claim.release()

    def reload(self) -> None:
        """Read the manifest again (on processes other than the one that wrote it)."""
        self.manifest = read_manifest(self.root)
        self._open = {}

    def forget(self, epoch: int) -> None:
        """Let go of the memory maps of ``epoch`` (its files are about to be replaced)."""
        self._open.pop(epoch, None)
        self.verified.discard(epoch)

    def bytes_per_row(self) -> int:
        return sum(int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
                   for shape, dtype in self.array_specs().values())


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + '...'


class CachedTeacher(nn.Module):
    """Stands in for the task's ``ICDTeacher``: replays the cache in complete epochs, else runs the live teacher and
    records what it gives. ``select(epoch, index)`` names the rows of the batch the next call is for.

    The teacher's input for the epochs it records comes from the training batch before the student's normalisation
    (``stage.unit``), normalised for the teacher (``ICDTeacher.prepare_unit``): whichever student writes an epoch,
    with whatever mean and std, the stored values are the same to the bit (re-normalising the student's batch would
    round differently per student).

    Args:
        live: The teacher (its weights are what the cache was keyed on).
        cache: The cache.
        stage: The training batches' input stage (``Pipeline.train_stage``); it is told to keep each batch's
            un-normalised values.
    """

    def __init__(self, live: nn.Module, cache: TeacherCache, stage: InputStage):
        super().__init__()
        self.live, self.cache, self.stage = live, cache, stage
        stage.keep_unit = True
        self._batch: Optional[Tuple[int, torch.Tensor]] = None

    @property
    def model(self) -> nn.Module:
        return self.live.model

    @model.setter
    def model(self, model: nn.Module) -> None:  # the task's compile() swaps in the compiled teacher
        self.live.model = model

    @property
    def num_classes(self) -> int:
        return self.live.num_classes

    @property
    def input_size(self):
        return self.live.input_size

    @property
    def layer(self):
        return self.live.layer

    def select(self, epoch: int, index: torch.Tensor) -> None:
        self._batch = (epoch, index)

    def replaying(self) -> bool:
        return self._batch is not None and self.cache.complete(self._batch[0])

    def prepare_input(self, input: torch.Tensor) -> torch.Tensor:
        if self._batch is None:  # not a training batch (the teacher's eval): from the student's batch
            return self.live.prepare_input(input)
        return input if self.replaying() else self.unit_input(len(input))

    def unit_input(self, rows: int) -> torch.Tensor:
        """The teacher's input for the training batch the stage finished last (``rows`` long)."""
        unit = self.stage.unit
        if unit is None or len(unit) != rows:
            raise RuntimeError('the teacher cache records from the input stage\'s last batch, which is not this one')
        self.stage.unit = None
        return self.live.prepare_unit(unit)

    def forward(self, input: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self._batch is None:  # not a training batch (the teacher's eval): the live teacher
            return self.live(input)
        epoch, index = self._batch
        self._batch = None
        if self.cache.complete(epoch):
            return self.cache.read(epoch, index, input.device)
        logits, features = self.live(input)
        self.cache.write(epoch, index, logits, features)
        # train on what was stored: the run that writes the cache and every run that reads it see the same values
        return self.cache.read(epoch, index, input.device, written=True)

    def set_student_norm(self, *args) -> None:
        self.live.set_student_norm(*args)

    def remove_hooks(self) -> None:
        self.live.remove_hooks()


def sample_indices(batch: Sequence) -> torch.Tensor:
    """The dataset rows of a training batch: (index, label) in memory, (image, label, index) from the loader."""
    return batch[2] if len(batch) > 2 else batch[0]
