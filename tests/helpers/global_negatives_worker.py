"""Run by the tests under accelerate launch with 2 CPU processes.

ICD with --icd-negatives global (and DIST with --dist-batch global) on each process's half of a batch, wrapped in
DDP as in training, against one process computing the loss on the whole batch: the loss and every (DDP-synced)
gradient must match.
"""
import json
import os
import sys

import torch
from accelerate import Accelerator

from timm_icd.distill import ICDLoss, dist_loss, gather_with_grad


class Net(torch.nn.Module):
    """A stand-in student backbone feeding the ICD heads, so gradients flow through the gather into it."""

    def __init__(self, negatives: str):
        super().__init__()
        self.backbone = torch.nn.Linear(12, 16)
        self.icd = ICDLoss(16, 20, feat_dim=8, negatives=negatives)

    def forward(self, x, f_t):
        return self.icd(self.backbone(x), f_t)['loss_icd']


class DistNet(torch.nn.Module):
    """A stand-in student producing logits for DIST, as ``ICDDistillationTask`` computes it for each --dist-batch."""

    def __init__(self, batch: str):
        super().__init__()
        self.backbone, self.batch = torch.nn.Linear(12, 7), batch

    def forward(self, x, teacher_logits):
        logits = self.backbone(x)
        if self.batch == 'global':
            logits, teacher_logits = gather_with_grad(logits), gather_with_grad(teacher_logits)
        return dist_loss(logits, teacher_logits, temperature=2.0)


def compare(accelerator, make, x, f_t, local) -> dict:
    """The loss on this process's slice with global batches, against one process on the whole batch."""
    torch.manual_seed(1)
    reference = make('local')  # one process, the whole batch
    loss_ref = reference(x, f_t)
    loss_ref.backward()

    torch.manual_seed(1)
    net = make('global')
    model = accelerator.prepare(net)
    loss = model(x[local], f_t[local])
    accelerator.backward(loss)

    with torch.no_grad():
        plain = make('local')
        plain.load_state_dict(net.state_dict())
        loss_local_only = plain(x[local], f_t[local])
    ref = dict(reference.named_parameters())
    grads = {name: (p.grad - ref[name].grad).abs().max().item() for name, p in net.named_parameters()}
    return {'loss': loss.item(), 'loss_ref': loss_ref.item(), 'loss_local_only': loss_local_only.item(),
            'grad_max_abs_diff': grads,
            'grad_norm_ref': {n: p.grad.norm().item() for n, p in reference.named_parameters()}}


if __name__ == '__main__':
    accelerator = Accelerator(cpu=True)
    rank, world, per_rank = accelerator.process_index, accelerator.num_processes, 6
    torch.manual_seed(0)
    x, f_t = torch.randn(per_rank * world, 12), torch.randn(per_rank * world, 20)
    local = slice(rank * per_rank, (rank + 1) * per_rank)

    result = {'rank': rank, 'world': world, **compare(accelerator, Net, x, f_t, local)}
    teacher_logits = torch.randn(per_rank * world, 7) * 3
    result['dist'] = compare(accelerator, DistNet, x, teacher_logits, local)
    with open(f'{sys.argv[1]}/rank{rank}.json', 'w') as f:
        json.dump(result, f)
    accelerator.end_training()  # destroy the gloo group: left to interpreter exit, its threads can abort
    # and skip the interpreter's teardown: on a loaded machine gloo's threads can still abort there
    # ("terminate called without an active exception") after the results are safely written
    os._exit(0)
