"""The study's analysis, as ``results/protocol.md`` fixes it: paired differences by seed, two-sided t-tests, Holm's
step-down correction over the four primary contrasts; exploratory contrasts reported without correction or claim."""
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from common import machine
from timm_icd.publish.stats import group_means, holm, paired

ALPHA = 0.05


def values(rows: List[dict], pair: str, family: str, teacher: str = 'trained',
           stages: Tuple[str, ...] = ('confirm', 'explore')) -> Dict[int, float]:
    """Test top-1 by seed of one arm: its pair, family and teacher ('trained', 'random' or '' for none)."""
    out = {}
    for r in rows:
        if r['stage'] not in stages or r['pair'] != pair or r['family'] != family or r['test_top1'] in ('', None):
            continue
        kind = '' if not r['teacher'] else 'random' if r['teacher'].startswith('random') else 'trained'
        if kind == (teacher if family != 'vanilla' else ''):
            out[int(r['seed'])] = float(r['test_top1'])
    return out


def teachers_of(rows: List[dict], pair: str) -> Dict[int, str]:
    return {int(r['seed']): r['teacher'] for r in rows if r['stage'] == 'confirm' and r['pair'] == pair
            and r['teacher'] and not r['teacher'].startswith('random')}


def contrasts(choice: Dict[str, str]) -> Tuple[List[tuple], List[tuple]]:
    """(primary, exploratory): (name, label, (pair, family, teacher) of A, of B)."""
    x, other = choice['X'], 'dist' if choice['X'] == 'dkd' else 'dkd'
    cnn = lambda f, t='trained': ('cnn', f, t)  # noqa: E731
    tr = lambda f, t='trained': ('transfer', f, t)  # noqa: E731
    primary = [
        ('P1', 'icd+kd - kd (same label space)', cnn('icd+kd'), cnn('kd')),
        ('P2', f'icd+{x} - {x} (same label space; {x}: the better logit term on validation)', cnn(f'icd+{x}'), cnn(x)),
        ('P3', 'icd - vanilla (across label spaces)', tr('icd'), tr('vanilla')),
        ('P4', 'icd - icd with a random teacher (across label spaces)', tr('icd'), tr('icd', 'random')),
    ]
    exploratory = [
        ('E1', 'kd - vanilla', cnn('kd'), cnn('vanilla')),
        ('E2', f'{x} - vanilla', cnn(x), cnn('vanilla')),
        ('E3', 'icd+kd - vanilla', cnn('icd+kd'), cnn('vanilla')),
        ('E4', f'icd+{x} - vanilla', cnn(f'icd+{x}'), cnn('vanilla')),
        ('E5', f'{x} - kd', cnn(x), cnn('kd')),
        ('E6', f'icd+{x} - icd+kd', cnn(f'icd+{x}'), cnn('icd+kd')),
        ('E7', f'{other} - {x}', cnn(other), cnn(x)),
        ('E8', 'kd with logit standardisation - kd (standardisation alone, at KD\'s weight and T)', cnn('kd+ls'),
         cnn('kd')),
        ('E9', 'icd with a random teacher - vanilla (across label spaces)', tr('icd', 'random'), tr('vanilla')),
    ]
    return primary, exploratory


def analyse(rows: List[dict], choice: Dict[str, str]) -> Dict[str, dict]:
    primary, exploratory = contrasts(choice)
    results = {}
    for name, label, a, b in primary + exploratory:
        results[name] = {'label': label, **paired(values(rows, *a), values(rows, *b))}
        groups = group_means(dict(zip(results[name]['seeds'], results[name]['diffs'])), teachers_of(rows, a[0]))
        results[name]['by_teacher'], results[name]['teacher_p'] = groups['by_group'], groups['p']
    adjusted = holm([results[name]['p'] for name, *_ in primary])
    for (name, *_), p in zip(primary, adjusted):
        results[name]['holm_p'] = p
        results[name]['established'] = bool(p < ALPHA)
    return results


def selected_val_means(rows: List[dict], choice: Dict[str, str]) -> Dict[str, float]:
    """Mean validation top-1 of each logit family's selected configuration over the tuning seeds."""
    means = {}
    for family in ('kd', 'dkd', 'dist'):
        v = [float(r['val_top1']) for r in rows if r['stage'] == 'tune' and r['family'] == family
             and r['config'] == choice[family]]
        means[family] = statistics.mean(v) if v else float('nan')
    return means


def decide(results: Dict[str, dict], choice: Dict[str, str], val_means: Dict[str, float]) -> Dict[str, object]:
    """``--method auto`` as protocol.md's "What the results decide" fixes it, from the analysed primary contrasts.

    Same label space: ``icd+X`` if P2 is established positive, else ``icd+kd`` if P1 is, else the logit term (kd, dkd,
    dist) with the highest validation mean of its selected configuration (``val_means``). Across label spaces: ``icd``
    if P3 is established positive, else ``vanilla``.
    """
    up = {name: bool(results[name]['established'] and results[name]['mean'] > 0) for name in ('P1', 'P2', 'P3', 'P4')}
    x = choice['X']
    if up['P2']:
        same, why = f'icd+{x}', f'P2 (icd+{x} - {x}) is established positive'
    elif up['P1']:
        same, why = 'icd+kd', 'P1 (icd+kd - kd) is established positive and P2 is not'
    else:
        same = max(('kd', 'dkd', 'dist'), key=lambda f: val_means[f])
        why = (f'neither P1 nor P2 is established positive, so no ICD term: {same}, the logit term with the highest '
               f'validation mean after tuning (' + ', '.join(f'{f} {v:.2f}' for f, v in val_means.items()) + ')')
    across, why_across = ('icd', 'P3 (icd - vanilla across label spaces) is established positive') if up['P3'] else (
        'vanilla', 'P3 (icd - vanilla across label spaces) is not established positive: no feature method is '
                   'established across label spaces')
    return {'same_label_space': same, 'same_label_space_why': why, 'across_label_spaces': across,
            'across_label_spaces_why': why_across, 'established_positive': up,
            'holm_p': {name: results[name]['holm_p'] for name in up}}


def _f(v: Optional[float], fmt: str = '+.2f') -> str:
    return '-' if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, fmt)


def _p(v: float) -> str:
    return '-' if np.isnan(v) else f'{v:.4f}' if v >= 1e-4 else f'{v:.1e}'


def _arm_table(rows: List[dict], pair: str, arms: List[tuple]) -> List[str]:
    lines = ['| arm | n | mean | std | min | max |', '|---|---|---|---|---|---|']
    for label, family, teacher in arms:
        v = list(values(rows, pair, family, teacher).values())
        if not v:
            continue
        sd = f'{statistics.stdev(v):.2f}' if len(v) > 1 else 'n=1'
        lines.append(f'| {label} | {len(v)} | {statistics.mean(v):.2f} | {sd} | {min(v):.2f} | {max(v):.2f} |')
    return lines


def _unfinished(rows: List[dict], expected: Sequence[dict]) -> List[str]:
    """The report's account of the protocol's runs that have no row yet, primary and exploratory apart."""
    done = {r['key'] for r in rows}
    missing = [j for j in expected if j['key'] not in done]
    primary = [j for j in expected if j['stage'] != 'explore']
    lines = ['', '## Runs not finished', '']
    if not missing:
        return lines + [f'None: all {len(primary)} primary runs (the teacher caches included) and '
                        f'{len(expected) - len(primary)} exploratory runs of the protocol finished.']
    for label, stage_runs in (('primary', primary), ('exploratory', [j for j in expected if j['stage'] == 'explore'])):
        absent = [j['key'] for j in stage_runs if j['key'] not in done]
        if absent:
            lines.append(f'* {len(absent)} of {len(stage_runs)} {label} runs have no result; the tables above leave '
                         f'them out: {", ".join(f"`{k}`" for k in absent)}.')
    return lines


def write_report(cfg, s, rows: List[dict], choice: Dict[str, str], grid: dict, margin: float,
                 expected: Sequence[dict] = ()) -> Path:
    """``<out>/<name>.md``: the tuning, the primary contrasts with Holm-adjusted p, the exploratory ones, the arms,
    the teachers and the ``expected`` confirm-stage runs that have no row in ``rows`` yet."""
    results = analyse(rows, choice)
    primary, exploratory = contrasts(choice)
    x = choice['X']
    hours = sum(float(r['seconds'] or 0) for r in rows) / 3600
    command = f"python benchmarks/study.py all{' --quick' if cfg.quick else ''}" + \
        (f' --preset {cfg.preset}' if cfg.preset != 'cpu' else '')
    lines = [f'# The pre-registered study: results{" (quick mode: a pipeline check, not evidence)" if cfg.quick else ""}',
             '',
             f'Generated by `{command}` on {time.strftime("%Y-%m-%d")}, following [protocol.md](protocol.md) '
             f'(committed before the first confirmatory run). Machine: '
             f'{machine(torch.device("cuda") if torch.cuda.is_available() else None)}, Python '
             f'{platform.python_version()}. Compute: {hours:.1f} h, the sum of the runs\' recorded wall times ({s["jobs"]} '
             f'runs at a time, {s["threads"]} thread(s) each; a run continued after an interruption records its last '
             f'attempt only). Every number comes from [{cfg.name}_runs.csv]'
             f'({cfg.name}_runs.csv).', '',
             '## Tuning (validation split; the test split is never evaluated here)', '',
             f'Mean validation top-1 (%) over the tuning seeds {s["tune_seeds"]}; a configuration replaces its family\'s '
             f'default only when it is better by more than {margin} points.', '',
             '| family (method) | configuration | flags | validation top-1 | selected |', '|---|---|---|---|---|']
    for family, (method, configs) in grid.items():
        for config, flags in configs.items():
            v = [float(r['val_top1']) for r in rows if r['stage'] == 'tune' and r['family'] == family
                 and r['config'] == config]
            score = ', '.join(f'{x_:.2f}' for x_ in v) + (f' (mean {np.mean(v):.2f})' if v else '')
            lines.append(f"| {family} ({method}) | {config} | `{' '.join(flags) or '(defaults)'}` | {score or '-'} | "
                         f"{'yes' if choice[family] == config else ''} |")
    lines += ['', f'X, the logit term of P2: **{x}** (the higher validation mean of the selected DKD and DIST '
                  f'configurations).', '',
              '## Primary contrasts (test split, top-1 percentage points, paired by seed)', '',
              f'Two-sided t-test of the per-seed differences; Holm\'s step-down over P1-P4 at family-wise '
              f'{ALPHA}. "established" means Holm-adjusted p < {ALPHA}; nothing else is claimed.', '',
              '| | contrast | n | mean | 95% CI | positive seeds | p | Holm p | established |',
              '|---|---|---|---|---|---|---|---|---|']
    for name, *_ in primary:
        r = results[name]
        lines.append(f"| {name} | {r['label']} | {r['n']} | {_f(r['mean'])} | [{_f(r['low'])}, {_f(r['high'])}] | "
                     f"{r['positive']} of {r['n']} | {_p(r['p'])} | {_p(r['holm_p'])} | "
                     f"{'**yes**' if r['established'] else 'no'} |")
    lines += ['', 'Sensitivity (not part of the decision): the mean difference per teacher, and a t-test over those '
                  'per-teacher means (teacher variance counted in full, with 2 degrees of freedom).', '',
              '| | per teacher | p over teachers | exact sign test p |', '|---|---|---|---|']
    for name, *_ in primary:
        r = results[name]
        per = ', '.join(f'{t}: {_f(v)}' for t, v in r['by_teacher'].items())
        lines.append(f"| {name} | {per} | {_p(r['teacher_p'])} | {_p(r['sign_p'])} |")
    lines += ['', '## Exploratory contrasts (no correction, no claim)', '',
              '| | contrast | n | mean | 95% CI | positive seeds | p |', '|---|---|---|---|---|---|---|']
    for name, *_ in exploratory:
        r = results[name]
        if r['n']:
            lines.append(f"| {name} | {r['label']} | {r['n']} | {_f(r['mean'])} | [{_f(r['low'])}, {_f(r['high'])}] "
                         f"| {r['positive']} of {r['n']} | {_p(r['p'])} |")
    other = 'dist' if x == 'dkd' else 'dkd'
    lines += ['', '## Test top-1 per arm (%)', '', '### Same label space: resnet18 -> mobilenetv3_small_050', '']
    lines += _arm_table(rows, 'cnn', [('vanilla (exploratory)', 'vanilla', ''), ('kd', 'kd', 'trained'),
                                      ('icd+kd', 'icd+kd', 'trained'), (x, x, 'trained'),
                                      (f'icd+{x}', f'icd+{x}', 'trained'), (f'{other} (exploratory)', other, 'trained'),
                                      ('kd+ls (exploratory)', 'kd+ls', 'trained')])
    lines += ['', '### Across label spaces: clothing teacher (resnet18), footwear-and-bags student', '']
    lines += _arm_table(rows, 'transfer', [('vanilla', 'vanilla', ''), ('icd', 'icd', 'trained'),
                                           ('icd, random teacher', 'icd', 'random')])
    teachers = sorted((r for r in rows if r['stage'] == 'teachers'), key=lambda r: r['key'])
    if teachers:
        lines += ['', '## Teachers (validation top-1, final epoch)', '', '| teacher | validation top-1 |', '|---|---|']
        lines += [f"| {r['key']} | {float(r['val_top1']):.2f} |" for r in teachers]
    missing_primary = [j for j in expected if j['stage'] != 'explore' and j['key'] not in {r['key'] for r in rows}]
    lines += ['', '## What the results decide', '']
    if cfg.preset != 'cpu':
        lines.append('Nothing: this preset is a separate, labelled experiment (protocol.md, "The GPU preset").')
    elif not expected:
        lines.append('Nothing: the report was not given the protocol\'s list of runs, so it cannot tell whether every '
                     'primary run has finished.')
    elif missing_primary:
        lines.append(f'Nothing yet: {len(missing_primary)} primary runs have no result, and the protocol decides only '
                     f'when every primary run has finished.')
    else:
        decision = decide(results, choice, selected_val_means(rows, choice))
        lines += [f"* `--method auto`, teacher of the dataset's classes: **{decision['same_label_space']}**: "
                  f"{decision['same_label_space_why']}.",
                  f"* `--method auto`, teacher of other classes: **{decision['across_label_spaces']}**: "
                  f"{decision['across_label_spaces_why']}.",
                  f"* Also in [{cfg.name}_decision.json]({cfg.name}_decision.json)" +
                  ("; `tests/test_study.py` checks that it follows from the runs above and that `--method auto` "
                   "does what it says." if cfg.name == 'study' else '.')]
        (Path(cfg.out) / f'{cfg.name}_decision.json').write_text(json.dumps(decision, indent=1) + '\n')
    if expected:
        lines += _unfinished(rows, expected)
    path = Path(cfg.out) / f'{cfg.name}.md'
    path.write_text('\n'.join(lines) + '\n')
    return path
