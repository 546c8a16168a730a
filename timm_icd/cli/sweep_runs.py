"""The sweep's runs: each a real training run in its own worker process, side by side, recorded one row each.

Workers are forked from a server process that has imported torch, timm and the package once (``multiprocessing``'s
``forkserver`` with a preload, one fresh process per run), so a run costs its training, not ten seconds of imports.
A worker gets SIGTERM when the sweep dies (``PR_SET_PDEATHSIG``): a running run stops at its next step boundary
with a checkpoint, so a killed sweep leaves no run training on in its folder.

A scheduler's SIGTERM or SIGUSR1 to the sweep stops it as one stops a run (``run/preempt.py``): no run starts after
it, each running run gets the signal too (where the scheduler did not send it to them already) and saves a checkpoint
at its next step boundary, and the sweep ends with exit code 75 once they have; a requeued sweep continues them.
"""
import csv
import ctypes
import io
import json
import multiprocessing
import os
import signal
import subprocess
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..base import UserError, __version__, first_line, write_text_atomic
from ..run import Preempted, parse_and_validate, run, write_ahead
from .validate import validate

RUNS_CSV = 'sweep_runs.csv'
TEST_CSV = 'sweep_test_withheld.csv'
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
FIELDS = ['kind', 'key', 'arm', 'method', 'seed', 'data_seed', 'teacher', 'val_split', 'val_top1', 'val_top5',
          'epochs', 'train_rows', 'started', 'ended', 'seconds', 'commit', 'run_dir', 'log', 'flags']
TEST_FIELDS = ['key', 'arm', 'seed', 'test_split', 'test_top1', 'test_top5', 'test_images']
PATH_PREFIXES = ('local-dir:', 'imagefolder:', 'webdataset:', 'parquet:')
PATH_FLAGS = {'--dataset', '--teacher', '--student', '--teacher-cache', '--teacher-checkpoint', '--student-checkpoint',
              '--config', '-c', '--output', '--out'}


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec='seconds')


def commit_of_package() -> str:
    """The git commit of the code that runs (``commit_of``), or the package version outside a git checkout."""
    return commit_of(Path(__file__).resolve().parents[2]) or f'timm_icd {__version__}'


def commit_of(root: Path) -> Optional[str]:
    """The git commit checked out at ``root``, ``+dirty`` with uncommitted changes to a tracked file outside
    ``benchmarks/results`` (results written while a study runs are not code); None outside a git checkout."""
    try:
        head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=root, capture_output=True, text=True, timeout=30)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no', '--', '.',
                                ':(exclude)benchmarks/results'], cwd=root,
                               capture_output=True, text=True, timeout=30).stdout.strip()
        return head.stdout.strip() + ('+dirty' if dirty else '')
    except (OSError, subprocess.SubprocessError):
        return None


def relative(path: str, root: Path) -> str:
    """``path`` (a file path, or one behind a ``local-dir:``-style prefix) relative to ``root`` when it names a
    path (absolute, or present on disk); anything else (a Hub id, a timm name, ``digits``) unchanged."""
    prefix = next((p for p in PATH_PREFIXES if path.startswith(p)), '')
    rest = path[len(prefix):]
    if rest and (os.path.isabs(rest) or os.path.exists(rest)):
        return prefix + os.path.relpath(os.path.abspath(rest), root)
    return path


def relative_flags(argv: Sequence[str], root: Path) -> str:
    """The flags as one string, their paths relative to ``root`` (``relative_argv``)."""
    return ' '.join(relative_argv(argv, root))


def relative_argv(argv: Sequence[str], root: Path) -> List[str]:
    """Every absolute path, and every value of a flag that takes a path, relative to ``root`` (a number or a name
    that happens to match a file stays as it is)."""
    out, previous = [], ''
    for a in argv:
        if previous == '--teachers':  # T1,T2,...
            out.append(','.join(relative(t, root) for t in a.split(',')))
        else:
            takes_path = previous in PATH_FLAGS or a.startswith(PATH_PREFIXES) or os.path.isabs(a)
            out.append(relative(a, root) if takes_path else a)
        previous = a
    return out


def read_csv(path: Path) -> List[dict]:
    """The rows of a sweep CSV; a file that is not one is a UserError naming it."""
    if not path.exists():
        return []
    try:
        with open(path, newline='') as f:
            rows = list(csv.DictReader(f))
    except (csv.Error, UnicodeDecodeError) as e:
        raise UserError(f'{path} is not a readable CSV ({e}); move it away to start the sweep afresh.')
    if rows and 'key' not in rows[0]:
        raise UserError(f'{path} has no key column: it is not a sweep CSV; use another --out.')
    return rows


def write_csv(path: Path, fields: Sequence[str], rows: Sequence[dict]) -> None:
    """The whole CSV, replaced atomically (a killed sweep never leaves half a row)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), extrasaction='ignore', lineterminator='\n')
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def _init_worker(threads: int) -> None:
    """One torch thread (or ``threads``), and death with the sweep: the worker's parent is the fork server, which
    exits when the sweep does. The stop signals are ignored between runs (a run's pre-emption handler takes them while
    it trains), so that the sweep's stop, sent to every worker, ends no idle one."""
    torch.set_num_threads(threads)
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)
    except (AttributeError, OSError):  # another system: a killed sweep's runs finish on their own
        pass


def _redirect(log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def run_job(job: dict) -> dict:
    """One job in a worker: write a teacher cache, or train a run (``--resume auto``) and, where the sweep names a
    test split, measure the student on it. Returns the numbers, the times (UTC ISO) and the seconds."""
    _redirect(Path(job['log']))
    try:
        return _run_job(job)
    except Preempted as e:  # a checkpoint is saved: the sweep stops, and its next call continues the run
        print(f"sweep job {job['key']}: stopped, {e}", flush=True)
        return {'preempted': e.reason}
    except BaseException:
        traceback.print_exc()  # into the job's log; the sweep prints its one line
        raise


def _run_job(job: dict) -> dict:
    started, clock = utc_now(), time.time()
    print(f"sweep job {job['key']}: {' '.join(job['argv'])}", flush=True)
    if job['kind'] == 'cache':
        write_ahead(parse_and_validate(job['argv'], prog='python -m timm_icd cache'))
        return {'started': started, 'ended': utc_now(), 'seconds': round(time.time() - clock, 1)}
    result = run(parse_and_validate(job['argv']), job['argv'])
    record = json.loads((Path(result['student']) / 'distillation.json').read_text())
    with open(Path(result['output']) / 'summary.csv', newline='') as f:
        epochs = sum(1 for _ in csv.DictReader(f))
    out = {'val_top1': result['top1'], 'val_top5': result['top5'], 'epochs': epochs,
           'train_rows': record['dataset']['train_rows'], 'val_split': record['dataset']['eval_split']}
    if job.get('test_split'):  # after training, once; the parent withholds it
        test = validate(result['student'], job['dataset'], split=job['test_split'], batch_size=256, workers=0)
        out['test'] = {'test_top1': test['top1'], 'test_top5': test['top5'], 'test_images': test['images']}
    print(f"sweep job {job['key']}: done", flush=True)
    return {**out, 'started': started, 'ended': utc_now(), 'seconds': round(time.time() - clock, 1)}


def _pool(jobs: int, threads: int) -> ProcessPoolExecutor:
    os.environ.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM='false')
    context = multiprocessing.get_context('forkserver')
    context.set_forkserver_preload([__name__])
    return ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker, initargs=(threads,),
                               max_tasks_per_child=1)


class _Stop:
    """The sweep's stop (``STOP_SIGNALS``, or a run that stopped on its own ``--time-limit``): ``reason`` is what asked
    for it. A signal is also sent on to the pool's workers: idle ones ignore it, running ones stop at a step boundary
    with a checkpoint (CPython's pool keeps its workers' pids in ``_processes``; nothing public lists them)."""

    def __init__(self, pool: ProcessPoolExecutor) -> None:
        self.pool, self.reason, self._previous = pool, None, {}

    def __enter__(self) -> '_Stop':
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread (a Python caller's worker thread): no stop by signal
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def _on_signal(self, signum: int, frame) -> None:
        self.reason = self.reason or signal.Signals(signum).name
        for pid in list(getattr(self.pool, '_processes', None) or {}):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass


def execute(jobs: List[dict], n_jobs: int, threads: int, on_done: Callable[[dict, dict], None],
            on_failed: Callable[[dict, str], None]) -> Optional[str]:
    """Run ``jobs`` ``n_jobs`` at a time: a run whose ``needs`` names a cache job starts when that job has
    finished (and never, when it failed). ``on_done(job, result)`` and ``on_failed(job, reason)`` are called in the
    sweep's process as each ends. Returns what stopped the sweep before its last job (a signal's name, or a run's
    time limit), or None."""
    done_keys = set()
    failed_keys = set()
    waiting = list(jobs)
    running: Dict[Future, dict] = {}
    with _pool(n_jobs, threads) as pool, _Stop(pool) as stop:
        try:
            while waiting or running:
                for job in list(waiting) if stop.reason is None else []:
                    need = job.get('needs')
                    if need in failed_keys:
                        waiting.remove(job)
                        failed_keys.add(job['key'])
                        on_failed(job, f'its teacher cache ({need}) failed')
                    elif (need is None or need in done_keys) and len(running) < n_jobs:
                        waiting.remove(job)  # submitted only when a worker is free: a stop leaves none queued
                        running[pool.submit(run_job, job)] = job
                if not running:
                    break
                finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for future in finished:
                    job = running.pop(future)
                    error = future.exception()
                    if isinstance(error, BrokenProcessPool):
                        raise UserError(f"the process of {job['key']} died (killed?; its log: {job['log']}); run the "
                                        f'same command again: finished runs are kept, unfinished ones continue from '
                                        f'their last checkpoint.')
                    if error is None and 'preempted' in future.result():
                        stop.reason = stop.reason or future.result()['preempted']
                    elif error is None:
                        done_keys.add(job['key'])
                        on_done(job, future.result())
                    else:
                        failed_keys.add(job['key'])
                        on_failed(job, str(error) if isinstance(error, UserError) else
                                  f'{type(error).__name__}: {first_line(str(error))}')
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return stop.reason


def result_row(job: dict, result: dict, commit: str, root: Path) -> dict:
    """The CSV row of a finished job: paths relative to the sweep folder ``root``, no test number."""
    row = {k: job.get(k, '') for k in FIELDS}
    row.update({k: v for k, v in result.items() if k in FIELDS})
    row.update(commit=commit, log=relative(job['log'], root), flags=relative_flags(job['record_argv'], root),
               run_dir=relative(job['run_dir'], root) if job.get('run_dir') else '')
    return row


def check_same_flags(rows: Sequence[dict], jobs: Sequence[dict], root: Path) -> None:
    """A finished run of ``rows`` that ``jobs`` would run with other flags is a UserError: one folder, one sweep."""
    planned = {j['key']: relative_flags(j['record_argv'], root) for j in jobs if j['kind'] == 'run'}
    for row in rows:
        if row['key'] in planned and row['flags'] != planned[row['key']]:
            raise UserError(f"{root / RUNS_CSV} ran {row['key']} with other flags ({row['flags']}) than this command "
                            f"({planned[row['key']]}); give this sweep another --out, or the same flags.")


def withheld_rows(root: Path) -> Dict[str, dict]:
    return {r['key']: r for r in read_csv(root / TEST_CSV)}


def missing_test(declared: Sequence[str], tests: Dict[str, dict]) -> List[str]:
    return [k for k in declared if k not in tests]


def add_test_row(root: Path, job: dict, test: Optional[dict]) -> None:
    rows = list(withheld_rows(root).values())
    rows = [r for r in rows if r['key'] != job['key']] + [{'key': job['key'], 'arm': job['arm'], 'seed': job['seed'],
                                                           'test_split': job['test_split'], **(test or {})}]
    write_csv(root / TEST_CSV, TEST_FIELDS, rows)
