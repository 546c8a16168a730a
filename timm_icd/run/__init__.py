from .build import FINGERPRINT, Run, build
from .cache_writer import write_ahead
from .checkpoint import find_checkpoints, find_latest_checkpoint, load_first, read_run_state, save_checkpoint
from .config import (
    CacheConfig, DataConfig, MethodConfig, ModelConfig, OutputConfig, RunConfig, TrainConfig, run_config)
from .events import add_listener, emit
from .flags import ArgumentParser, augment_config, create_parser, data_seed, loop_config, parse_and_validate, parse_args
from .loop import LoopConfig, evaluate, train_one_epoch
from .preempt import EXIT_CODE as PREEMPTED_EXIT_CODE
from .preempt import Preempted, Preemption
from .state import LOSS_PARTS, RunState
from .train import create_accelerator, run
from .watchdog import explain_failure, report_user_error, start_watchdog
