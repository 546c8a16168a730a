"""The run's settings, read once from the parsed flags into frozen, typed sections.

``run_config(args)`` is made right after the flags are parsed and checked (``flags.parse_and_validate``); from then
on ``build``, the training loop, the record and the cache writer read its fields, never the argparse namespace. The
sections follow what reads them: the models, the method (the loss terms and their weights), the data and its input
pipeline, the teacher cache, the run folder and what leaves it, and the training schedule. Values keep the types the
parser gives them (lists stay lists), so nothing downstream sees another number or type. ``flags`` keeps every
parsed flag, read-only, for the three places that record what the user typed: ``args.yaml``, the trackers'
hyperparameters and the resume fingerprint (``build.fingerprint``), byte for byte as before.
"""
import argparse
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import yaml
from timm.optim import optimizer_kwargs
from timm.scheduler import scheduler_kwargs

from ..data import AugmentConfig, PipelineConfig
from .flags import TEACHER_DTYPES, augment_config, data_seed, loop_config, term_params
from .loop import LoopConfig


@dataclass(frozen=True)
class ModelConfig:
    """The student and the teacher: names, weights, input sizes, the layers ICD reads and the teacher's classes."""
    student: str
    pretrained: Optional[bool]
    student_checkpoint: Optional[str]
    drop: float
    drop_path: Optional[float]
    input_size: Optional[Sequence[int]]
    mean: Optional[Sequence[float]]
    std: Optional[Sequence[float]]
    interpolation: str
    crop_pct: Optional[float]
    student_layer: Optional[str]
    teacher: str
    teacher_pretrained: bool
    teacher_checkpoint: Optional[str]
    teacher_input_size: Optional[Sequence[int]]
    teacher_dtype: str  # the flag's name ('float32', 'bf16', ...); ``teacher_torch_dtype`` is the torch dtype
    teacher_layer: Optional[str]
    teacher_label_map: Optional[str]
    same_label_space: bool
    teacher_adapt: str
    teacher_adapt_augment: int
    teacher_adapt_dir: Optional[str]
    teacher_adapt_epochs: int
    teacher_adapt_lr: Optional[float]

    @property
    def teacher_torch_dtype(self) -> Optional[torch.dtype]:
        return TEACHER_DTYPES[self.teacher_dtype]


@dataclass(frozen=True)
class MethodConfig:
    """The method flag (``auto``, ``icd+kd``, ...), the weight overrides, each term's parameters and label
    smoothing."""
    method: str
    task_loss_weight: Optional[float]
    kd_loss_weight: Optional[float]
    icd_loss_weight: Optional[float]
    terms: Mapping[str, Any]  # {term name: its parameters dataclass} (``flags.term_params``)
    smoothing: float


@dataclass(frozen=True)
class DataConfig:
    """The dataset, its augmentation (per sample and Mixup/CutMix) and how the input pipeline batches it."""
    dataset: str
    train_split: str
    val_split: Optional[str]
    image_column: Optional[str]
    label_column: Optional[str]
    val_fraction: float
    streaming: bool
    num_classes: Optional[int]
    train_num_samples: Optional[int]
    val_num_samples: Optional[int]
    skip_bad_images: bool
    seed: int  # --data-seed, else --seed
    augment: AugmentConfig
    mixup: float
    cutmix: float
    cutmix_minmax: Optional[Sequence[float]]
    mixup_prob: float
    mixup_switch_prob: float
    mixup_mode: str
    input_pipeline: str
    batch_size: int
    validation_batch_size: Optional[int]
    workers: int
    shuffle_buffer: int
    grad_accum_steps: int
    decode_scale: str
    decode_device: str

    @property
    def mixup_active(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None

    @property
    def eval_batch_size(self) -> int:
        return self.validation_batch_size or self.batch_size

    def pipeline(self, rank: int, world: int, with_index: bool, jitter_on_device: bool) -> PipelineConfig:
        """The data layer's ``PipelineConfig`` for process ``rank`` of ``world``."""
        return PipelineConfig(
            kind=self.input_pipeline, batch_size=self.batch_size, eval_batch_size=self.validation_batch_size,
            workers=self.workers, seed=self.seed, with_index=with_index, shuffle_buffer=self.shuffle_buffer,
            grad_accum_steps=self.grad_accum_steps, rank=rank, world=world, skip_bad_images=self.skip_bad_images,
            decode_scale=self.decode_scale, decode_device=None if self.decode_device == 'cpu' else self.decode_device,
            jitter_on_device=jitter_on_device)


@dataclass(frozen=True)
class CacheConfig:
    """The teacher cache: its folder (None: no cache) and what it stores."""
    root: Optional[str]
    features: str
    topk: int


@dataclass(frozen=True)
class OutputConfig:
    """The run folder, checkpoints, the student folders, the Hub push and the trackers."""
    output: str
    experiment: str
    resume: str
    overwrite: bool
    keep_checkpoints: int
    checkpoint_steps: int
    save_best: bool
    push_to_hub: Optional[str]
    push_ema: bool
    hub_private: bool
    hub_revision: Optional[str]
    hub_collection: Optional[str]
    hub_license: Optional[str]
    log_with: Optional[str]
    tracker_project: str


@dataclass(frozen=True)
class TrainConfig:
    """The schedule and the step: epochs, timm's optimizer and scheduler settings, the loop's, EMA, precision, the
    devices' options, preemption."""
    epochs: int
    lr: float
    opt: str
    sched: str
    weight_decay: float
    seed: int
    optimizer: Mapping[str, Any]  # timm's ``optimizer_kwargs`` of the flags
    scheduler: Mapping[str, Any]  # timm's ``scheduler_kwargs`` of the flags
    loop: LoopConfig
    model_ema: bool
    model_ema_decay: float
    model_ema_warmup: bool
    mixed_precision: str
    channels_last: bool
    compile: bool
    sync_bn: bool
    dist_bn: str
    grad_checkpointing: bool
    preempt_signal: str
    time_limit: Optional[str]


@dataclass(frozen=True)
class RunConfig:
    """A run's settings, by section; ``flags`` is every parsed flag (read-only) for what records them."""
    model: ModelConfig
    method: MethodConfig
    data: DataConfig
    cache: CacheConfig
    output: OutputConfig
    train: TrainConfig
    flags: Mapping[str, Any]

    def flags_yaml(self) -> str:
        """The run's flags as YAML (what timm's train.py writes to args.yaml)."""
        return yaml.safe_dump(dict(self.flags), default_flow_style=False)

    def tracker_hyperparameters(self) -> dict:
        """The run's flags as tracker hyperparameters (scalars only: lists become strings, None is left out)."""
        return {k: (str(v) if isinstance(v, (list, tuple)) else v) for k, v in self.flags.items()
                if v is not None and isinstance(v, (int, float, str, bool, list, tuple))}

    def with_flags(self, **flags: Any) -> 'RunConfig':
        """The config of these flags changed (e.g. the teacher's fine-tuning run: ``run.train.teacher_fine_tuner``)."""
        return run_config(argparse.Namespace(**{**self.flags, **flags}))


RunConfigOrFlags = Union[RunConfig, argparse.Namespace]  # what the Python entry points take (``run``, ``write_ahead``)


def _fields(cls, args: argparse.Namespace, **given: Any) -> dict:
    """``cls``'s fields read from the flags of the same name, except those ``given``."""
    return {name: given[name] if name in given else getattr(args, name) for name in cls.__dataclass_fields__}


def run_config(args: RunConfigOrFlags) -> RunConfig:
    """The run's config from parsed and checked flags (``flags.parse_and_validate``); a ``RunConfig`` is returned as
    it is, so the Python entry points (``run``, ``write_ahead``) take either."""
    if isinstance(args, RunConfig):
        return args
    model = ModelConfig(**_fields(ModelConfig, args))
    method = MethodConfig(**_fields(MethodConfig, args, terms=MappingProxyType(term_params(args))))
    data = DataConfig(**_fields(DataConfig, args, seed=data_seed(args), augment=augment_config(args)))
    cache = CacheConfig(root=args.teacher_cache, features=args.cache_features, topk=args.cache_topk)
    output = OutputConfig(**_fields(OutputConfig, args))
    train = TrainConfig(**_fields(TrainConfig, args, optimizer=MappingProxyType(optimizer_kwargs(args)),
                                  scheduler=MappingProxyType(scheduler_kwargs(args)), loop=loop_config(args)))
    return RunConfig(model, method, data, cache, output, train, MappingProxyType(dict(vars(args))))
