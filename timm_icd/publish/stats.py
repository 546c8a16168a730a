"""Statistics for comparing runs over seeds: a mean with its t-interval, paired differences with their tests, Holm.

The tests are scipy's (``scipy.stats``); what is written here is what scipy does not offer in one call: the paired
summary the reports print, the exact sign-flip permutation test over every sign assignment (scipy's
``permutation_test`` draws them at random above a size), Holm's step-down adjustment and the test over group means.
"""
import itertools
from typing import Dict, Hashable, List, Mapping, Sequence

import numpy as np
from scipy import stats

EXACT_FLIPS = 20  # up to 2**20 sign assignments are enumerated; beyond, the permutation p-value is not given


def holm(pvalues: Sequence[float]) -> List[float]:
    """Holm's step-down adjusted p-values (family-wise error), in the input order; NaN stays NaN and counts not."""
    present = [i for i, p in enumerate(pvalues) if not np.isnan(p)]
    order = sorted(present, key=lambda i: pvalues[i])
    adjusted, running = [float('nan')] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(present) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def mean_ci(values: Sequence[float], level: float = 0.95) -> Dict[str, float]:
    """Mean, sample standard deviation and the two-sided t-interval of the mean (NaN where n < 2)."""
    v = np.asarray(values, dtype=float)
    out = {'n': len(v), 'mean': float(v.mean()) if len(v) else float('nan'), 'std': float('nan'),
           'low': float('nan'), 'high': float('nan'), 'min': float(v.min()) if len(v) else float('nan'),
           'max': float(v.max()) if len(v) else float('nan')}
    if len(v) >= 2:
        out['std'] = float(v.std(ddof=1))
        half = stats.t.ppf(0.5 + level / 2, len(v) - 1) * out['std'] / np.sqrt(len(v))
        out.update(low=out['mean'] - half, high=out['mean'] + half)
    return out


def sign_flip_p(diffs: Sequence[float]) -> float:
    """Exact two-sided sign-flip permutation p-value of the mean difference: the share of the 2**n sign assignments
    whose |sum| reaches the observed one (NaN beyond ``EXACT_FLIPS`` differences or with none)."""
    d = np.asarray(diffs, dtype=float)
    if not 0 < len(d) <= EXACT_FLIPS:
        return float('nan')
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
    sums = np.abs(signs @ d)
    observed = abs(d.sum())
    return float(np.mean(sums >= observed - 1e-9 * max(1.0, observed)))


def wilcoxon_p(diffs: Sequence[float]) -> float:
    """Exact two-sided Wilcoxon signed-rank p-value (zeros dropped; NaN when no difference is left)."""
    d = np.asarray([x for x in diffs if x != 0], dtype=float)
    if not len(d):
        return float('nan')
    method = 'exact' if len(np.unique(np.abs(d))) == len(d) else 'auto'  # ties: scipy's own choice
    return float(stats.wilcoxon(d, method=method).pvalue)


def paired(a: Mapping[Hashable, float], b: Mapping[Hashable, float]) -> Dict[str, object]:
    """Mean of a - b over the seeds both have, its 95% t-interval, the two-sided t-test and the exact sign test, the
    exact Wilcoxon signed-rank and sign-flip permutation tests.

    Args:
        a, b: A value per seed (or any pairing key); seeds only one of them has are left out.
    """
    seeds = sorted(set(a) & set(b))
    d = np.array([a[s] - b[s] for s in seeds])
    out = {'n': len(d), 'seeds': seeds, 'diffs': d.tolist(), 'mean': float(d.mean()) if len(d) else float('nan'),
           'positive': int((d > 0).sum()), 'negative': int((d < 0).sum())}
    if len(d) >= 2 and d.std(ddof=1) > 0:
        sem = d.std(ddof=1) / np.sqrt(len(d))
        half = stats.t.ppf(0.975, len(d) - 1) * sem
        out.update(low=out['mean'] - half, high=out['mean'] + half, p=float(stats.ttest_1samp(d, 0.0).pvalue))
    else:  # under 2 seeds, NaN; every difference equal (zero variance: no t-test), 1.0, which keeps the contrast in
        # Holm's family and never establishes it (conservative; at 0.01-point accuracy steps it does not arise)
        out.update(low=float('nan'), high=float('nan'), p=float('nan') if len(d) < 2 else 1.0)
    nonzero = out['positive'] + out['negative']
    out['sign_p'] = float(stats.binomtest(out['positive'], nonzero).pvalue) if nonzero else float('nan')
    out['permutation_p'] = sign_flip_p(d)
    out['wilcoxon_p'] = wilcoxon_p(d)
    return out


def group_means(diffs: Mapping[Hashable, float], group_of: Mapping[Hashable, str]) -> Dict[str, object]:
    """The mean difference per group (a teacher, a seed group) and a two-sided t-test over those group means, which
    counts the variance between groups in full (``len(groups) - 1`` degrees of freedom; NaN under two groups).

    Args:
        diffs: A difference per seed.
        group_of: The group of each seed (seeds without one form the group '?').
    """
    groups: Dict[str, List[float]] = {}
    for seed, d in diffs.items():
        groups.setdefault(group_of.get(seed, '?'), []).append(d)
    means = {g: float(np.mean(v)) for g, v in sorted(groups.items())}
    values = list(means.values())
    p = float(stats.ttest_1samp(values, 0.0).pvalue) if len(values) >= 2 and np.std(values) > 0 else float('nan')
    return {'by_group': means, 'p': p}
