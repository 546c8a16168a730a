"""A linear probe: multinomial logistic regression on a frozen model's pooled features, as CLIP's linear evaluation.

The L2 strength is chosen on a stratified hold-out of the rows it is given (the TRAINING split: never the eval split),
from a log-spaced grid swept from strong to weak with each fit warm-started from the last; the probe is then fitted
again on all rows at the chosen strength. Features are standardised for the fit (L-BFGS converges in far fewer
steps) and the standardisation is folded into the returned weights, so the probe applies to raw features.

Why not scikit-learn's ``LogisticRegression`` (what CLIP used): this runs on the run's device (a GPU where there is
one), in float32 on tensors already there, and full-batch L-BFGS from torch is deterministic given the features, so
every process count gives the same head from the same features.
"""
import logging
from dataclasses import dataclass, field
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

_logger = logging.getLogger(__name__)

L2_GRID = tuple(10.0 ** e for e in range(-1, -7, -1))  # 1e-1 .. 1e-6, strong to weak


@dataclass
class ProbeFit:
    """A fitted probe (``weight`` C x D, ``bias`` C, for raw features) and how it was chosen."""
    weight: torch.Tensor
    bias: torch.Tensor
    l2: float
    holdout_top1: dict = field(default_factory=dict)  # l2 -> top-1 (%) on the hold-out
    holdout_rows: int = 0
    train_top1: float = 0.0  # of the final probe on every row it was fitted on


def stratified_holdout(labels: torch.Tensor, fraction: float = 0.1, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(fit rows, hold-out rows): ``fraction`` of each class with two or more rows held out (at least one), drawn with
    a fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    held = []
    labels = labels.cpu()
    for c in torch.unique(labels).tolist():
        rows = torch.nonzero(labels == c).flatten()
        if len(rows) >= 2:
            take = max(1, int(round(fraction * len(rows))))
            held.append(rows[torch.randperm(len(rows), generator=generator)[:take]])
    held = torch.sort(torch.cat(held)).values if held else torch.zeros(0, dtype=torch.long)
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[held] = False
    return torch.nonzero(mask).flatten(), held


def _fit(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, init: torch.Tensor,
         max_iter: int) -> torch.Tensor:
    """Minimise mean cross-entropy + l2 * |W|^2 over standardised ``x``; returns [W | b] as one C x (D + 1) tensor."""
    params = init.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([params], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=1e-6,
                                  tolerance_change=1e-8, line_search_fn='strong_wolfe')

    def closure():
        optimizer.zero_grad()
        logits = torch.addmm(params[:, -1], x, params[:, :-1].t())
        loss = F.cross_entropy(logits, y) + l2 * params[:, :-1].pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return params.detach()


def _top1(params: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * (torch.addmm(params[:, -1], x, params[:, :-1].t()).argmax(1) == y).float().mean().item()


def fit_linear_probe(
        features: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int,
        l2_grid: Sequence[float] = L2_GRID,
        holdout: float = 0.1,
        seed: int = 0,
        max_iter: int = 100,
) -> ProbeFit:
    """Fit a linear classifier on ``features`` (N x D) for ``labels`` (N), its L2 strength chosen on a hold-out.

    Args:
        features, labels: Pooled features of the training rows and their classes (on the device to fit on).
        num_classes: Classes of the probe (a class without rows gets the bias the fit gives it).
        l2_grid: L2 strengths to choose from; the hold-out's best top-1 wins, ties going to the stronger.
        holdout: Fraction of each class held out to choose the strength (0, or a single strength: no choice).
        seed: Seed of the hold-out draw.
        max_iter: L-BFGS iterations per hold-out fit (each warm-started from the stronger strength's solution); the
            final fit, warm-started from the chosen strength's, gets twice as many.
    """
    x, y = features.float(), labels.long().to(features.device)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    init = torch.zeros(num_classes, z.shape[1] + 1, device=z.device)
    grid = sorted({float(v) for v in l2_grid}, reverse=True)
    scores: dict = {}
    fit_rows, held = stratified_holdout(y, holdout, seed) if holdout > 0 and len(grid) > 1 else (None, [])
    chosen, start = grid[0], init
    if len(held):
        fit_rows, held = fit_rows.to(z.device), held.to(z.device)
        z_fit, y_fit, params, best = z[fit_rows], y[fit_rows], init, -1.0
        for l2 in grid:  # strong to weak, each fit warm-started from the previous one
            params = _fit(z_fit, y_fit, num_classes, l2, params, max_iter)
            scores[l2] = _top1(params, z[held], y[held])
            if scores[l2] > best:
                best, chosen, start = scores[l2], l2, params
        _logger.info('Linear probe: hold-out top-1 by L2 strength ' + ', '.join(
            f'{l2:g}: {top1:.2f}%' for l2, top1 in scores.items()) + f'; chose {chosen:g}')
    params = _fit(z, y, num_classes, chosen, start, 2 * max_iter)
    weight = params[:, :-1] / std  # folded: W z + b = (W / std) x + (b - (W / std) mean)
    bias = params[:, -1] - weight @ mean
    if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
        raise FloatingPointError('the linear probe diverged (non-finite weights)')
    return ProbeFit(weight, bias, chosen, scores, len(held), _top1(params, z, y))


def probe_top1(fit: ProbeFit, features: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 (%) of a fitted probe on raw features."""
    logits = features.float() @ fit.weight.t() + fit.bias
    return 100.0 * (logits.argmax(1) == labels.to(logits.device)).float().mean().item()
