#!/usr/bin/env python3
"""The v0.2 quality benchmark, archived: its report, rewritten from the committed results (``results/quality*``).

The pre-registered studies (``study.py``, ``study2.py``) superseded this benchmark, which was not pre-registered. Its
runner (``benchmarks/quality.py`` with ``quality_lib.py``, ``quality_investigate.py`` and ``quality_report.py``) is
in git: the last commit that has it is named in ``RUNS``, and ``git show COMMIT:benchmarks/quality.py`` prints it. At
that commit, ``python benchmarks/quality.py --pairs 2`` wrote ``quality_runs.csv``, ``quality_curves.csv`` and
``quality_teachers.json`` (about 2 h on 2 CPU cores), and ``python benchmarks/quality.py --investigate
[when-icd-hurts]`` the ``quality_investigation*`` files. This script rewrites ``quality.md`` and ``quality.png`` from
the first three, unchanged but for the header: tables, paired differences by seed with 95% t-intervals
(``common.paired_rows``) and Holm's adjustment over every difference in the report.

    python benchmarks/archive/quality_report.py          # results/quality.md and quality.png
    python benchmarks/archive/quality_report.py FOLDER   # from (and to) another folder

A difference between two methods is paired by seed (same seed: same student initialisation, data order and
augmentation), so seed-to-seed variation that both methods share cancels. For n seeds the 95% interval is
mean +- t(0.975, n - 1) * sd / sqrt(n), with the two-sided t-test's p. This benchmark was not pre-registered, so
every difference it reports belongs to one family: Holm's step-down adjusts the p-values over all of them, and a
difference is called established only when its adjusted p is below 0.05 (the pre-registered study,
``study.py``, is where questions are settled).
"""
import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import paired_rows  # noqa: E402
from timm_icd.publish.stats import holm  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / 'results'
NAME = 'quality'
METHODS = ('vanilla', 'kd', 'kd+ls', 'timm_logit', 'timm_feature', 'icd', 'icd+kd', 'icd+kd+ls')
# how the committed runs were made (the machine as their report gave it)
RUNS = dict(command='python benchmarks/quality.py --pairs 2', last_commit='5f0f10c', runs_commit='4e1e9f6',
            machine='AMD EPYC, 2 cores, 2 threads, torch 2.14.1+cu130', batch_size=64, jobs=2)
# (a, b): report a - b
COMPARISONS = [
    ('kd', 'vanilla'), ('icd', 'vanilla'), ('icd+kd', 'vanilla'), ('kd+ls', 'vanilla'), ('icd+kd+ls', 'vanilla'),
    ('icd', 'kd'), ('icd+kd', 'kd'), ('kd+ls', 'kd'), ('icd+kd+ls', 'kd+ls'), ('icd+kd+ls', 'kd'),
    ('icd', 'timm_feature'), ('icd+kd', 'timm_logit'),
    ('timm_feature', 'vanilla'),
]


def paired(rows, a: str, b: str):
    """(mean, low, high, n, p) of the per-seed difference a - b in test top-1, or None with fewer than 2 seeds."""
    r = paired_rows(rows, a, b)
    return None if r is None else (r['mean'], r['low'], r['high'], r['n'], r['p'])


class Family:
    """Every difference the report shows, so that Holm's correction runs over all of them before any is rendered."""

    def __init__(self):
        self.results = {}

    def add(self, key, result):
        if result is not None:
            self.results[key] = result

    def adjusted(self):
        keys = list(self.results)
        return dict(zip(keys, holm([self.results[k][4] for k in keys])))


def _cell(result, adjusted=None) -> str:
    if result is None:
        return '-'
    mean, low, high, n, p = result
    mark = ' **established**' if adjusted is not None and adjusted < 0.05 else ''
    holm_p = f', Holm {adjusted:.2f}' if adjusted is not None else ''
    return f'{mean:+.2f} [{low:+.2f}, {high:+.2f}], p {p:.3f}{holm_p}{mark}'


def _mean_std(values) -> str:
    if len(values) == 1:
        return f'{values[0]:.2f}'
    return f'{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}'


def _table(rows, methods):
    """Markdown rows of mean +- std (n) per pair and method."""
    pairs = list(dict.fromkeys(r['pair'] for r in rows))
    lines = ['| pair | ' + ' | '.join(methods) + ' |', '|' + '---|' * (len(methods) + 1)]
    for pair in pairs:
        cells = []
        for m in methods:
            values = [float(r['test_top1']) for r in rows if r['pair'] == pair and r['method'] == m]
            cells.append(f'{_mean_std(values)} (n={len(values)})' if values else '-')
        lines.append(f'| {pair} | ' + ' | '.join(cells) + ' |')
    return lines


def _comparisons(rows, comparisons, family: Family, adjusted=None):
    """Markdown rows: one comparison a - b per row, one column per pair. Without ``adjusted`` only collects the
    differences into ``family`` (the first pass); with it, renders them with their Holm-adjusted p."""
    pairs = list(dict.fromkeys(r['pair'] for r in rows))
    present = {r['method'] for r in rows}
    comparisons = [(a, b) for a, b in comparisons if a in present and b in present]
    lines = ['| difference | ' + ' | '.join(pairs) + ' |', '|' + '---|' * (len(pairs) + 1)]
    for a, b in comparisons:
        cells = []
        for pair in pairs:
            result = paired([r for r in rows if r['pair'] == pair], a, b)
            family.add((pair, a, b), result)
            cells.append(_cell(result, None if adjusted is None else adjusted.get((pair, a, b))))
        lines.append(f'| {a} - {b} | ' + ' | '.join(cells) + ' |')
    return lines


def write_report(out: Path = RESULTS) -> None:
    """``quality.md`` and ``quality.png`` in ``out`` from the runs, curves and teachers files there."""
    family = Family()
    _write(out, family, None)  # first pass: every difference the report shows, for Holm's correction
    _write(out, Family(), family.adjusted())


def _write(out: Path, family: Family, adjusted) -> None:
    with open(out / f'{NAME}_runs.csv') as f:
        rows = list(csv.DictReader(f))
    teachers = json.loads((out / f'{NAME}_teachers.json').read_text())
    main = [r for r in rows if r['study'] == 'main']
    methods = [m for m in METHODS if any(r['method'] == m for r in main)]
    seconds = sum(float(r['seconds']) for r in rows) + sum(t['seconds'] for t in teachers.values())
    lines = ['# Quality benchmark: Fashion-MNIST (cpu preset)', '',
             f'Runs: `{RUNS["command"]}` at v0.2 (the runner is archived: `git show {RUNS["last_commit"]}:benchmarks/'
             f'quality.py`; the runs were committed in {RUNS["runs_commit"]}). This report: `python '
             f'benchmarks/archive/quality_report.py`, from the committed CSVs. Top-1 (%) on the test split at the '
             f'final epoch; training on a stratified '
             f'subset of {main[0]["train_size"] if main else "?"} of the 60,000 training images, batch '
             f'{RUNS["batch_size"]}, 28x28 '
             f'input, cosine schedule, random resized crop (scale 0.6-1) and flips through timm_icd\'s in-memory '
             f'pipeline; the same data, augmentation, optimizer, schedule and seeds for every method.', '',
             f'Machine: {RUNS["machine"]}. Compute: {seconds / 60:.1f} min, the sum of every run\'s wall-clock time '
             f'(teachers included; {RUNS["jobs"]} runs at a time, one thread each).', '',
             '## Teachers', '', '| teacher | architecture | classes | train images | epochs | test top-1 |',
             '|---|---|---|---|---|---|']
    for name, t in teachers.items():
        lines.append(f'| {name} | {t["name"]} | {len(t["classes"])} | {t["train_size"]} | {t["epochs"]} | '
                     f'{t["top1"]:.2f} |')
    if main:
        lines += ['', f'## Same label space ({main[0]["epochs"]} epochs)', '', 'Mean +- std over seeds (n seeds; a '
                  'single seed: its value).',
                  ''] + _table(main, methods)
        lines += ['', '### Paired differences', '',
                  'Percentage points, mean over seeds [95% confidence interval, t-distribution, paired by seed], '
                  'the t-test\'s p and its Holm-adjusted p over every difference in this report '
                  f'({len(adjusted or {})}); **established** only when that adjusted p is below 0.05.', '']
        lines += _comparisons(main, COMPARISONS, family, adjusted)
    transfer = [r for r in rows if r['study'] == 'transfer']
    if transfer:
        lines += ['', '## Across label spaces (logit KD impossible)', '',
                  f'The teacher learned the six clothing classes; the student learns the four classes the teacher '
                  f'never saw (sandal, sneaker, bag, ankle boot) from {transfer[0]["train_size"]} other images, '
                  f'scored on the {transfer[0]["test_size"]} test images of those classes. `icd` is what '
                  f'`--method auto` picked here in v0.2, before the pre-registered study (which found no established '
                  f'gain from it).', ''] + _table(transfer, ['vanilla', 'timm_feature', 'icd'])
        lines += [''] + _comparisons(transfer, [('icd', 'vanilla'), ('timm_feature', 'vanilla'),
                                                ('icd', 'timm_feature')], family, adjusted)
    length = [r for r in rows if r['study'] == 'length']
    if length:
        seeds = {r['seed'] for r in length}
        short = [dict(r, pair=f'{r["pair"]}, {r["epochs"]} epochs') for r in main
                 if r['pair'] == length[0]['pair'] and r['seed'] in seeds and r['method'] in
                 {x['method'] for x in length}]
        long = [dict(r, pair=f'{r["pair"]}, {r["epochs"]} epochs') for r in length]
        both = short + long
        methods_l = [m for m in methods if any(r['method'] == m for r in length)]
        lines += ['', '## Training length', '', f'The same seeds ({", ".join(sorted(seeds))}) at both lengths.', '']
        lines += _table(both, methods_l) + [''] + _comparisons(both, [
            (a, b) for a, b in COMPARISONS if a in methods_l and b in methods_l], family, adjusted)
    lines += ['', f'Every run: `{NAME}_runs.csv`; test top-1 per epoch for seed 0: `{NAME}_curves.csv`; '
              f'plot: `{NAME}.png`.']
    findings = out / f'{NAME}_findings.md'
    if findings.exists():
        lines += ['', f'Findings and investigation: [{findings.name}]({findings.name}).']
    if adjusted is None:
        return
    (out / f'{NAME}.md').write_text('\n'.join(lines) + '\n')
    if main:
        plot(out, NAME, main, methods)


def plot(out: Path, name: str, rows, methods) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    pairs = list(dict.fromkeys(r['pair'] for r in rows))
    curves = {}
    curves_csv = out / f'{name}_curves.csv'
    if curves_csv.exists():
        with open(curves_csv) as f:
            for r in csv.DictReader(f):
                curves.setdefault(r['pair'], {}).setdefault(r['method'], []).append(
                    (int(r['epoch']), float(r['test_top1'])))
    curve_pairs = [p for p in pairs if p in curves]
    fig, axes = plt.subplots(1, 1 + len(curve_pairs), figsize=(5.5 * (1 + len(curve_pairs)), 4.4), squeeze=False)
    axes = axes[0]
    ax = axes[0]
    width = 0.8 / len(methods)
    seeds = {p: max(sum(r['pair'] == p and r['method'] == m for r in rows) for m in methods) for p in pairs}
    lows, highs = [], []
    for i, method in enumerate(methods):
        values = [[float(r['test_top1']) for r in rows if r['pair'] == p and r['method'] == method] for p in pairs]
        values = [v if len(v) > 1 or seeds[p] == 1 else [] for v, p in zip(values, pairs)]  # no lone-seed bars
        means = [np.mean(v) if v else np.nan for v in values]
        stds = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in values]
        lows += [m - s for m, s in zip(means, stds) if not np.isnan(m)]
        highs += [m + s for m, s in zip(means, stds) if not np.isnan(m)]
        ax.bar(np.arange(len(pairs)) + i * width - 0.4 + width / 2, means, width, yerr=stds, capsize=2,
               label=method)
    ax.set_ylim(max(0, min(lows) - 2), min(100, max(highs) + 1))
    ax.set_xticks(np.arange(len(pairs)), [p.replace('->', '\n-> ') for p in pairs], fontsize=8)
    ax.set_ylabel('test top-1 (%), final epoch, mean +- std')
    ax.set_title('Fashion-MNIST: method by pair')
    ax.legend(fontsize=7, ncol=2)
    for ax, pair in zip(axes[1:], curve_pairs):
        for method, points in curves.get(pair, {}).items():
            points.sort()
            ax.plot([e + 1 for e, _ in points], [t for _, t in points], marker='o', ms=3, label=method)
        ax.set_title(f'{pair}: test top-1 per epoch (seed 0)', fontsize=9)
        ax.set_xlabel('epoch')
        ax.set_ylabel('test top-1 (%)')
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f'{name}.png', dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('folder', nargs='?', default=str(RESULTS),
                        help='where the runs, curves and teachers files are, and the report goes (default: results/)')
    write_report(Path(parser.parse_args(argv).folder))
    return 0


if __name__ == '__main__':
    sys.exit(main())
