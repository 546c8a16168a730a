"""Command-line flags of train_icd.py, with timm's train.py names, a YAML ``--config`` and up-front validation.

Everything a user can get wrong in the flags alone is checked here, before any model, dataset or output folder is
touched, and reported as one ``UserError`` line. Beside the commands, only ``config.run_config`` reads the flags: it
turns them into the run's frozen ``RunConfig`` (with ``augment_config``, ``loop_config`` and ``term_params`` here).
"""
import argparse
import logging
import os
import re
from dataclasses import fields
from typing import Any, Dict, List, Optional, Sequence, get_args

import torch
import yaml
from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs

from ..base import UserError
from ..data import DECODE_SCALES, PIPELINES, AugmentConfig, device_decode_reason
from ..distill import (
    TERMS, auto_summary, load_plugins, logit_loss_of, method_names, param_problems, params_of, timm_methods)
from ..publish import check_collection_slug, check_push_target
from .adapt import ADAPT_MODES
from .loop import LoopConfig
from .preempt import DEFAULT_SIGNALS, parse_signals, parse_time_limit

_logger = logging.getLogger(__name__)

MIXED_PRECISION = ('no', 'bf16', 'fp16')
DEFAULT_SHUFFLE_BUFFER = 4096  # --streaming: rows permuted together (~0.5 GB of ImageNet JPEG bytes per process)
TRACKERS = ('tensorboard', 'wandb', 'mlflow', 'all')
LOW_LR_STUDENTS = r'mobilenet|mnasnet|shufflenet|lcnet|ghostnet'  # the paper trains these at lr 0.01, not 0.05
TEACHER_DTYPES = {'float32': None, 'fp32': None, 'bfloat16': torch.bfloat16, 'bf16': torch.bfloat16,
                  'float16': torch.float16, 'fp16': torch.float16}


def str2bool(value: str) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in ('true', '1', 'yes', 'y'):
        return True
    if value.lower() in ('false', '0', 'no', 'n'):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{value}'")


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one ``UserError`` line instead of printing the usage block."""

    def error(self, message: str):
        raise UserError(f'{message} (see --help)')


DESCRIPTION = 'Distill any timm teacher into any timm student with ICD.'


def create_parser(prog: str = 'train_icd.py', description: str = DESCRIPTION) -> argparse.ArgumentParser:
    """The train_icd.py parser (also ``python -m timm_icd cache``'s, under its own name). Flag names follow timm's
    train.py wherever timm has the same setting."""
    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument('-c', '--config', default='', metavar='FILE',
                        help='YAML file whose keys are these flags (dest names, e.g. batch_size); flags win')

    group = parser.add_argument_group('Models')
    group.add_argument('--student', '--model', dest='student', default='mobilenetv3_small_100', metavar='MODEL',
                       help='student: timm name, hf-hub:ORG/NAME or local-dir:PATH (default: mobilenetv3_small_100)')
    group.add_argument('--pretrained', action=argparse.BooleanOptionalAction, default=None,
                       help='start the student from pretrained weights (default: only for hf-hub:/local-dir:)')
    group.add_argument('--student-checkpoint', default=None, metavar='FILE', help='initial student weights')
    group.add_argument('--teacher', '--kd-model-name', dest='teacher', default='resnet50', metavar='MODEL',
                       help='teacher: timm name, hf-hub:ORG/NAME or local-dir:PATH (default: resnet50)')
    group.add_argument('--teacher-pretrained', type=str2bool, default=True, metavar='BOOL',
                       help="load timm's pretrained teacher weights (default: true)")
    group.add_argument('--teacher-checkpoint', default=None, metavar='FILE',
                       help='teacher weights: safetensors or a timm/PyTorch checkpoint (read with weights_only)')
    group.add_argument('--teacher-input-size', type=int, nargs=3, default=None, metavar=('C', 'H', 'W'),
                       help="teacher input size (default: its pretrained config's, or the student's for a "
                            "checkpoint or random teacher)")
    group.add_argument('--teacher-dtype', default='float32', choices=sorted(TEACHER_DTYPES),
                       help='dtype the frozen teacher runs in (default: float32)')
    group.add_argument('--teacher-cache', default=None, metavar='DIR',
                       help="the teacher's outputs per epoch and sample: written by the first run that names DIR "
                            "(or python -m timm_icd cache), read by later runs with the same data settings, which "
                            "then never run the teacher")
    group.add_argument('--cache-features', default='fp16', choices=('fp16', 'int8'),
                       help='--teacher-cache: how teacher features are stored (default: fp16)')
    group.add_argument('--cache-topk', type=int, default=0, metavar='K',
                       help='--teacher-cache: store the K largest teacher logits and the remaining mass (default: '
                            'all logits)')
    group.add_argument('--student-layer', default=None, metavar='NAME',
                       help="student module whose pooled output feeds ICD (default: the classifier's input)")
    group.add_argument('--teacher-layer', default=None, metavar='NAME',
                       help="teacher module whose pooled output feeds ICD (default: the classifier's input)")
    group.add_argument('--drop', type=float, default=0.0, metavar='PCT', help='student dropout rate')
    group.add_argument('--drop-path', type=float, default=None, metavar='PCT', help='student drop path rate')

    group = parser.add_argument_group("The teacher's classes (a teacher of other classes is adapted first)")
    group.add_argument('--teacher-adapt', default='auto', choices=ADAPT_MODES,
                       help="auto (default): a teacher that does not predict the dataset's classes gets a linear "
                            "probe head fitted on its frozen features of the training split (one teacher pass); "
                            "linear: fit one whatever the teacher predicts; finetune: the probe, then "
                            "--teacher-adapt-epochs of training the whole teacher; off: keep the teacher as it is")
    group.add_argument('--teacher-adapt-dir', default=None, metavar='DIR',
                       help='where the adapted teacher is written and reused from, a plain timm folder (default: '
                            'OUT/teacher_adapted); runs with the same teacher, data and settings share it')
    group.add_argument('--teacher-adapt-augment', type=int, default=0, metavar='N',
                       help="features from N passes of the run's training augmentation instead of one pass of the "
                            "eval transform (default: 0, CLIP's linear probe protocol)")
    group.add_argument('--teacher-adapt-epochs', type=int, default=10, metavar='N',
                       help='--teacher-adapt finetune: epochs of training the whole teacher after its linear probe '
                            "(LP-FT), with this tool's --method vanilla and the run's optimizer, schedule, batch size "
                            'and augmentation (default: 10)')
    group.add_argument('--teacher-adapt-lr', type=float, default=None, metavar='LR',
                       help='--teacher-adapt finetune: its learning rate (default: a tenth of --lr)')
    group.add_argument('--teacher-label-map', default=None, metavar='FILE',
                       help="JSON: the teacher output (index or class name) of each dataset class, as a list or "
                            "an object keyed by the dataset's class names; the teacher's logits are re-indexed")
    group.add_argument('--same-label-space', action='store_true',
                       help="the teacher's classes are the dataset's, in its order, whatever their names")

    group = parser.add_argument_group('Method')
    group.add_argument('--method', default='auto', choices=('auto',) + method_names(),
                       help=f"auto (default): {auto_summary()}; "
                            + ', '.join(f'{t.name} ({t.short})' for t in TERMS.values() if t.kind == 'logit')
                            + " are logit terms, icd+X adds ICD to one; "
                            + '; '.join(f"{t.name} is timm's {t.short}" for t in TERMS.values() if t.kind == 'timm'))
    group.add_argument('--task-loss-weight', type=float, default=None, help="CE weight (default: the method's)")
    group.add_argument('--kd-loss-weight', '--distill-loss-weight', dest='kd_loss_weight', type=float, default=None,
                       help="weight of the logit term, KD, DKD or DIST (default: the method's; --distill-loss-weight "
                            "is timm's name)")
    group.add_argument('--kd-distill-type', default=None, choices=('logit', 'feature', 'token'),
                       help="timm train.py's switch: logit is --method kd, feature is --method feature, token is "
                            "--method token")
    group.add_argument('--icd-loss-weight', type=float, default=None, help="ICD weight (default: the method's)")
    add_term_flags(group)
    group.add_argument('--loss-plugin', action='append', default=[], metavar='FILE.py',
                       help='a Python file that registers a loss term (timm_icd.register_loss); repeatable')

    group = parser.add_argument_group('Data')
    group.add_argument('--dataset', '-d', default='digits', metavar='NAME',
                       help='Hub id (or hfds/ID; hfids/ID streams), save_to_disk folder, imagefolder:PATH, '
                            'webdataset:PATH, parquet:PATH (a folder of shards or a glob) or digits (default: digits)')
    group.add_argument('--streaming', action='store_true',
                       help='stream the dataset: each process reads its own shards, shuffled in blocks, resumable')
    group.add_argument('--shuffle-buffer', type=int, default=DEFAULT_SHUFFLE_BUFFER, metavar='N',
                       help=f'--streaming: rows shuffled together (default: {DEFAULT_SHUFFLE_BUFFER})')
    group.add_argument('--train-num-samples', type=int, default=None, metavar='N',
                       help='--streaming: rows in the train split, when the dataset does not say (fixes the epoch)')
    group.add_argument('--val-num-samples', type=int, default=None, metavar='N',
                       help='--streaming: rows in the eval split (for the log only)')
    group.add_argument('--num-classes', type=int, default=None, metavar='N',
                       help='--streaming: number of classes, when the label column does not name them')
    group.add_argument('--train-split', default='train', metavar='NAME', help='train split (default: train)')
    group.add_argument('--val-split', default=None, metavar='NAME',
                       help='eval split (default: validation/valid/val/test, else a hold-out of train; holdout: '
                            'a hold-out of train in any case)')
    group.add_argument('--val-fraction', type=float, default=0.1,
                       help='hold-out fraction when the dataset has no eval split (default: 0.1)')
    group.add_argument('--image-column', default=None, metavar='NAME', help='image column (default: detected)')
    group.add_argument('--label-column', default=None, metavar='NAME', help='label column (default: detected)')
    group.add_argument('--skip-bad-images', action='store_true', help='skip and count images that cannot be read')
    group.add_argument('--input-pipeline', default='auto', choices=PIPELINES,
                       help='memory: decode once, augment batches on the device; loader: per-sample workers; '
                            'auto (default): memory when the data fits and the augmentation allows')
    group.add_argument('--decode-scale', default='auto', choices=DECODE_SCALES,
                       help='auto (default): a JPEG whose random crop is shrunk 2x or more is decoded at 1/2, 1/4 or '
                            '1/8 scale (never fewer pixels than the output); off: every image in full')
    group.add_argument('--decode-device', default='cpu', choices=('cpu', 'cuda'),
                       help='--streaming: cuda decodes the train JPEGs in batches on the GPU (torchvision, nvjpeg) and '
                            'crops and flips them there; cpu (default): the workers decode with PIL')
    group.add_argument('-j', '--workers', type=int, default=min(4, os.cpu_count() or 1),
                       help='data loading processes per training process')
    group.add_argument('--input-size', type=int, nargs=3, default=None, metavar=('C', 'H', 'W'),
                       help="student input size (default: the student's pretrained config)")
    group.add_argument('--mean', type=float, nargs='+', default=None, help='override the normalisation mean')
    group.add_argument('--std', type=float, nargs='+', default=None, help='override the normalisation std')
    group.add_argument('--interpolation', default='', help='eval resize interpolation (default: the model\'s)')
    group.add_argument('--crop-pct', type=float, default=None, help='eval center crop fraction')

    group = parser.add_argument_group('Augmentation and regularization (as in timm)')
    group.add_argument('--no-aug', action='store_true', help='disable training augmentation')
    group.add_argument('--scale', type=float, nargs=2, default=[0.08, 1.0], help='random resized crop scale')
    group.add_argument('--ratio', type=float, nargs=2, default=[3. / 4., 4. / 3.], help='random crop aspect ratio')
    group.add_argument('--hflip', type=float, default=0.5, help='horizontal flip probability')
    group.add_argument('--vflip', type=float, default=0.0, help='vertical flip probability')
    group.add_argument('--color-jitter', type=float, default=0.4, help='color jitter factor')
    group.add_argument('--aa', default=None, help='AutoAugment / RandAugment policy, e.g. rand-m9-mstd0.5')
    group.add_argument('--reprob', type=float, default=0.0, help='random erase probability')
    group.add_argument('--remode', default='pixel', help='random erase mode')
    group.add_argument('--recount', type=int, default=1, help='random erase count')
    group.add_argument('--train-interpolation', default='random', help='training resize interpolation')
    group.add_argument('--mixup', type=float, default=0.0, help='mixup alpha, enabled if > 0')
    group.add_argument('--cutmix', type=float, default=0.0, help='cutmix alpha, enabled if > 0')
    group.add_argument('--cutmix-minmax', type=float, nargs=2, default=None, help='cutmix min/max ratio')
    group.add_argument('--mixup-prob', type=float, default=1.0, help='probability of mixup or cutmix per batch')
    group.add_argument('--mixup-switch-prob', type=float, default=0.5, help='probability of cutmix over mixup')
    group.add_argument('--mixup-mode', default='batch', choices=('batch', 'pair', 'elem'), help='mixup mode')
    group.add_argument('--smoothing', type=float, default=0.0, help='label smoothing (default: 0)')

    group = parser.add_argument_group('Optimizer (timm.optim.create_optimizer_v2)')
    group.add_argument('--opt', default='sgd', help='optimizer name (default: sgd)')
    group.add_argument('--opt-eps', type=float, default=None, help='optimizer epsilon')
    group.add_argument('--opt-betas', type=float, nargs='+', default=None, help='optimizer betas')
    group.add_argument('--momentum', type=float, default=0.9, help='SGD momentum (default: 0.9)')
    group.add_argument('--weight-decay', type=float, default=5e-4, help='weight decay (default: 5e-4)')
    group.add_argument('--layer-decay', type=float, default=None, help='layer-wise lr decay')
    group.add_argument('--clip-grad', type=float, default=None, help='clip gradient norm (default: off)')

    group = parser.add_argument_group('Schedule (timm.scheduler.create_scheduler_v2)')
    group.add_argument('--sched', default='cosine', help='lr schedule (default: cosine)')
    group.add_argument('--sched-on-updates', action='store_true', help='step the schedule every update')
    group.add_argument('--lr', type=float, default=None,
                       help="learning rate (default: the paper's SGD rates, 0.01 for MobileNet/ShuffleNet-style "
                            "students, 0.05 for others)")
    group.add_argument('--warmup-lr', type=float, default=1e-5, help='warmup start lr')
    group.add_argument('--min-lr', type=float, default=0.0, help='lower lr bound')
    group.add_argument('--epochs', type=int, default=100, help='epochs to train (default: 100)')
    group.add_argument('--warmup-epochs', type=int, default=0, help='lr warmup epochs (default: 0)')
    group.add_argument('--warmup-prefix', action='store_true', help='warmup epochs come before --epochs')
    group.add_argument('--cooldown-epochs', type=int, default=0, help='epochs at min_lr after a cycle')
    group.add_argument('--decay-epochs', type=float, default=30, help='step schedule interval')
    group.add_argument('--decay-milestones', type=int, nargs='+', default=[30, 60], help='multistep milestones')
    group.add_argument('--decay-rate', '--dr', type=float, default=0.1, help='lr decay rate')
    group.add_argument('--patience-epochs', type=int, default=10, help='plateau schedule patience')
    group.add_argument('--lr-k-decay', type=float, default=1.0, help='k-decay for cosine/poly')

    group = parser.add_argument_group('Training')
    group.add_argument('-b', '--batch-size', type=int, default=64, help='batch size per process (default: 64)')
    group.add_argument('-vb', '--validation-batch-size', type=int, default=None, help='eval batch size')
    group.add_argument('--grad-accum-steps', type=int, default=1, help='gradient accumulation steps')
    group.add_argument('--mixed-precision', default='no', choices=MIXED_PRECISION,
                       help='autocast dtype: no, bf16 or fp16 (GPU only)')
    group.add_argument('--seed', type=int, default=42, help='random seed (default: 42)')
    group.add_argument('--data-seed', type=int, default=None,
                       help='seed of the data order and augmentation, apart from model initialisation (default: '
                            '--seed); runs that share it see the same batches, and can share a --teacher-cache')
    group.add_argument('--dist-bn', default='reduce', choices=('reduce', 'broadcast', ''),
                       help='sync BatchNorm stats across processes after each epoch, as timm (default: reduce)')
    group.add_argument('--channels-last', action='store_true', help='channels_last memory layout for CNNs')
    group.add_argument('--grad-checkpointing', action='store_true',
                       help="recompute the student's activations in backward (timm's set_grad_checkpointing)")
    group.add_argument('--sync-bn', action='store_true',
                       help="the student's BatchNorm synchronised across GPUs (torch SyncBatchNorm; GPU only)")
    group.add_argument('--compile', action='store_true', help='torch.compile the student and the teacher')
    group.add_argument('--log-interval', type=int, default=20, help='steps between progress bar updates')
    group.add_argument('--skip-nonfinite', type=int, default=0, metavar='N',
                       help='tolerate up to N steps with a NaN/Inf loss by skipping them (default: 0)')

    group = parser.add_argument_group('Model EMA of the student (timm.utils.ModelEmaV3)')
    group.add_argument('--model-ema', action='store_true', help='keep an EMA of the student; evaluated and saved too')
    group.add_argument('--model-ema-decay', type=float, default=0.9998, help='EMA decay (default: 0.9998)')
    group.add_argument('--model-ema-warmup', action='store_true', help='warm the EMA decay up over the first steps')

    group = parser.add_argument_group('Experiment tracking (Accelerate trackers, main process only)')
    group.add_argument('--log-with', default=None, choices=TRACKERS,
                       help='log hyperparameters once, losses, tau, lr and images/s every --log-interval steps, and '
                            'eval metrics every epoch (default: off)')
    group.add_argument('--log-wandb', action='store_true', help="timm's flag: the same as --log-with wandb")
    group.add_argument('--tracker-project', default='timm_icd', help='tracker project / run group name')

    group = parser.add_argument_group('Output')
    group.add_argument('--output', default='', metavar='DIR',
                       help='run folder (default: output/train/<time>-<student>-<method>)')
    group.add_argument('--experiment', default='', help='run folder name under output/train')
    group.add_argument('--resume', default='', metavar='auto|PATH',
                       help='auto: continue from the newest complete checkpoint in --output; or a checkpoint path')
    group.add_argument('--overwrite', action='store_true', help='replace a run already in --output')
    group.add_argument('--save-best', action='store_true', help='also keep the best student by eval top-1')
    group.add_argument('--checkpoint-steps', type=int, default=0, metavar='N',
                       help='also checkpoint every N steps (default: epochs only)')
    group.add_argument('--keep-checkpoints', type=int, default=2, metavar='K',
                       help='checkpoints to keep, newest first (default: 2)')

    group = parser.add_argument_group('Pre-emption and time limits (run/preempt.py)')
    group.add_argument('--preempt-signal', default=DEFAULT_SIGNALS, metavar='SIGNALS',
                       help='signals that stop the run at the next step with a checkpoint, exit code 75 '
                            f'(default: {DEFAULT_SIGNALS}; none: die as the signal says)')
    group.add_argument('--time-limit', default=None, metavar='HH:MM:SS',
                       help="stop the same way before this much time from the process's start (default: SLURM's "
                            'job end when SLURM_JOB_END_TIME is set; none: no limit)')

    group = parser.add_argument_group('Hugging Face Hub')
    group.add_argument('--push-to-hub', default=None, metavar='ORG/NAME', help='push the student after training')
    group.add_argument('--hub-private', action='store_true', help='create the Hub repository as private')
    group.add_argument('--hub-revision', default=None, metavar='BRANCH', help='branch to push to')
    group.add_argument('--hub-collection', default=None, metavar='SLUG',
                       help="after the push, add the repository to this Hub collection (its URL's NAMESPACE/TITLE-ID)")
    group.add_argument('--push-ema', action='store_true', help='push the EMA student (needs --model-ema)')
    group.add_argument('--hub-license', default='apache-2.0', metavar='SPDX',
                       help="the pushed card's license (default: apache-2.0); mind the terms of the teacher's "
                            "weights and of the data (e.g. ImageNet's, for timm's ImageNet weights)")
    return parser


def add_term_flags(group) -> None:
    """One ``--NAME-FIELD`` flag per field of each term's parameters, from the table of terms (``distill/terms.py``):
    its default, type, choices and help line are the field's."""
    for term in TERMS.values():
        for f in fields(term.params):
            flag, meta = f"--{term.name}-{f.name.replace('_', '-')}", f.metadata
            if isinstance(f.default, bool):
                group.add_argument(flag, action='store_true', help=meta.get('help'))
                continue
            kind = type(f.default) if f.default is not None else next(
                t for t in get_args(f.type) if t is not type(None))  # Optional[float] -> float
            group.add_argument(flag, type=kind, default=f.default, choices=meta.get('choices'), help=meta.get('help'))


def term_params(args: argparse.Namespace) -> Dict[str, Any]:
    """Each term's parameters, ``{name: params}``, from the flags (what ``ICDDistillationTask(terms=...)`` takes)."""
    return {name: params_of(name, vars(args)) for name in TERMS}


def _coerce(action: argparse.Action, key: str, value):
    """Apply a flag's type to a YAML value, so config files are checked like the command line."""
    if value is None or action.type is None:
        return value
    try:
        if isinstance(value, (list, tuple)):
            return [action.type(v) for v in value]
        return action.type(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        raise UserError(f"config key '{key}': {value!r} is not a valid value ({e}).") from e


def load_config_file(parser: argparse.ArgumentParser, path: str) -> dict:
    """Read a YAML config whose keys are flag dest names (dashes allowed) and check keys and value types."""
    if not os.path.isfile(path):
        raise UserError(f'config file not found: {path}')
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise UserError(f'config file {path} is not valid YAML: {" ".join(str(e).split())[:200]}') from e
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise UserError(f'config file {path} must map flag names to values, not hold a {type(cfg).__name__}.')
    actions = {a.dest: a for a in parser._actions}
    out = {}
    for key, value in cfg.items():
        dest = str(key).replace('-', '_')
        if dest not in actions or dest in ('help', 'config'):
            raise UserError(f"config file {path}: unknown key '{key}'.")
        action = actions[dest]
        if action.choices is not None and value not in action.choices:
            raise UserError(f"config key '{key}': {value!r} is not one of {', '.join(map(str, action.choices))}.")
        out[dest] = _coerce(action, key, value)
    return out


def parse_args(argv: Optional[Sequence[str]] = None, prog: str = 'train_icd.py',
               description: str = DESCRIPTION) -> argparse.Namespace:
    """Parse flags, with ``--config`` values as defaults that explicit flags override (as timm's train.py)."""
    config_parser = ArgumentParser(add_help=False)
    config_parser.add_argument('-c', '--config', default='')
    config_parser.add_argument('--loss-plugin', action='append', default=[])
    config_args, _ = config_parser.parse_known_args(argv)
    load_plugins(_config_plugins(config_args.config) + config_args.loss_plugin)  # before the parser: a plugin's
    # term brings its method and flags
    parser = create_parser(prog, description)
    if config_args.config:
        parser.set_defaults(**load_config_file(parser, config_args.config))
    args = parser.parse_args(argv)
    if args.lr is None:
        args.lr = default_lr(args.student)
    if args.kd_distill_type and args.method == 'auto':  # a timm train.py command
        args.method = {'logit': 'kd'}.get(args.kd_distill_type, args.kd_distill_type)
    if args.log_wandb and not args.log_with:
        args.log_with = 'wandb'
    return args


def _config_plugins(path: str) -> List[str]:
    """The ``loss_plugin`` files a YAML ``--config`` names (the whole file is checked by ``load_config_file``)."""
    if not path or not os.path.isfile(path):
        return []
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except yaml.YAMLError:
        return []
    files = cfg.get('loss_plugin', cfg.get('loss-plugin')) if isinstance(cfg, dict) else None
    return [str(f) for f in ([files] if isinstance(files, str) else files or [])]


def default_lr(student: str) -> float:
    """The paper's SGD learning rate for a student: 0.01 for depthwise MobileNet/ShuffleNet-style nets, else 0.05.

    Not only the paper's rule: on held-out Fashion-MNIST data (benchmarks/results/quality_investigation_when_icd_
    hurts.md) a mobilenetv3 student at 0.05 ends below plain training with kd, icd and icd+kd alike, and at 0.01 each
    of them ends above it.
    """
    return 0.01 if re.search(LOW_LR_STUDENTS, student.split(':')[-1].split('/')[-1].lower()) else 0.05


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def validate_args(args: argparse.Namespace) -> None:
    """Reject nonsense settings with one line each, before any work starts."""
    for name in ('task_loss_weight', 'kd_loss_weight', 'icd_loss_weight'):
        value = getattr(args, name)
        _check(value is None or value >= 0, f"--{name.replace('_', '-')} must be >= 0, got {value}.")
    for name, params in term_params(args).items():
        problems = param_problems(name, params)
        _check(not problems, problems[0] if problems else '')
    if args.kd_standardize:
        no_kd = args.method != 'auto' and logit_loss_of(args.method) is None and not (
            args.method == 'icd' and args.kd_loss_weight)
        _check(not no_kd, f'--kd-standardize needs a KD term, which --method {args.method} does not have: use '
                          f'--method kd, icd+kd or auto.')
        _check(args.kd_loss_weight != 0, '--kd-standardize needs a KD term, which --kd-loss-weight 0 turns off.')
    logit = TERMS.get(logit_loss_of(args.method) or '')
    if logit is not None and logit.hard_labels:
        mixed = [f for f, on in (('--mixup', args.mixup > 0), ('--cutmix', args.cutmix > 0),
                                 ('--cutmix-minmax', args.cutmix_minmax is not None)) if on]
        _check(not mixed, f'--method {args.method} {logit.hard_labels}, which the mixed labels of '
                          f'{mixed[0] if mixed else ""} do not have: drop it or use another method.')
    _check(args.lr > 0, f'--lr must be > 0, got {args.lr}.')
    _check(args.weight_decay >= 0, f'--weight-decay must be >= 0, got {args.weight_decay}.')
    _check(args.epochs >= 1, f'--epochs must be >= 1, got {args.epochs}.')
    _check(args.batch_size >= 1, f'--batch-size must be >= 1, got {args.batch_size}.')
    _check(args.validation_batch_size is None or args.validation_batch_size >= 1,
           f'--validation-batch-size must be >= 1, got {args.validation_batch_size}.')
    _check(args.grad_accum_steps >= 1, f'--grad-accum-steps must be >= 1, got {args.grad_accum_steps}.')
    _check(args.workers >= 0, f'--workers must be >= 0, got {args.workers}.')
    args.streaming = args.streaming or args.dataset.startswith('hfids/')  # timm's name for a streamed Hub dataset
    if args.streaming:
        _check(args.shuffle_buffer >= 0, f'--shuffle-buffer must be >= 0, got {args.shuffle_buffer}.')
        _check(args.input_pipeline != 'memory', '--input-pipeline memory holds the whole dataset in memory, which '
                                                '--streaming is for avoiding: drop one of them.')
        mixed = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
        _check(not (args.skip_bad_images and mixed), '--skip-bad-images with --streaming leaves a batch smaller by '
                                                     'the images it skips, and Mixup/CutMix need even batches: drop '
                                                     'one of them.')
    for flag in ('train_num_samples', 'val_num_samples', 'num_classes'):
        value = getattr(args, flag)
        _check(value is None or value >= 1, f"--{flag.replace('_', '-')} must be >= 1, got {value}.")
        _check(value is None or args.streaming, f"--{flag.replace('_', '-')} applies to --streaming only (a "
                                                f"map-style dataset is counted).")
    _check(0 < args.val_fraction < 1, f'--val-fraction must be between 0 and 1, got {args.val_fraction}.')
    _check(args.checkpoint_steps >= 0, f'--checkpoint-steps must be >= 0, got {args.checkpoint_steps}.')
    _check(args.keep_checkpoints >= 1, f'--keep-checkpoints must be >= 1, got {args.keep_checkpoints}.')
    _check(args.skip_nonfinite >= 0, f'--skip-nonfinite must be >= 0, got {args.skip_nonfinite}.')
    _check(0 < args.model_ema_decay < 1, f'--model-ema-decay must be between 0 and 1, got {args.model_ema_decay}.')
    _check(not args.push_ema or args.model_ema, '--push-ema needs --model-ema (there is no EMA student to push).')
    _check(args.log_interval >= 1, f'--log-interval must be >= 1, got {args.log_interval}.')
    _check(0 <= args.smoothing < 1, f'--smoothing must be in [0, 1), got {args.smoothing}.')
    _check(args.mixup >= 0 and args.cutmix >= 0, '--mixup and --cutmix must be >= 0.')
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        _check(args.batch_size % 2 == 0, f'--mixup/--cutmix need an even --batch-size, got {args.batch_size}.')
    for flag, size in (('--input-size', args.input_size), ('--teacher-input-size', args.teacher_input_size)):
        _check(size is None or all(s >= 1 for s in size), f'{flag} values must be >= 1, got {size}.')
    _check(not (args.resume and args.overwrite), '--resume and --overwrite contradict each other: pick one.')
    _check(args.resume != 'auto' or bool(args.output), '--resume auto needs --output DIR (the run to continue).')
    if args.sync_bn and not torch.cuda.is_available():  # torch's SyncBatchNorm raises on CPU tensors across processes
        raise UserError('--sync-bn synchronises BatchNorm statistics across GPUs and needs one; on CPU, processes '
                        'average their BatchNorm statistics after each epoch (--dist-bn reduce, the default).')
    if args.decode_device == 'cuda':
        if not torch.cuda.is_available():
            raise UserError('--decode-device cuda decodes JPEGs on the GPU and needs one; leave it out to decode in '
                            'the workers (--decode-device cpu).')
        _check(args.streaming, '--decode-device cuda decodes streamed batches: add --streaming (the loader path '
                               'decodes in its workers).')
        reason = device_decode_reason(augment_config(args))
        _check(not reason, f'--decode-device cuda crops and flips on the device and cannot apply {reason}: drop one '
                           f'of them.')
    if args.mixed_precision == 'fp16' and not torch.cuda.is_available():
        raise UserError('--mixed-precision fp16 needs a GPU (fp16 autocast does not run on CPU); use bf16.')
    _check(args.method == 'vanilla' or bool(args.teacher), f'--method {args.method} needs --teacher.')
    _check(args.teacher_adapt_epochs >= 1, f'--teacher-adapt-epochs must be >= 1, got {args.teacher_adapt_epochs}.')
    _check(args.teacher_adapt_lr is None or args.teacher_adapt_lr > 0,
           f'--teacher-adapt-lr must be > 0, got {args.teacher_adapt_lr}.')
    _check(args.teacher_adapt_augment >= 0, f'--teacher-adapt-augment must be >= 0, got {args.teacher_adapt_augment}.')
    _check(not (args.teacher_label_map and args.same_label_space),
           '--teacher-label-map and --same-label-space both say which teacher output is which class: pick one.')
    if args.teacher_label_map:
        _check(os.path.isfile(args.teacher_label_map), f'--teacher-label-map: no file {args.teacher_label_map}.')
    if args.teacher_cache:
        _check(args.method not in ('vanilla',) + timm_methods(),
               f"--teacher-cache holds an ICD teacher's outputs, which --method {args.method} does not use.")
        batch_level = [flag for flag, on in (('--mixup', args.mixup > 0), ('--cutmix', args.cutmix > 0),
                                             ('--cutmix-minmax', args.cutmix_minmax is not None),
                                             ('--reprob', args.reprob > 0)) if on]
        _check(not batch_level, f'--teacher-cache stores what the teacher saw of each sample, but {batch_level[0]} '
                                f'mixes or erases whole batches, so the teacher\'s input depends on the batch: '
                                f'drop one of them.' if batch_level else '')
        _check(not args.streaming, '--teacher-cache keys samples by row, and a stream\'s rows depend on the process '
                                   'count: drop --streaming (or the cache).')
        _check(0 <= args.cache_topk, f'--cache-topk must be >= 0, got {args.cache_topk}.')
    else:
        _check(args.cache_features == 'fp16' and not args.cache_topk,
               '--cache-features and --cache-topk apply to --teacher-cache only.')
    if args.log_with:
        check_tracker(args.log_with)
    _check(args.kd_distill_type in (None, args.method) or (args.kd_distill_type == 'logit' and logit_loss_of(
        args.method) == 'kd'), f'--kd-distill-type {args.kd_distill_type} contradicts --method {args.method}: drop one '
                               f'of them.')
    if args.method in timm_methods():
        for flag, value in (('--student-layer', args.student_layer), ('--teacher-layer', args.teacher_layer),
                            ('--icd-loss-weight', args.icd_loss_weight)):
            _check(value is None, f"{flag} does not apply to --method {args.method} (timm's task, which reads no "
                                  f"chosen layer); use --method icd.")
        _check(args.teacher_dtype in ('float32', 'fp32'), '--teacher-dtype applies to the ICD teacher, not to '
                                                          f"--method {args.method} (timm's task).")
    _check(not args.hub_collection or bool(args.push_to_hub),
           '--hub-collection adds the pushed student to a collection: it needs --push-to-hub ORG/NAME.')
    if args.hub_collection:
        check_collection_slug(args.hub_collection)
    args.preempt_signal = 'none' if not parse_signals(args.preempt_signal) else args.preempt_signal
    args.time_limit = 'none' if args.time_limit and parse_time_limit(args.time_limit) is None else args.time_limit
    if args.push_to_hub:  # repo id and token now, not after hours of training
        check_push_target(args.push_to_hub, round_trip=True)

    # let timm's own factories judge optimizer and schedule settings, on a throwaway parameter
    dummy = torch.nn.Linear(1, 1)
    try:
        optimizer = create_optimizer_v2(dummy, **optimizer_kwargs(args))
    except Exception as e:
        raise UserError(f"--opt {args.opt}: {e}".rstrip('.') + '; see timm.optim.list_optimizers().') from e
    try:
        create_scheduler_v2(optimizer, **scheduler_kwargs(args), updates_per_epoch=1)
    except Exception as e:
        raise UserError(f'--sched {args.sched}: {e}') from e


def check_tracker(name: str) -> None:
    """Refuse a tracker whose package is missing, in one line, before any work starts."""
    available = {'tensorboard': is_tensorboard_available(), 'wandb': is_wandb_available(),
                 'mlflow': is_mlflow_available()}
    if name == 'all':
        _check(any(available.values()), '--log-with all found no tracker: pip install tensorboard (or wandb, mlflow).')
    else:
        _check(available[name], f'--log-with {name} needs the {name} package: pip install {name}.')


def data_seed(args: argparse.Namespace) -> int:
    """The seed of the data order and augmentation: ``--data-seed``, else ``--seed``."""
    return args.seed if args.data_seed is None else args.data_seed


def parse_and_validate(argv: Optional[List[str]] = None, prog: str = 'train_icd.py',
                       description: str = DESCRIPTION) -> argparse.Namespace:
    args = parse_args(argv, prog, description)
    validate_args(args)
    return args


def augment_config(args: argparse.Namespace) -> AugmentConfig:
    """timm's augmentation flags as the data layer takes them."""
    return AugmentConfig(
        scale=tuple(args.scale), ratio=tuple(args.ratio), hflip=args.hflip, vflip=args.vflip,
        color_jitter=args.color_jitter, aa=args.aa, train_interpolation=args.train_interpolation, no_aug=args.no_aug,
        reprob=args.reprob, remode=args.remode, recount=args.recount)


def loop_config(args: argparse.Namespace) -> LoopConfig:
    """The step flags as the training loop takes them."""
    return LoopConfig(data_seed=data_seed(args), channels_last=args.channels_last, clip_grad=args.clip_grad,
                      skip_nonfinite=args.skip_nonfinite, log_interval=args.log_interval,
                      log_to_trackers=bool(args.log_with))
