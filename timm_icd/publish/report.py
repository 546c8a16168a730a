"""Curves of a run and a comparison of runs, from what each run folder already holds.

``OUT/curves.png`` is redrawn after every epoch from the run's summary.csv rows: the train loss parts, eval top-1
of the student (and of its EMA), tau and the learning rate per epoch.

    python -m timm_icd report RUN [RUN ...] [--out runs.png]          (the command: ``cli/report.py``)

prints one table row per run (method, student, teacher, epochs, final and best top-1, EMA top-1, wall time) and draws
their eval top-1 curves in one PNG.
"""
import csv
import json
from pathlib import Path
from typing import Dict, List, Sequence

from ..base import UserError

CURVES = 'curves.png'


def _plt():
    import matplotlib  # lazy: about a second to import, and only the curves need it
    matplotlib.use('Agg')  # files only, never a window
    import matplotlib.pyplot as plt  # lazy: as above
    return plt


def _series(rows: Sequence[dict], key: str) -> List[float]:
    return [float(r[key]) for r in rows if r.get(key) not in (None, '')]


def plot_run(rows: Sequence[dict], path: Path, title: str = '') -> Path:
    """Draw one run's per-epoch curves (summary.csv rows) into ``path``."""
    plt = _plt()
    epochs = [int(r['epoch']) + 1 for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    for key in ('train_loss', 'train_loss_ce', 'train_loss_kd', 'train_loss_icd'):
        values = _series(rows, key)
        if values and any(values):
            axes[0].plot(epochs, values, marker='o', ms=3, label=key[len('train_'):])
    axes[0].set_title('train loss parts')
    for key, label in (('eval_top1', 'student'), ('eval_ema_top1', 'EMA')):
        if _series(rows, key):
            axes[1].plot(epochs, _series(rows, key), marker='o', ms=3, label=label)
    axes[1].set_title('eval top-1 (%)')
    axes[2].plot(epochs, _series(rows, 'train_tau'), marker='o', ms=3)
    axes[2].set_title('ICD tau')
    axes[3].plot(epochs, _series(rows, 'lr'), marker='o', ms=3)
    axes[3].set_title('learning rate (end of epoch)')
    for ax in axes:
        ax.set_xlabel('epoch')
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f'.tmp-{path.name}')
    fig.savefig(tmp, dpi=90, format='png')
    plt.close(fig)
    tmp.replace(path)  # a reader never sees a half-written picture
    return path


def read_run(folder: Path) -> Dict:
    """A run folder's summary rows and student record, or a one-line error naming what is missing."""
    folder = Path(folder)
    summary = folder / 'summary.csv'
    if not summary.is_file():
        raise UserError(f'{folder} is not a train_icd.py run folder (no summary.csv).')
    with open(summary) as f:
        rows = list(csv.DictReader(f))
    record_file = folder / 'student' / 'distillation.json'
    record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    return {'folder': folder, 'rows': rows, 'record': record}


def table(runs: Sequence[Dict]) -> str:
    """The comparison table (markdown) of several runs."""
    lines = ['| run | method | student | teacher | epochs | final top-1 | best top-1 | EMA top-1 | wall time |',
             '|---|---|---|---|---|---|---|---|---|']
    for run in runs:
        rows, record = run['rows'], run['record']
        top1 = _series(rows, 'eval_top1')
        ema = _series(rows, 'eval_ema_top1')
        seconds = record.get('wall_seconds')
        teacher = (record.get('teacher') or {}).get('name', '-')
        lines.append(
            f"| {run['folder'].name} | {record.get('method', '?')} | {record.get('student', '?')} | {teacher} | "
            f"{len(rows)} | {top1[-1]:.2f} | {max(top1):.2f} | {f'{ema[-1]:.2f}' if ema else '-'} | "
            f"{f'{seconds / 60:.1f} min' if seconds else '-'} |")
    return '\n'.join(lines)


def plot_runs(runs: Sequence[Dict], path: Path) -> Path:
    """Eval top-1 per epoch of several runs in one PNG."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for run in runs:
        rows = run['rows']
        label = f"{run['folder'].name} ({run['record'].get('method', '?')})"
        ax.plot([int(r['epoch']) + 1 for r in rows], _series(rows, 'eval_top1'), marker='o', ms=3, label=label)
    ax.set_xlabel('epoch')
    ax.set_ylabel('eval top-1 (%)')
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
