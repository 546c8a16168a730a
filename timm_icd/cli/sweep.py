"""Choose a method on your own teacher, student and dataset: methods x seeds, each a real training run, side by side.

    python -m timm_icd sweep --teacher T --student S --dataset D --methods vanilla,kd,icd+kd,dist --seeds 0-4 \\
        --contrast icd+kd-kd --contrast dist-icd+kd --jobs 2 --out sweep -- --epochs 24 -b 64
    python -m timm_icd sweep --teachers T1,T2,T3 ...      # seeds go round-robin over the teachers
    python -m timm_icd sweep ... --arm 'kd1=kd --task-loss-weight 1 --kd-loss-weight 1'   # an arm with its own flags
    python -m timm_icd sweep --teachers T1,T2,T3 ... --only-teacher 1   # T2's seeds only (one job per teacher)

Every run is ``train_icd.py`` with the flags after ``--``, ``--seed`` (the student's initialisation) and the shared
``--data-seed`` (the batches), one torch thread each. Each teacher's outputs are written once, ahead of its runs,
into a teacher cache that they all read. Runs are scored on a validation split (the dataset's, else a hold-out of
train), never on the test split unless ``--test-split`` names it; its numbers are then kept out of the output and the
report until every declared run has one. Rerun the same command to continue: finished runs (one row each in
``OUT/sweep_runs.csv``) are kept, a killed run continues from its last checkpoint.
"""
import json
import logging
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..base import UserError, write_text_atomic
from ..data import HOLDOUT, load_dataset_dict
from ..publish.sweep_report import REPORT, TESTS, write_sweep_report
from ..run import PREEMPTED_EXIT_CODE, ArgumentParser, parse_and_validate
from .common import run_command
from .sweep_runs import (
    RUNS_CSV, FIELDS, add_test_row, check_same_flags, commit_of_package, execute, read_csv, relative, relative_argv,
    result_row, withheld_rows, write_csv)

_logger = logging.getLogger(__name__)

OWNED = {'--output', '--seed', '--data-seed', '--method', '--teacher', '--kd-model-name', '--student', '--model',
         '--dataset', '--resume', '--teacher-cache', '--val-split', '--overwrite', '--kd-distill-type'}
VALIDATION_SPLITS = ('validation', 'valid', 'val')
ARM_NAME = re.compile(r'^[A-Za-z0-9_+.]+$')


def create_parser() -> ArgumentParser:
    parser = ArgumentParser(prog='python -m timm_icd sweep', description=__doc__.splitlines()[0],
                            epilog='Flags after -- go to every run (train_icd.py --help).')
    parser.add_argument('--student', required=True, metavar='MODEL', help='the student (as train_icd.py takes it)')
    parser.add_argument('--teacher', nargs='+', action='extend', default=[], metavar='MODEL',
                        help='the teacher; several: seeds go round-robin over them')
    parser.add_argument('--teachers', default=None, metavar='T1,T2,...', help='several teachers, comma-separated')
    parser.add_argument('--dataset', default='digits', help='what train_icd.py --dataset takes (default: digits)')
    parser.add_argument('--methods', default='', metavar='M1,M2,...', help='arms named by their method')
    parser.add_argument('--arm', action='append', default=[], metavar="NAME='METHOD FLAGS'",
                        help='an arm with its own train_icd.py flags (repeatable)')
    parser.add_argument('--seeds', default='0-4', help='student seeds: 0-9 or 0,1,5 (default: 0-4)')
    parser.add_argument('--data-seed', default='0', metavar='N|seed',
                        help='the batches every run sees (default: 0); seed: each seed its own batches, and its own '
                             'teacher cache, as the pre-registered study')
    parser.add_argument('--contrast', action='append', default=[], metavar='A-B',
                        help='a declared paired contrast of two arms (repeatable; Holm over all of them)')
    parser.add_argument('--primary-test', default='t', choices=sorted(TESTS),
                        help='the test the Holm column uses (default: t, as the pre-registered study)')
    parser.add_argument('--out', default='sweep', help='the sweep folder (default: sweep)')
    parser.add_argument('--jobs', type=int, default=1, help='runs side by side (default: 1)')
    parser.add_argument('--threads', type=int, default=1, help='torch threads per run (default: 1)')
    parser.add_argument('--teacher-cache', default=None, metavar='DIR',
                        help='folder of the teacher caches (default: OUT/teacher_cache; none: no cache)')
    parser.add_argument('--val-split', default=None, metavar='NAME',
                        help='the split runs are scored on (default: validation/valid/val, else a hold-out of train)')
    parser.add_argument('--test-split', default=None, metavar='NAME',
                        help='also measure each student on this split; its numbers are withheld until every run is in')
    parser.add_argument('--only-teacher', type=int, default=None, metavar='K',
                        help="run only the seeds of the K-th teacher (0 first) and its cache: one teacher's runs per "
                             "job or session; every run stays declared, so the test split waits for all of them")
    parser.add_argument('--report', action='store_true', help='write the report from the CSV; run nothing')
    return parser


def parse_seeds(text: str) -> List[int]:
    seeds = []
    try:
        for part in text.split(','):
            low, _, high = part.strip().partition('-')
            seeds += list(range(int(low), int(high) + 1)) if high else [int(low)]
    except ValueError:
        raise UserError(f'--seeds {text}: give seeds as 0-9 or 0,1,5.')
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f'--seeds {text}: give each seed once.')
    return seeds


def parse_arms(methods: str, arms: List[str]) -> Dict[str, Tuple[str, List[str]]]:
    out: Dict[str, Tuple[str, List[str]]] = {m: (m, []) for m in methods.split(',') if m}
    for spec in arms:
        name, _, rest = spec.partition('=')
        words = shlex.split(rest)
        if not words:
            raise UserError(f"--arm {spec}: give it as NAME='METHOD FLAGS', e.g. kd1='kd --kd-loss-weight 1'.")
        out[name] = (words[0], words[1:])
    if not out:
        raise UserError('name the arms: --methods vanilla,kd,icd+kd (and/or --arm NAME=\'METHOD FLAGS\').')
    for name in out:
        if not ARM_NAME.match(name):
            raise UserError(f"arm name '{name}': letters, digits, _, + and . only (a contrast is A-B).")
    return out


def parse_contrasts(texts: List[str], arms: Dict[str, tuple]) -> List[Tuple[str, str]]:
    out = []
    for text in texts:
        parts = text.split('-')
        if len(parts) != 2 or not all(p in arms for p in parts) or parts[0] == parts[1]:
            raise UserError(f"--contrast {text}: give it as A-B, two different arms of: {', '.join(arms)}.")
        out.append((parts[0], parts[1]))
    return out


def split_argv(argv: List[str]) -> Tuple[List[str], List[str]]:
    if '--' in argv:
        i = argv.index('--')
        return argv[:i], argv[i + 1:]
    return argv, []


def choose_val_split(cfg, passthrough: List[str]) -> str:
    """The split runs are scored on; the test split never."""
    splits = list(load_dataset_dict(cfg.dataset, streaming='--streaming' in passthrough))
    if cfg.test_split is not None and cfg.test_split not in splits:
        raise UserError(f"--test-split {cfg.test_split}: dataset '{cfg.dataset}' has the splits {', '.join(splits)}.")
    if cfg.val_split is not None:
        if cfg.val_split in ('test', cfg.test_split):
            raise UserError(f'--val-split {cfg.val_split}: the sweep never scores on the test split; name it with '
                            f'--test-split, or leave --val-split out (a hold-out of train is the default).')
        return cfg.val_split
    return next((s for s in VALIDATION_SPLITS if s in splits), HOLDOUT)


def plan(cfg, passthrough: List[str], root: Path) -> Tuple[List[dict], Dict[str, str], dict]:
    """The sweep's jobs (one teacher cache per teacher, then arms x seeds, seed by seed), each seed's teacher, and
    what the report states."""
    arms = parse_arms(cfg.methods, cfg.arm)
    seeds = parse_seeds(cfg.seeds)
    teachers = cfg.teacher + [t for t in (cfg.teachers or '').split(',') if t]
    needs_teacher = [a for a, (method, _) in arms.items() if method != 'vanilla']
    if needs_teacher and not teachers:
        raise UserError(f"arms {', '.join(needs_teacher)} need a teacher: --teacher MODEL (or --teachers T1,T2).")
    bad = sorted({a.split('=')[0] for a in passthrough if a.split('=')[0] in OWNED})
    if bad:
        raise UserError(f"{', '.join(bad)} after --: the sweep sets these itself (see --help).")
    val_split = choose_val_split(cfg, passthrough)
    cache_root = None if (cfg.teacher_cache or '').lower() == 'none' else Path(
        cfg.teacher_cache or root / 'teacher_cache').absolute()
    base = ['--student', cfg.student, '--dataset', cfg.dataset, '--val-split', val_split]
    teacher_of = {seed: i % len(teachers) for i, seed in enumerate(seeds)} if teachers else {}
    data_seed_of = {seed: seed if cfg.data_seed == 'seed' else int(cfg.data_seed) for seed in seeds}
    jobs, caches = [], {}  # one cache per (teacher, data seed) that a run of a teacher-using arm reads
    for seed in seeds if needs_teacher and cache_root is not None else []:
        k, ds = teacher_of[seed], data_seed_of[seed]
        if (k, ds) in caches:
            continue
        key, method = f'cache-t{k}' + (f'-d{ds}' if cfg.data_seed == 'seed' else ''), arms[needs_teacher[0]][0]
        slug = re.sub(r'[^A-Za-z0-9_.-]+', '_', teachers[k].rstrip('/').rsplit('/', 1)[-1])[:40]
        caches[k, ds] = (key, str(cache_root / f"{key[len('cache-'):]}-{slug}"))
        argv = ['--teacher', teachers[k], *base, '--method', method, '--seed', str(seed), '--data-seed', str(ds),
                *passthrough, '--teacher-cache', caches[k, ds][1]]
        jobs.append(dict(kind='cache', key=key, arm='', method=method, seed='', data_seed=ds,
                         teacher=relative(teachers[k], root), argv=argv, record_argv=argv, cache_dir=caches[k, ds][1],
                         log=str(root / 'logs' / f'{key}.log')))
    for seed in seeds:
        for arm, (method, flags) in arms.items():
            key, run_dir, ds = f'{arm}-s{seed}', root / 'runs' / f'{arm}-s{seed}', data_seed_of[seed]
            argv = [*base, '--method', method, '--seed', str(seed), '--data-seed', str(ds)]
            teacher, cache = '', (None, None)
            if method != 'vanilla':
                teacher, cache = teachers[teacher_of[seed]], caches.get((teacher_of[seed], ds), (None, None))
                argv += ['--teacher', teacher] + (['--teacher-cache', cache[1]] if cache[1] else [])
            argv += [*flags, *passthrough]
            jobs.append(dict(kind='run', key=key, arm=arm, method=method, seed=seed, data_seed=ds,
                             teacher=relative(teacher, root) if teacher else '', record_argv=list(argv),
                             argv=argv + ['--output', str(run_dir), '--resume', 'auto'], run_dir=str(run_dir),
                             log=str(root / 'logs' / f'{key}.log'), needs=cache[0], test_split=cfg.test_split,
                             dataset=cfg.dataset))
    groups = {seed: f't{k} ({relative(teachers[k], root)})' for seed, k in teacher_of.items()}
    return jobs, groups, dict(arms=arms, seeds=seeds, val_split=val_split, teachers=teachers, teacher_of=teacher_of)


def _header(cfg, argv: List[str], root: Path, info: dict, commits: List[str]) -> List[str]:
    val = info['val_split']
    scored = (f"a hold-out of the train split (train_icd.py --val-split {HOLDOUT}: 10% unless --val-fraction says "
              f"otherwise)" if val == HOLDOUT else f"the dataset's '{val}' split")
    command = ' '.join(shlex.quote(a) for a in relative_argv([a for a in argv if a != '--report'], root))
    return [f"# Sweep: {cfg.student} on {relative(cfg.dataset, root)}", '',
            f'Generated by `python -m timm_icd sweep {command}` (paths relative to this folder). Code: '
            f"{', '.join(commits) or '-'}. Scored on {scored}; "
            + (f"the test split '{cfg.test_split}' is measured once per run after training and withheld until every "
               f"declared run has a result." if cfg.test_split else 'the test split is never evaluated.'),
            (f"Every run sees the same batches (--data-seed {cfg.data_seed}); the seeds vary the student's "
             f"initialisation" if cfg.data_seed != 'seed' else "Each seed sets the student's initialisation and the "
             "batches (--data-seed seed)") +
            ('; seeds go round-robin over the teachers.' if len(info['teachers']) > 1 else '.')]


def _declare(root: Path, keys: List[str]) -> List[str]:
    """Every run key this folder was ever asked for (``sweep.json``): test numbers wait for all of them."""
    path = root / 'sweep.json'
    try:
        known = json.loads(path.read_text())['declared'] if path.exists() else []
    except (ValueError, KeyError, TypeError):
        raise UserError(f'{path} is damaged; it lists the runs this sweep declared: restore it or use another --out.')
    declared = known + [k for k in keys if k not in known]
    write_text_atomic(path, json.dumps({'declared': declared}, indent=1) + '\n')
    return declared


def _of_teacher(job: dict, k: Optional[int], info: dict) -> bool:
    """Whether ``job`` belongs to the K-th teacher's share (``--only-teacher K``; every job when K is None)."""
    if k is None:
        return True
    if not 0 <= k < len(info['teachers']):
        raise UserError(f"--only-teacher {k}: this sweep has {len(info['teachers'])} teacher(s), numbered from 0.")
    if job['kind'] == 'cache':
        return job['key'].split('-')[1] == f't{k}'
    return info['teacher_of'][job['seed']] == k


def sweep(argv: List[str]) -> int:
    own, passthrough = split_argv(argv)
    cfg = create_parser().parse_args(own)
    if cfg.jobs < 1 or cfg.threads < 1:
        raise UserError('--jobs and --threads take 1 or more.')
    if cfg.data_seed != 'seed' and not cfg.data_seed.isdigit():
        raise UserError(f'--data-seed {cfg.data_seed}: a number, or seed (each seed its own batches).')
    root = Path(cfg.out).absolute()
    jobs, groups, info = plan(cfg, passthrough, root)
    contrasts = parse_contrasts(cfg.contrast, info['arms'])
    chosen = [j for j in jobs if _of_teacher(j, cfg.only_teacher, info)]
    for job in chosen:  # every flag checked before the first run starts
        parse_and_validate(job['argv'])
    rows = read_csv(root / RUNS_CSV)
    check_same_flags(rows, jobs, root)
    finished = {r['key'] for r in rows if r['kind'] == 'run'}
    untested = sorted(finished - set(withheld_rows(root))) if cfg.test_split else []
    if untested:
        raise UserError(f"runs {', '.join(untested)} finished without --test-split, so they have no test result: "
                        f"give this sweep another --out, or leave --test-split out.")
    root.mkdir(parents=True, exist_ok=True)  # every check above has passed
    declared = _declare(root, [j['key'] for j in jobs if j['kind'] == 'run'])
    todo = [j for j in chosen if j['kind'] == 'run' and j['key'] not in finished]
    written = {r['key'] for r in rows if r['kind'] == 'cache'}  # a cache written by an earlier call is kept
    caches = [j for j in chosen if j['kind'] == 'cache' and j['key'] in {r['needs'] for r in todo}
              and not (j['key'] in written and Path(j['cache_dir']).is_dir())]
    for job in todo:
        job['needs'] = job['needs'] if job['needs'] in {c['key'] for c in caches} else None
    todo = caches + todo
    commit = commit_of_package()
    failed: List[str] = []

    def report() -> dict:
        tests = withheld_rows(root) if cfg.test_split else None
        commits = sorted({r['commit'] for r in rows if r.get('commit')})
        return write_sweep_report(root, _header(cfg, argv, root, info, commits), info['arms'], info['seeds'], groups,
                                  contrasts, rows, declared, tests, cfg.jobs, cfg.primary_test)

    def done(job: dict, result: dict) -> None:
        if job['kind'] == 'run' and cfg.test_split:
            add_test_row(root, job, result.get('test'))  # to its own file, before the run's row; never printed here
        rows[:] = [r for r in rows if r['key'] != job['key']] + [result_row(job, result, commit, root)]
        write_csv(root / RUNS_CSV, FIELDS, rows)
        if job['kind'] == 'cache':
            print(f"teacher cache {job['key']} ({job['teacher']}): {result['seconds']:.0f} s", flush=True)
            return
        n = sum(r['kind'] == 'run' for r in rows)
        print(f"[{n}/{len(declared)}] {job['key']}: validation top-1 {result['val_top1']:.2f} "
              f"({result['seconds']:.0f} s)", flush=True)
        report()

    def fail(job: dict, reason: str) -> None:
        failed.append(job['key'])
        log = f" (log: {os.path.relpath(job['log'])})" if os.path.exists(job['log']) else ''
        print(f"failed: {job['key']}: {reason}{log}", file=sys.stderr, flush=True)

    stopped = None
    if not cfg.report and todo:
        print(f"{len(todo)} jobs to do ({len(finished & set(declared))} of {len(declared)} runs done), {cfg.jobs} at a "
              f"time, {cfg.threads} thread(s) each", flush=True)
        stopped = execute(todo, cfg.jobs, cfg.threads, done, fail)
    analysed = report()
    _summary(analysed)
    print(f'report: {os.path.relpath(root / REPORT)}', flush=True)
    if stopped:
        finished = {r['key'] for r in rows if r['kind'] == 'run'}
        left = sum(j['kind'] == 'run' and j['key'] not in finished for j in todo)
        print(f'stopped ({stopped}): the running runs saved a checkpoint; {left} run(s) left; run the same command '
              f'again to continue them (exit code {PREEMPTED_EXIT_CODE}).', file=sys.stderr, flush=True)
        return PREEMPTED_EXIT_CODE
    if failed:
        print(f"{len(failed)} job(s) failed: {', '.join(failed)}; run the same command again to retry them.",
              file=sys.stderr)
        return 1
    return 0


def _summary(analysed: dict) -> None:
    for split, result in analysed.items():
        for arm, s in result['arms'].items():
            if s['n']:
                print(f"{split} {arm}: {_f(s['mean'])} [{_f(s['low'])}, {_f(s['high'])}] over {s['n']} seeds")
        for name, r in result['contrasts'].items():
            print(f"{split} {name}: {_f(r['mean'], '+.2f')} [{_f(r['low'], '+.2f')}, {_f(r['high'], '+.2f')}] over "
                  f"{r['n']} seeds, Holm p {_f(r['primary_holm_p'], '.4f')}")


def _f(v: float, fmt: str = '.2f') -> str:
    return '-' if v != v else format(v, fmt)  # NaN: fewer than two seeds


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return run_command(lambda: sweep(argv), interrupted='interrupted: run the same command again to continue '
                                                        '(finished runs are kept; the others resume)')


if __name__ == '__main__':
    sys.exit(main())
