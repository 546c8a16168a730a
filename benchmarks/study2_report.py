"""The report of the second study (``study2.py report``): the three pairs' sweep rows combined, Holm over the four
primary contrasts, the sensitivity tests, the per-arm and per-seed tables, the run times and the decision rule.

The statistics are the sweep's (``timm_icd.publish.sweep_report.analyse`` over ``timm_icd.publish.stats``), given
the rows of all three pairs at once (each arm named ``PAIR:ARM``) so that Holm's step-down runs over C1-C4 together.
Until every primary run of every pair has its test result, the report holds progress counts only.
"""
import csv
import io
import json
import re
import statistics
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from timm_icd.base import write_text_atomic
from timm_icd.cli.sweep_runs import FIELDS, RUNS_CSV, TEST_CSV, read_csv
from timm_icd.cli.validate import validate
from timm_icd.publish.sweep_report import ALPHA, analyse

TEST_FIELDS = ['test_top1', 'test_top5', 'test_images']
ADAPTED = 'adapted_teachers.json'
SET_ASIDE, SET_ASIDE_TEST = 'set_aside_runs.csv', 'set_aside_test_withheld.csv'  # protocol2_execution.md


def _f(v: Optional[float], fmt: str = '+.2f') -> str:
    return '-' if v is None or v != v else format(v, fmt)


def _p(v: float) -> str:
    return '-' if v != v else f'{v:.4f}' if v >= 1e-4 else f'{v:.1e}'


def established(r: Mapping) -> Optional[str]:
    """'positive' or 'negative' when the contrast's Holm-adjusted p is below ALPHA (in its mean's direction)."""
    if not r['holm_p'] < ALPHA:
        return None
    return 'positive' if r['mean'] > 0 else 'negative'


def decide(contrasts: Mapping[str, Mapping], transfer_x: str) -> Dict[str, object]:
    """protocol2.md, "What the results decide": the arm with fewer loss terms unless a richer one is established
    better. ``contrasts``: C1-C4, each with its ``mean`` and ``holm_p``."""
    est = {name: established(r) for name, r in contrasts.items()}
    c1, c4 = est['C1'], est['C4']
    if c1 == 'negative' and c4 != 'positive' or c4 == 'negative' and c1 != 'positive':
        same = 'icd+kd'
        why = (f"icd+kd is established better than dist (C1 {est['C1'] or 'not established'}, C4 "
               f"{est['C4'] or 'not established'}) and not established worse on the other pair")
    else:
        same = 'dist'
        why = ('dist has fewer loss terms and icd+kd is not established better on one pair without being established '
               f"worse on the other (C1 {c1 or 'not established'}, C4 {c4 or 'not established'})")
    if est['C3'] == 'positive':
        across, why_across = transfer_x, f'C3 ({transfer_x} with the adapted teacher - vanilla) is established positive'
    else:
        across, why_across = 'vanilla', (f"C3 ({transfer_x} with the adapted teacher - vanilla) is "
                                         f"{est['C3'] or 'not established'}: the student trains alone")
    return {'same_label_space': same, 'same_label_space_why': why, 'across_label_spaces': across,
            'across_label_spaces_teacher_adapt': 'auto' if across != 'vanilla' else None,
            'across_label_spaces_why': why_across, 'established': est,
            'mean': {n: r['mean'] for n, r in contrasts.items()},
            'holm_p': {n: r['holm_p'] for n, r in contrasts.items()}}


def load(mirror: Path, pairs: Mapping[str, dict]) -> Dict[str, dict]:
    """Each pair's committed sweep rows and withheld test rows (``results/<name>/<pair>/``)."""
    return {pair: {'rows': read_csv(mirror / pair / RUNS_CSV),
                   'tests': {r['key']: r for r in read_csv(mirror / pair / TEST_CSV) if r.get('test_top1')}}
            for pair in pairs}


def complete(loaded: Mapping[str, dict], declared: Mapping[str, Sequence[str]]) -> bool:
    """Whether every declared primary run of every pair has a run row and a test result."""
    for pair, keys in declared.items():
        done = {r['key'] for r in loaded[pair]['rows'] if r['kind'] == 'run'}
        if any(k not in done or k not in loaded[pair]['tests'] for k in keys):
            return False
    return True


def _progress(pairs, loaded, declared) -> List[str]:
    """The runs with a result per arm, then the declared runs that have none (a run row and a test result), by key."""
    lines, missing = ['| pair | arm | runs with a result | declared |', '|---|---|---|---|'], []
    for pair, p in pairs.items():
        done = {r['key'] for r in loaded[pair]['rows'] if r['kind'] == 'run'} & set(loaded[pair]['tests'])
        for arm in p['arms']:
            keys = [k for k in declared[pair] if k.rsplit('-s', 1)[0] == arm]
            lines.append(f"| {p['label']} ({pair}) | {arm} | {sum(k in done for k in keys)} | {len(keys)} |")
        missing += [f'{pair}/{k}' for k in declared[pair] if k not in done]
    if missing:
        lines += ['', f'No result yet ({len(missing)}): ' + ', '.join(missing) + '.']
    return lines


def adapted_teachers(loaded: Mapping[str, dict], data: Mapping[str, str], sweeps: Path, mirror: Path) -> dict:
    """Exploratory: the test top-1 of each adapted teacher of pair T (its ``adaptX`` runs' ``teacher_adapted``
    folder, the same for every run of that teacher), measured once and kept in ``results/<name>/transfer/``."""
    path = mirror / 'transfer' / ADAPTED
    known = json.loads(path.read_text()) if path.exists() else {}
    for row in loaded['transfer']['rows']:
        folder = sweeps / 'transfer' / row.get('run_dir', '') / 'teacher_adapted'
        name = _teacher_name('transfer', row['teacher'])
        if row.get('arm') != 'adaptX' or name in known or not (folder / 'model.safetensors').exists():
            continue
        test = validate(str(folder), data['footwear'], split='test', batch_size=256, workers=0)
        known[name] = {'test_top1': test['top1'], 'test_images': test['images'], 'from_run': row['key']}
    if known:
        write_text_atomic(path, json.dumps(known, indent=1, sort_keys=True) + '\n')
    return known


def _teacher_name(pair: str, teacher: str) -> str:
    """``PAIR-teacherSEED`` (as teachers.json names it) of a sweep's teacher ``local-dir:.../vanilla-sSEED/student``."""
    found = re.search(r'vanilla-s(\d+)', teacher)
    return f'{pair}-teacher{found.group(1)}' if found else teacher


def _runs_csv(path: Path, pairs, loaded, revealed: bool) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, ['pair', *FIELDS, *TEST_FIELDS], extrasaction='ignore', lineterminator='\n')
    writer.writeheader()
    for pair in pairs:
        for r in loaded[pair]['rows']:
            test = loaded[pair]['tests'].get(r['key'], {}) if revealed else {}
            writer.writerow({**r, 'pair': pair, **{k: test.get(k, '') for k in TEST_FIELDS}})
    write_text_atomic(path, buffer.getvalue())


def _cost(pairs, loaded, teachers: Mapping[str, dict]) -> List[str]:
    lines, total = ['| pair | runs | median min per run | range (min) | runs h | teacher caches s |',
                    '|---|---|---|---|---|---|'], 0.0
    for pair, p in pairs.items():
        rows = loaded[pair]['rows']
        runs = [float(r['seconds']) / 60 for r in rows if r['kind'] == 'run' and r.get('seconds')]
        caches = sum(float(r['seconds']) for r in rows if r['kind'] == 'cache' and r.get('seconds'))
        total += sum(runs) * 60 + caches
        if runs:
            lines.append(f"| {p['label']} ({pair}) | {len(runs)} | {statistics.median(runs):.1f} | {min(runs):.1f} to "
                         f"{max(runs):.1f} | {sum(runs) / 60:.2f} | {caches:.0f} |")
    teacher_s = sum(float(t['seconds']) for t in teachers.values() if t.get('seconds'))
    return lines + ['', f'Teachers: {len(teachers)}, {teacher_s / 3600:.2f} h. In all (teachers, caches, runs): '
                        f'{(total + teacher_s) / 3600:.2f} h of run time (the sum of the recorded wall times; a run '
                        f'continued after an interruption records its last attempt only).']


def _results(pairs, loaded, s, teachers, adapted) -> tuple:
    """The analyses and the tables of a complete study."""
    rows, arms, group_of = [], [], {seed: f't{i % s["teachers"]}' for i, seed in enumerate(s['seeds'])}
    for pair, p in pairs.items():
        arms += [f"{p['label']}:{a}" for a in p['arms']]
        rows += [{**r, 'arm': f"{p['label']}:{r['arm']}", 'test_top1': loaded[pair]['tests'][r['key']]['test_top1']}
                 for r in loaded[pair]['rows'] if r['kind'] == 'run' and r['key'] in loaded[pair]['tests']]
    named = {c: (pair, f"{p['label']}:{a}", f"{p['label']}:{b}") for pair, p in pairs.items() for c, a, b in
             p['contrasts']}
    analysed = analyse(rows, arms, [(a, b) for _, a, b in named.values()], 'test_top1', group_of)
    primary = {c: analysed['contrasts'][f'{a}-{b}'] for c, (_, a, b) in named.items()}
    explore = [(f"{p['label']}:{a}", f"{p['label']}:{b}") for p in pairs.values() for a, b in p['explore']]
    label = {pair: {seed: f"{pair}-teacher{p['teacher_seeds'] + i % s['teachers']}"
                    for i, seed in enumerate(s['seeds'])} for pair, p in pairs.items()}
    exploratory = analyse(rows, arms, explore, 'test_top1', group_of)['contrasts'] if explore else {}
    lines = ['## Primary contrasts (test split, top-1 percentage points, paired by seed)', '',
             f"Two-sided one-sample t-test of the per-seed differences; Holm's step-down over C1-C4 at family-wise "
             f'{ALPHA}. "established" means Holm-adjusted p < {ALPHA}, in the direction of the mean; a contrast that '
             f'is not established is no evidence of no difference (protocol2.md: C2 and C3 are underpowered).', '',
             '| | pair | contrast | n | mean | 95% CI | positive seeds | p | Holm p | established |',
             '|---|---|---|---|---|---|---|---|---|---|']
    for c, (pair, a, b) in named.items():
        r, e = primary[c], established(primary[c])
        lines.append(f"| {c} | {pairs[pair]['label']} ({pair}) | `{a.split(':')[1]}` - `{b.split(':')[1]}` | {r['n']} "
                     f"| {_f(r['mean'])} | [{_f(r['low'])}, {_f(r['high'])}] | {r['positive']} of {r['n']} | "
                     f"{_p(r['p'])} | {_p(r['holm_p'])} | {f'**yes, {e}**' if e else 'no'} |")
    lines += ['', 'Sensitivity (not deciding): exact sign test and exact sign-flip permutation test over seeds, the '
                  "mean difference per teacher (t0, t1, ...: the pair's teachers in the order of their seeds, as in "
                  'the per-seed tables) and a t-test over those means; each p also Holm-adjusted over C1-C4.', '',
              '| | sign p | Holm | sign-flip p | Holm | per teacher | p over teachers | Holm |',
              '|---|---|---|---|---|---|---|---|']
    for c, r in primary.items():
        per = ', '.join(f'{g}: {_f(v)}' for g, v in r['by_group'].items())
        lines.append(f"| {c} | {_p(r['sign_p'])} | {_p(r['holm_sign_p'])} | {_p(r['permutation_p'])} | "
                     f"{_p(r['holm_permutation_p'])} | {per} | {_p(r['group_p'])} | {_p(r['holm_group_p'])} |")
    lines += ['', '## Exploratory (no correction, no claim)', '',
              '| contrast | n | mean | 95% CI | positive seeds | p |', '|---|---|---|---|---|---|']
    for a, b in explore:
        r = exploratory[f'{a}-{b}']
        lines.append(f"| {a.split(':')[0]}: `{a.split(':')[1]}` - `{b.split(':')[1]}` | {r['n']} | {_f(r['mean'])} | "
                     f"[{_f(r['low'])}, {_f(r['high'])}] | {r['positive']} of {r['n']} | {_p(r['p'])} |")
    lines += ['', 'Per arm (test top-1, %):', '', '| arm | n | mean | 95% CI | std | min | max |',
              '|---|---|---|---|---|---|---|']
    for arm in arms:
        m = analysed['arms'][arm]
        lines.append(f"| {arm} | {m['n']} | {_f(m['mean'], '.2f')} | [{_f(m['low'], '.2f')}, {_f(m['high'], '.2f')}] "
                     f"| {_f(m['std'], '.2f')} | {_f(m['min'], '.2f')} | {_f(m['max'], '.2f')} |")
    lines += ['', "Adapted teachers of pair T (each teacher's linear probe, its own test top-1, %): " +
              (', '.join(f"{t}: {v['test_top1']:.2f}" for t, v in sorted(adapted.items())) or
               'not measured (the runs\' folders are not on this machine)') + '.',
              '', 'Teachers (validation top-1 at the final epoch, %): ' +
              ', '.join(f"{k}: {float(t['val_top1']):.2f}" for k, t in sorted(teachers.items()) if t.get('val_top1'))
              + '.', '', '## Per seed (test top-1, %)']
    for pair, p in pairs.items():
        lines += ['', f"### {p['label']} ({pair}): {p['teacher']} -> {p['student']}", '',
                  '| seed | teacher | ' + ' | '.join(p['arms']) + ' |', '|---|---|' + '---|' * len(p['arms'])]
        by = {(r['arm'], int(r['seed'])): float(r['test_top1']) for r in rows}
        for seed in s['seeds']:
            lines.append(f'| {seed} | {label[pair][seed]} | ' + ' | '.join(
                _f(by.get((f"{p['label']}:{a}", seed)), '.2f') for a in p['arms']) + ' |')
    return primary, lines


def write_report(cfg, s: dict, pairs: Mapping[str, dict], declared: Mapping[str, Sequence[str]],
                 data: Mapping[str, str], transfer_x: str) -> Path:
    """``<out>/<name>.md`` and ``<name>_runs.csv`` from the committed CSVs; with every primary run in, also the test
    analysis and (the CPU preset, or --quick) ``<name>_decision.json``."""
    out = Path(cfg.out).absolute()
    mirror, sweeps = out / cfg.name, Path(cfg.data_dir).absolute() / cfg.name / 'sweeps'
    loaded = load(mirror, pairs)
    revealed = complete(loaded, declared)
    teachers_path = mirror / 'teachers.json'
    teachers = json.loads(teachers_path.read_text()) if teachers_path.exists() else {}
    _runs_csv(out / f'{cfg.name}_runs.csv', pairs, loaded, revealed)
    commits = sorted({r['commit'] for p in loaded.values() for r in p['rows'] if r.get('commit')})
    command = f"python benchmarks/study2.py all{' --quick' if cfg.quick else ''}" + (
        f' --preset {cfg.preset}' if cfg.preset != 'cpu' else '')
    n = sum(len(k) for k in declared.values())
    quick = ' (quick mode: a pipeline check, not evidence)' if cfg.quick else ''
    lines = [f'# The second pre-registered study: results{quick}', '',
             f'Generated by `{command}` on {time.strftime("%Y-%m-%d")}, following [protocol2.md](protocol2.md) '
             f"(committed before the study's first run). Code: {', '.join(commits) or '-'}. Every number comes from "
             f'the sweeps\' CSVs in [{cfg.name}/]({cfg.name}/), all rows in [{cfg.name}_runs.csv]({cfg.name}_runs.csv) '
             f"(paths relative to each pair's sweep folder). {s['jobs']} runs at a time, {s['threads']} torch "
             f'thread(s) each.', '', '## Status', '']
    lines += _progress(pairs, loaded, declared)
    aside = {pair: sum(r['kind'] == 'run' for r in read_csv(mirror / pair / SET_ASIDE)) for pair in pairs}
    if any(aside.values()):
        lines += ['', 'Set aside and run again, never analysed: ' + ', '.join(
            f"{n} run(s) of pair {pairs[pair]['label']}" for pair, n in aside.items() if n) + ", taught by a teacher "
            "whose retrained weights differed from the recorded ones ([protocol2_execution.md](protocol2_execution.md),"
            " `teachers.json` under `replaced`)."]
    if not revealed:
        lines += ['', f'Withheld: the test numbers appear when every one of the {n} primary runs has its test result; '
                      'nothing is decided before.']
        write_text_atomic(out / f'{cfg.name}.md', '\n'.join(lines) + '\n')
        return out / f'{cfg.name}.md'
    adapted = adapted_teachers(loaded, data, sweeps, mirror)
    primary, body = _results(pairs, loaded, s, teachers, adapted)
    lines += ['', f'Every one of the {n} primary runs has its test result.', '', *body, '', '## Run time', '',
              *_cost(pairs, loaded, teachers), '', '## What the results decide', '']
    if cfg.preset != 'cpu':
        lines.append('Nothing: this preset is a separate, labelled experiment (protocol2.md, "The GPU preset").')
    else:
        decision = decide(primary, transfer_x)
        write_text_atomic(out / f'{cfg.name}_decision.json', json.dumps(decision, indent=1) + '\n')
        adapt = ' (the teacher adapted by `--teacher-adapt auto`)' if decision['across_label_spaces_teacher_adapt'] \
            else ''
        lines += [f"* `--method auto`, teacher of the dataset's classes: **{decision['same_label_space']}**: "
                  f"{decision['same_label_space_why']}.",
                  f"* `--method auto`, teacher of other classes: **{decision['across_label_spaces']}**{adapt}: "
                  f"{decision['across_label_spaces_why']}.",
                  f'* Also in [{cfg.name}_decision.json]({cfg.name}_decision.json).']
    write_text_atomic(out / f'{cfg.name}.md', '\n'.join(lines) + '\n')
    return out / f'{cfg.name}.md'
