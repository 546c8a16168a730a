"""The state of a run that checkpoints carry (``run_state.json``): counters, loss sums, metrics, and identity."""
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

LOSS_PARTS = ('loss', 'loss_ce', 'loss_kd', 'loss_icd', 'tau')


def zero_sums() -> List[float]:
    """Per-part loss sums and the step count of an epoch that has not started."""
    return [0.0] * (len(LOSS_PARTS) + 1)


@dataclass
class RunState:
    """Where a run stands; the training loop updates it in place and every checkpoint saves it.

    Attributes:
        epoch, step_in_epoch: The epoch in progress and the batches of it done.
        global_step, num_updates: Batches and optimizer updates since the start.
        epoch_sums: Sums of each ``LOSS_PARTS`` entry over the epoch's applied steps, then their count (a device
            tensor while the epoch runs; a list in checkpoints, summed over processes).
        nonfinite_steps: Steps skipped for a NaN/Inf loss (``--skip-nonfinite``).
        best_top1, best_epoch: The best eval top-1 so far and its epoch.
        history: One summary.csv row per finished epoch.
        teacher: The teacher's eval metrics, when measured.
        seconds: Wall time of the epochs run, over resumes too.
        fingerprint: The settings a resumed run must share (see ``run.build.FINGERPRINT``).
        stream: Mid-epoch, where each process's stream goes on (``--streaming``).
    """
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    num_updates: int = 0
    epoch_sums: Union[List[float], torch.Tensor] = field(default_factory=zero_sums)
    nonfinite_steps: int = 0
    best_top1: Optional[float] = None
    best_epoch: Optional[int] = None
    history: List[Dict[str, Any]] = field(default_factory=list)
    teacher: Optional[Dict[str, Any]] = None
    seconds: float = 0.0
    fingerprint: Dict[str, Any] = field(default_factory=dict)
    stream: Optional[Sequence[Any]] = None

    def to_json(self) -> Dict[str, Any]:
        """The JSON-able state (loss sums leave the device here, once per checkpoint)."""
        out = dataclasses.asdict(dataclasses.replace(self, epoch_sums=[]))
        sums = self.epoch_sums
        out['epoch_sums'] = sums.tolist() if isinstance(sums, torch.Tensor) else list(sums)
        return out

    @classmethod
    def from_json(cls, saved: Dict[str, Any]) -> 'RunState':
        """The state a checkpoint saved (keys it lacks keep their defaults; unknown ones are dropped)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})

    def end_epoch(self) -> None:
        """Move on to the next epoch's start."""
        self.epoch, self.step_in_epoch, self.epoch_sums = self.epoch + 1, 0, zero_sums()
