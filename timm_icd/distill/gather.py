"""Batches of every process, gathered with their gradient path: for losses computed over the global batch."""
import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_gather_single_autograd

BATCHES = ('local', 'global')  # what a batch-level term (ICD's negatives, DIST's intra-class term) is computed over


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every process in rank order, keeping the gradient path to each process's slice.

    The gather's backward sums the incoming gradients over processes (a reduce-scatter), so with every process
    computing the same global loss and DDP averaging the parameter gradients, the result is exactly the gradient of
    one process on the concatenated batch. torch deprecates ``torch.distributed.nn.functional.all_gather`` (which
    also refuses to run under torch.compile) in favour of this functional collective, which traces under compile.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return all_gather_single_autograd(x.contiguous(), 0, dist.group.WORLD)
