"""The report of a sweep (``python -m timm_icd sweep``): per arm mean and 95% CI, paired differences for the declared
contrasts with Holm's correction and the sensitivity tests, the per-seed table, the cost, a plot.

Test-split numbers appear only when every declared run has one; until then the report says how many are in.
"""
import statistics
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..base import write_text_atomic
from .report import _plt
from .stats import group_means, holm, mean_ci, paired

REPORT, PLOT = 'sweep.md', 'sweep.png'
ALPHA = 0.05
TESTS = {'t': ('p', 'paired two-sided t-test'),
         'permutation': ('permutation_p', 'exact two-sided sign-flip permutation test (all 2^n sign assignments)')}
SENSITIVITY = (('permutation_p', 'exact sign-flip'), ('wilcoxon_p', 'exact Wilcoxon'), ('sign_p', 'exact sign test'))


def _f(v: Optional[float], fmt: str = '+.2f') -> str:
    return '-' if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, fmt)


def _p(v: float) -> str:
    return '-' if v is None or np.isnan(v) else f'{v:.4f}' if v >= 1e-4 else f'{v:.1e}'


def arm_values(rows: Sequence[dict], arm: str, metric: str) -> Dict[int, float]:
    """``metric`` by seed of one arm's finished runs."""
    return {int(r['seed']): float(r[metric]) for r in rows
            if r.get('kind', 'run') == 'run' and r['arm'] == arm and r.get(metric) not in ('', None)}


def analyse(rows: Sequence[dict], arms: Sequence[str], contrasts: Sequence[Tuple[str, str]], metric: str,
            group_of: Mapping[int, str], primary: str = 't') -> Dict[str, dict]:
    """Per arm ``mean_ci``; per contrast ``paired`` and ``group_means``, with Holm-adjusted p-values (``holm_*``)
    over the declared contrasts for the primary test and every sensitivity test."""
    values = {arm: arm_values(rows, arm, metric) for arm in arms}
    out = {'arms': {arm: mean_ci(list(v.values())) for arm, v in values.items()}, 'contrasts': {}}
    for a, b in contrasts:
        r = paired(values[a], values[b])
        groups = group_means(dict(zip(r['seeds'], r['diffs'])), group_of)
        r.update(by_group=groups['by_group'], group_p=groups['p'] if len(set(group_of.values())) > 1 else float('nan'))
        out['contrasts'][f'{a}-{b}'] = r
    names = list(out['contrasts'])
    for key in ('p', 'permutation_p', 'wilcoxon_p', 'sign_p', 'group_p'):
        for name, adjusted in zip(names, holm([out['contrasts'][n][key] for n in names])):
            out['contrasts'][name][f'holm_{key}'] = adjusted
    key = TESTS[primary][0]
    for name in names:
        r = out['contrasts'][name]
        r['primary_p'], r['primary_holm_p'] = r[key], r[f'holm_{key}']
        r['established'] = bool(r['primary_holm_p'] < ALPHA)
    return out


def _section(analysed: dict, arms: Mapping[str, Tuple[str, List[str]]], seeds: Sequence[int],
             group_of: Mapping[int, str], rows: Sequence[dict], metric: str, what: str, primary: str) -> List[str]:
    lines = [f'## Arms ({what} top-1, %)', '', '| arm | method and flags | n | mean | 95% CI | std | min | max |',
             '|---|---|---|---|---|---|---|---|']
    for arm, (method, flags) in arms.items():
        s = analysed['arms'][arm]
        lines.append(f"| {arm} | `{' '.join([method, *flags])}` | {s['n']} | {_f(s['mean'], '.2f')} | "
                     f"[{_f(s['low'], '.2f')}, {_f(s['high'], '.2f')}] | {_f(s['std'], '.2f')} | "
                     f"{_f(s['min'], '.2f')} | {_f(s['max'], '.2f')} |")
    contrasts = analysed['contrasts']
    if contrasts:
        lines += ['', f'## Contrasts ({what} top-1, percentage points, paired by seed)', '',
                  f'{TESTS[primary][1][0].upper()}{TESTS[primary][1][1:]}; Holm\'s step-down over the {len(contrasts)} '
                  f'declared contrast(s) at family-wise {ALPHA}: "yes" means Holm-adjusted p < {ALPHA}.', '',
                  '| contrast | n | mean | 95% CI | positive seeds | p | Holm p | below 0.05 after Holm |',
                  '|---|---|---|---|---|---|---|---|']
        for name, r in contrasts.items():
            lines.append(f"| {name} | {r['n']} | {_f(r['mean'])} | [{_f(r['low'])}, {_f(r['high'])}] | "
                         f"{r['positive']} of {r['n']} | {_p(r['primary_p'])} | {_p(r['primary_holm_p'])} | "
                         f"{'**yes**' if r['established'] else 'no'} |")
        lines += ['', 'Sensitivity (each column Holm-adjusted over the declared contrasts): exact tests that assume no '
                      'normal distribution, and the mean difference per teacher with a t-test over those means '
                      '(the variance between teachers counted in full; "-" with one teacher).', '',
                  '| contrast | t-test Holm p | ' + ' | '.join(f'{label} Holm p' for _, label in SENSITIVITY) +
                  ' | per teacher | over teachers Holm p |', '|---|---|---|---|---|---|---|']
        for name, r in contrasts.items():
            per = ', '.join(f'{g}: {_f(v)}' for g, v in r['by_group'].items())
            lines.append(f"| {name} | {_p(r['holm_p'])} | " + ' | '.join(_p(r[f'holm_{k}']) for k, _ in SENSITIVITY)
                         + f" | {per or '-'} | {_p(r['holm_group_p'])} |")
    lines += ['', f'## Per seed ({what} top-1, %)', '', '| seed | teacher | ' + ' | '.join(arms) + ' |',
              '|---|---|' + '---|' * len(arms)]
    values = {arm: arm_values(rows, arm, metric) for arm in arms}
    for seed in seeds:
        lines.append(f'| {seed} | {group_of.get(seed, "-")} | ' +
                     ' | '.join(_f(values[arm].get(seed), '.2f') for arm in arms) + ' |')
    return lines


def _cost(rows: Sequence[dict], jobs: int) -> List[str]:
    runs = [float(r['seconds']) / 60 for r in rows if r.get('kind', 'run') == 'run' and r.get('seconds')]
    caches = [float(r['seconds']) for r in rows if r.get('kind') == 'cache' and r.get('seconds')]
    lines = ['', '## Cost', '']
    if not runs:
        return lines + ['No run has finished yet.']
    median = statistics.median(runs)
    lines.append(f'{len(runs)} runs: median {median:.1f} min per run (range {min(runs):.1f} to {max(runs):.1f}), '
                 f'{sum(runs) / 60:.2f} h in all' + (f'; teacher caches {sum(caches):.0f} s' if caches else '')
                 + f'. With {jobs} run(s) at a time a sweep takes about runs x {median:.1f} min / {jobs}.')
    return lines


def plot(path: Path, analysed: dict, arms: Sequence[str], rows: Sequence[dict], metric: str, what: str) -> None:
    """Each arm's seeds and its mean with the 95% CI; each contrast's mean difference with its CI."""
    plt = _plt()
    contrasts = analysed['contrasts']
    fig, axes = plt.subplots(1, 2 if contrasts else 1, figsize=(11 if contrasts else 6, 4), squeeze=False)
    ax = axes[0][0]
    for i, arm in enumerate(arms):
        v = list(arm_values(rows, arm, metric).values())
        s = analysed['arms'][arm]
        ax.scatter([i] * len(v), v, s=12, alpha=0.5, color='grey')
        if v:
            err = [[s['mean'] - s['low']], [s['high'] - s['mean']]] if not np.isnan(s['low']) else None
            ax.errorbar([i + 0.15], [s['mean']], yerr=err, fmt='o', color='C0', capsize=4)
    ax.set_xticks(range(len(arms)), list(arms), rotation=20)
    ax.set_ylabel(f'{what} top-1 (%)')
    ax.set_title('arms: seeds (grey), mean and 95% CI')
    if contrasts:
        ax = axes[0][1]
        for i, (name, r) in enumerate(contrasts.items()):
            err = [[r['mean'] - r['low']], [r['high'] - r['mean']]] if not np.isnan(r['low']) else None
            ax.errorbar([r['mean']], [i], xerr=err, fmt='o', color='C1', capsize=4)
        ax.axvline(0, color='black', linewidth=0.8)
        ax.set_yticks(range(len(contrasts)), list(contrasts))
        ax.set_xlabel('difference (points), 95% CI')
        ax.set_title('contrasts, paired by seed')
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_sweep_report(out: Path, header: Sequence[str], arms: Mapping[str, Tuple[str, List[str]]],
                       seeds: Sequence[int], group_of: Mapping[int, str], contrasts: Sequence[Tuple[str, str]],
                       rows: Sequence[dict], declared: Sequence[str], tests: Optional[Mapping[str, dict]],
                       jobs: int, primary: str = 't') -> Dict[str, dict]:
    """``out/sweep.md`` and ``out/sweep.png``; returns the analyses (``validation``, and ``test`` once revealed).

    Args:
        header: The report's opening lines (command, commit, what is scored).
        arms: Name -> (method, extra flags), in the order of the tables.
        group_of: The teacher (group) of each seed.
        rows: The sweep CSV's rows; ``declared``: the keys of every run the sweep was ever asked for.
        tests: Test-split rows by key, or None without a test split; shown only when every declared key has one.
    """
    done = {r['key'] for r in rows if r.get('kind', 'run') == 'run'}
    missing = [k for k in declared if k not in done]
    lines = [*header, '', '## Status', '',
             f'{len(declared) - len(missing)} of {len(declared)} declared runs have a result' +
             (f"; not yet: {', '.join(f'`{k}`' for k in missing)}." if missing else '.'), '']
    analysed = {'validation': analyse(rows, list(arms), contrasts, 'val_top1', group_of, primary)}
    lines += _section(analysed['validation'], arms, seeds, group_of, rows, 'val_top1', 'validation', primary)
    shown, what, cost = analysed['validation'], 'validation', _cost(rows, jobs)
    if tests is not None:
        lines += ['', '## Test split', '']
        absent = [k for k in declared if k not in tests]
        if absent:
            lines.append(f'Withheld: {len(declared) - len(absent)} of {len(declared)} declared runs have a test '
                         f'result; the test numbers appear here when every declared run has one.')
        else:
            lines.append(f'Every declared run ({len(declared)}) has a result, so the test numbers are shown; the '
                         f'analysis below is the one above on the test split.')
            test_rows = [{**r, 'test_top1': tests[r['key']]['test_top1']} for r in rows
                         if r.get('kind', 'run') == 'run' and r['key'] in tests]
            analysed['test'] = analyse(test_rows, list(arms), contrasts, 'test_top1', group_of, primary)
            lines += [''] + [line.replace('## ', '### ', 1) if line.startswith('## ') else line
                             for line in _section(analysed['test'], arms, seeds, group_of, test_rows, 'test_top1',
                                                  'test', primary)]
            shown, what, rows = analysed['test'], 'test', test_rows
    lines += cost
    lines += ['', f'![arms and contrasts, {what} split]({PLOT})']
    plot(out / PLOT, shown, list(arms), rows, 'test_top1' if what == 'test' else 'val_top1', what)
    write_text_atomic(out / REPORT, '\n'.join(lines) + '\n')
    return analysed
