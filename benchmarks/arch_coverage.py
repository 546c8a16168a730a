#!/usr/bin/env python3
"""Architecture coverage: one model of every timm model family, distilled as student and as teacher.

For every module of ``timm.models`` that registers models (a "family"), the smallest variant (fewest parameters,
counted on the meta device; ``test_*`` models first) is built with random weights and 10 classes, at the smallest
input size in ``SIZES`` its forward accepts (checked on the meta device), and put through:

* student (teacher resnet18) and teacher (student resnet18), method icd+kd: one SGD step with a finite loss; the ICD
  heads and the student get gradients (the ICD term reaches the student's feature), the teacher gets none; the
  captured feature is as wide as ``forward_head(forward_features(x), pre_logits=True)`` (and equal to it in eval);
  ``remove_hooks()`` leaves no hook and the same state_dict keys; the student saves with ``save_student`` and
  reloads with plain ``timm.create_model('local-dir:...', pretrained=True)`` to identical outputs;
* student with ``student_layer`` on an intermediate block (from ``feature_info``): one step, and the pooled feature
  equals a reference pooled here from a forward hook's raw output (layout told by the block's channel count).

A refusal is the one-line ``UserError`` raised before training. Each model runs under a time limit (SIGALRM).

    python benchmarks/arch_coverage.py                      # writes benchmarks/results/arch_coverage.md
    python benchmarks/arch_coverage.py --quick              # a handful of families (in the tests)
    python benchmarks/arch_coverage.py --families crossvit,sequencer
"""
import argparse
import copy
import logging
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import timm
import torch
import torch.nn as nn
from timm.models import get_pretrained_cfg_value, list_models
from timm.models._registry import list_modules

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timm_icd import ICDDistillationTask, UserError  # noqa: E402
from timm_icd.base import first_line  # noqa: E402
from timm_icd.publish import save_student  # noqa: E402

from common import machine  # noqa: E402

_logger = logging.getLogger(__name__)

NUM_CLASSES = 10
SIZES = (64, 96, 128, 160, 192, 224)
QUICK_FAMILIES = ('resnet', 'vision_transformer', 'crossvit', 'sequencer', 'dla')
# --quick shrinks the two big ones (same head structure, a fraction of the depth and width)
QUICK_KWARGS = {
    'crossvit': dict(depth=((1, 1, 0),)),
    'sequencer': dict(layers=(1, 1, 1, 1), embed_dims=(16, 32, 32, 32), hidden_sizes=(8, 16, 16, 16)),
}
BIG_WORDS = ('large', 'huge', 'giant', 'gigantic', 'base', 'medium', 'xlarge', 'enormous', '_384', '_448', '_512')
RESULTS = Path(__file__).parent / 'results'


class ModelTimeout(Exception):
    """The model ran past its time limit."""


def _alarm(signum, frame):
    raise ModelTimeout()


def meta_params(name: str) -> Optional[int]:
    """Parameters of ``name`` built on the meta device (no memory, no init); None if it builds no classifier."""
    try:
        with torch.device('meta'):
            model = timm.create_model(name, num_classes=NUM_CLASSES)
        if getattr(model, 'num_classes', None) != NUM_CLASSES:  # encoder-only variants drop the classifier
            return None
        return sum(p.numel() for p in model.parameters())
    except Exception:
        return None


def pick_model(family: str) -> Tuple[str, Optional[int]]:
    """The smallest model of a family: ``test_*`` models if any, else names without a big-size word, else all."""
    names = list_models(module=family)
    candidates = [n for n in names if n.startswith('test_')] or \
        [n for n in names if not any(w in n for w in BIG_WORDS)] or names
    counted = [(meta_params(n), n) for n in candidates]
    counted = [(p, n) for p, n in counted if p is not None] or [(None, n) for n in names[:1]]
    params, name = min(counted, key=lambda c: (c[0] is None, c[0] or 0, c[1]))
    return name, params


def _create(name: str, side: int, takes_img_size: bool, **kwargs) -> nn.Module:
    return timm.create_model(name, num_classes=NUM_CLASSES, **(dict(img_size=side) if takes_img_size else {}), **kwargs)


def candidate_sides(name: str, batch_size: int, **kwargs) -> Iterator[Tuple[int, bool]]:
    """(side, takes_img_size) for the square sides of SIZES and 1/4, 1/3, 1/2 of the model's own (up to its own),
    smallest first, whose forward works on the meta device (which checks shapes, not index bounds); then its own."""
    native = max((get_pretrained_cfg_value(name, 'input_size') or (3, 224, 224))[-2:])
    try:
        with torch.device('meta'):
            timm.create_model(name, num_classes=NUM_CLASSES, img_size=native, **kwargs)
        takes_img_size = True
    except Exception:  # TypeError: no img_size argument (the input size is free)
        takes_img_size = False
    for side in sorted(s for s in {*SIZES, native // 4, native // 3, native // 2} if 32 <= s < native):
        try:
            with torch.device('meta'):
                _create(name, side, takes_img_size, **kwargs).eval()(torch.empty(batch_size, 3, side, side))
        except Exception as e:
            _logger.debug(f'{name} at {side}: {first_line(e)}')
            continue
        yield side, takes_img_size
    yield native, takes_img_size


def build_at_smallest_size(name: str, batch_size: int, tries: int = 3, **kwargs) -> Tuple[nn.Module, int]:
    """The model with random weights, at the smallest candidate side that a real forward confirms."""
    for i, (side, takes_img_size) in enumerate(candidate_sides(name, batch_size, **kwargs)):
        torch.manual_seed(0)
        model = _create(name, side, takes_img_size, **kwargs)
        try:
            with torch.no_grad():
                model.eval()(torch.randn(batch_size, 3, side, side))
            return model.train(), side
        except Exception:
            if i + 1 >= tries:
                raise
    raise RuntimeError(f'{name}: no input size works')


def pre_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The reference pre-logit feature, flattened: ``forward_head(forward_features(x), pre_logits=True)``."""
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True).flatten(1)


def pick_layer(model: nn.Module) -> Tuple[Optional[str], Optional[int]]:
    """(module name, channels) of an intermediate block: the middle ``feature_info`` entry (the last block of a
    ModuleList entry), else the middle of the model's ``blocks``/``stages``/``layers``."""
    info = getattr(model, 'feature_info', None)
    info = getattr(info, 'info', info)
    modules = dict(model.named_modules())
    entries = [e for e in (info or []) if isinstance(e, dict) and e.get('module') in modules]
    if entries:
        entry = entries[max(0, (len(entries) - 1) // 2)]
        return _callable(modules, entry['module']), entry.get('num_chs')
    for name, seq in modules.items():
        if name.split('.')[-1] in ('blocks', 'stages', 'layers') and isinstance(seq, (nn.ModuleList, nn.Sequential)) \
                and len(seq) > 1:
            return _callable(modules, f'{name}.{list(seq._modules)[(len(seq) - 1) // 2]}'), None
    return None, None


def _callable(modules: Dict[str, nn.Module], name: str) -> str:
    """``name``, or its last descendant when it is a ModuleList/ModuleDict (which the model never calls)."""
    while isinstance(modules[name], (nn.ModuleList, nn.ModuleDict)) and len(modules[name]._modules):
        name = f'{name}.{list(modules[name]._modules)[-1]}'
    return name


def pool_reference(raw, batch: int, channels: Optional[int], output_fmt: str) -> torch.Tensor:
    """Pool a block's raw output to B x C: of a tuple, the first tensor with a row per image; the layout told by
    where the block's channel count sits (the model's ``output_fmt`` when it does not tell)."""
    if isinstance(raw, (tuple, list)):
        raw = next(t for t in raw if isinstance(t, torch.Tensor) and t.shape[0] == batch)
    first, last = raw.shape[1] == channels, raw.shape[-1] == channels
    if raw.ndim == 4:
        nhwc = last if first != last else output_fmt == 'NHWC'
        return raw.mean(dim=(1, 2)) if nhwc else raw.mean(dim=(2, 3))
    if raw.ndim == 3:
        return raw.mean(dim=2) if first and not last else raw.mean(dim=1)
    return raw.flatten(1)


def has_hooks(model: nn.Module) -> bool:
    return any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def one_step(task: ICDDistillationTask, x: torch.Tensor, y: torch.Tensor) -> Dict[str, bool]:
    """One SGD step; the checks on its loss and gradients."""
    seen = {}

    def keep_feature(module, args):
        if args[0].requires_grad:
            args[0].retain_grad()
        seen['feature'] = args[0]

    handle = task.icd.register_forward_pre_hook(keep_feature)  # args: (student features, teacher features)
    optimizer = torch.optim.SGD(task.trainable_module.parameters(), lr=0.01)
    task.train()
    try:
        out = task(x, y)
        optimizer.zero_grad()
        out['loss'].backward()
    finally:
        handle.remove()
    optimizer.step()
    feature = seen['feature']
    heads = [task.icd.student_head.weight.grad, task.icd.teacher_head.weight.grad]
    teacher = task.teacher.model
    return {
        'finite loss': bool(torch.isfinite(out['loss'])) and bool(torch.isfinite(out['loss_icd'])),
        'ICD heads get gradients': all(g is not None and bool(g.abs().sum() > 0) for g in heads),
        'ICD reaches the student': feature.grad_fn is not None and feature.grad is not None,
        'student gets gradients': any(p.grad is not None and bool(p.grad.abs().sum() > 0)
                                      for p in task.student.parameters()),
        'teacher gets no gradients': all(p.grad is None and not p.requires_grad for p in teacher.parameters()),
    }


def failed(checks: Dict[str, bool]) -> List[str]:
    return [k for k, ok in checks.items() if not ok]


def check_role(model: nn.Module, other: nn.Module, x, y, role: str, layer: Optional[str] = None,
               channels: Optional[int] = None, folder: Optional[Path] = None) -> Tuple[List[str], dict]:
    """``model`` as 'student' (``layer``: hooked there) or 'teacher' of ``other``: (failed checks, facts)."""
    student, teacher = (other, model) if role == 'teacher' else (model, other)
    keys = list(model.state_dict())
    model.zero_grad(set_to_none=True)
    size = tuple(x.shape[1:])
    task = ICDDistillationTask(student, teacher, method='icd+kd', student_input_size=size, teacher_input_size=size,
                               student_layer=layer, verbose=False)
    hook = task.teacher.feature_hook if role == 'teacher' else task.trainable_module.feature_hook
    seen = {}
    handle = dict(model.named_modules())[layer].register_forward_hook(
        lambda m, a, out: seen.update(out=out)) if layer else None
    try:
        model.eval()
        with torch.no_grad():
            model(x)
            captured = hook.pop()
        reference = pool_reference(seen['out'], x.shape[0], channels, getattr(model, 'output_fmt', 'NCHW')) \
            if layer else pre_logits(model, x)
        width = (task.icd.teacher_head if role == 'teacher' else task.icd.student_head).in_features
        same = captured.shape == reference.shape and torch.allclose(captured, reference, rtol=1e-4, atol=1e-5)
        checks = {'pooled like the reference' if layer else 'width equals pre_logits':
                  same if layer else width == reference.shape[1]}
        checks.update(one_step(task, x, y))
    finally:
        if handle is not None:
            handle.remove()
        task.remove_hooks()
        model.train()
    checks['hooks removed'] = not has_hooks(model) and not has_hooks(other)
    checks['state_dict keys unchanged'] = list(model.state_dict()) == keys
    if folder is not None:
        try:
            checks['saved and reloaded identically'] = save_and_reload(model, x, folder)
        except Exception as e:  # e.g. safetensors refuses tensors shared between modules
            checks[f'saved (save_student raised: {first_line(e, 150)})'] = False
    out = seen.get('out')
    shape = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else 'tuple'
    return failed(checks), {'width': width, 'reference': reference.shape[1], 'same': same, 'shape': shape}


def save_and_reload(model: nn.Module, x: torch.Tensor, folder: Path) -> bool:
    """``save_student``, then plain ``timm.create_model('local-dir:...')``: the same outputs, bit for bit."""
    model.eval()
    cfg = timm.data.resolve_model_data_config(model)
    cfg['input_size'] = tuple(x.shape[1:])
    save_student(model, folder, cfg)
    reloaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    with torch.no_grad():
        return torch.allclose(model(x), reloaded(x), rtol=0, atol=0, equal_nan=True)


def run_family(family: str, args, teacher: nn.Module, student: nn.Module) -> dict:
    """Every check for one family's model, never raising: a dict for the report."""
    row = {'family': family, 'model': '-', 'size': '-', 'params': None, 'student': 'fail', 'teacher': 'fail',
           'width': '-', 'layer': 'fail', 'seconds': 0.0, 'reasons': []}
    start = time.perf_counter()
    signal.alarm(args.time_limit)
    try:
        name, row['params'] = pick_model(family)
        row['model'] = name
        kwargs = QUICK_KWARGS.get(family, {}) if args.quick else {}
        model, side = build_at_smallest_size(name, args.batch_size, **kwargs)
        row['model'] += ' (shrunk)' if kwargs else ''
        row['params'] = sum(p.numel() for p in model.parameters())
        row['size'] = side
        x = torch.randn(args.batch_size, 3, side, side)
        y = torch.randint(0, NUM_CLASSES, (args.batch_size,))
        _run_roles(row, model, copy.deepcopy(teacher), copy.deepcopy(student), x, y)
    except ModelTimeout:
        row['reasons'].append(f'time limit of {args.time_limit} s')
    except Exception as e:
        row['reasons'].append(f'build/input: {type(e).__name__}: {first_line(e, 160)}')
    finally:
        signal.alarm(0)
        row['seconds'] = time.perf_counter() - start
    return row


def _role(row: dict, key: str, fn):
    """Run one role's checks, recording ok / refused / fail and the reason."""
    try:
        failures, facts = fn()
    except ModelTimeout:
        raise
    except UserError as e:
        row[key] = 'refused'
        row['reasons'].append(f'{key}: refused: {first_line(e, 240)}')
        return None
    except Exception as e:
        row['reasons'].append(f'{key}: {type(e).__name__}: {first_line(e, 160)}')
        return None
    row[key] = 'ok' if not failures else 'fail'
    if failures:
        row['reasons'].append(f'{key}: ' + ', '.join(f'not {f}' for f in failures))
    return facts


def _run_roles(row: dict, model: nn.Module, teacher: nn.Module, student: nn.Module, x, y) -> None:
    """Each role starts from the same random weights (one step can turn a random net's weights to NaN)."""
    initial = copy.deepcopy(model.state_dict())
    with tempfile.TemporaryDirectory() as tmp:
        facts = _role(row, 'student', lambda: check_role(model, teacher, x, y, 'student', folder=Path(tmp) / 's'))
    if facts:
        row['width'] = str(facts['width']) + ('' if facts['width'] == facts['reference'] else
                                              f' (pre_logits {facts["reference"]})')
        row['values'] = 'yes' if facts['same'] else 'no'
    layer, channels = pick_layer(model)
    if layer is None:
        row['reasons'].append('layer: no feature_info or blocks/stages/layers to pick a block from')
    else:
        model.load_state_dict(initial)
        facts = _role(row, 'layer', lambda: check_role(model, teacher, x, y, 'student', layer, channels))
        row['layer_name'] = f'{layer} ({facts["shape"]})' if facts else layer
    model.load_state_dict(initial)
    facts = _role(row, 'teacher', lambda: check_role(model, student, x, y, 'teacher'))
    if facts and row['width'] == '-':
        row['width'] = str(facts['width'])


def report(rows: List[dict], args, wall: float) -> str:
    both = [r for r in rows if r['student'] == 'ok' and r['teacher'] == 'ok']
    layer_ok = sum(r['layer'] == 'ok' for r in rows)
    lines = [
        '# Architecture coverage', '',
        f'**{len(both)} of {len(rows)} timm families distill as student and as teacher** '
        f'(timm {timm.__version__}; {layer_ok} of {len(rows)} also with `--student-layer` on an intermediate block).',
        '',
        f'`python benchmarks/arch_coverage.py{" --quick" if args.quick else ""}`: {machine()}; random weights, '
        f'{NUM_CLASSES} classes, batch {args.batch_size}, icd+kd, the other side resnet18, one SGD step per check; '
        f'{wall / 60:.1f} min in all. The model of each family is its smallest by parameter count (`test_*` models '
        f'first), at the smallest side of {SIZES} and 1/4, 1/3, 1/2 of its own (or its own) that it accepts'
        f'{"; (shrunk): fewer, narrower blocks, as QUICK_KWARGS says" if args.quick else ""}.', '',
        '"feature width" is the captured default feature, checked equal in width to `forward_head(forward_features(x),'
        ' pre_logits=True)`; "= pre_logits" says whether it also equals it in value (no: the classifier input is '
        'taken after a norm inside the head, e.g. BN + Linear). The hooked layer\'s output shape is per image.', '',
        '| family | model | params (M) | input | student ok | teacher ok | feature width | = pre_logits | '
        'layer-hook ok | layer hooked | seconds |',
        '|---|---|---|---|---|---|---|---|---|---|---|',
    ]
    for r in rows:
        params = f'{r["params"] / 1e6:.2f}' if r['params'] else '-'
        cells = [r['family'], r['model'], params, r['size'], r['student'], r['teacher'], r['width'],
                 r.get('values', '-'), r['layer'], r.get('layer_name', '-'), f'{r["seconds"]:.1f}']
        lines.append('| ' + ' | '.join(map(str, cells)) + ' |')
    bad = [r for r in rows if r['reasons']]
    lines += ['', '## Failures and refusals', '']
    lines += [f'* **{r["family"]}** ({r["model"]}): ' + '; '.join(r['reasons']).replace('|', '/') for r in bad] \
        or ['None.']
    return '\n'.join(lines) + '\n'


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help=f'only {", ".join(QUICK_FAMILIES)}')
    parser.add_argument('--families', default=None, help='comma-separated timm modules, e.g. crossvit,sequencer')
    parser.add_argument('--out', default=None, help='report file (default: benchmarks/results/arch_coverage.md, '
                                                    'or arch_coverage_quick.md with --quick)')
    parser.add_argument('--batch-size', type=int, default=2)
    parser.add_argument('--time-limit', type=int, default=300, help='seconds per model')
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings('ignore')
    logging.basicConfig(level=logging.WARNING)
    known = list_modules()
    families = args.families.split(',') if args.families else list(QUICK_FAMILIES) if args.quick else known
    unknown = [f for f in families if f not in known]
    if unknown:
        parser.error(f'unknown families: {", ".join(unknown)} (timm registers: {", ".join(known)})')
    out = Path(args.out or RESULTS / ('arch_coverage_quick.md' if args.quick else 'arch_coverage.md'))
    out.parent.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGALRM, _alarm)
    torch.manual_seed(0)
    teacher = timm.create_model('resnet18', num_classes=NUM_CLASSES).eval().requires_grad_(False)
    student = timm.create_model('resnet18', num_classes=NUM_CLASSES)
    rows, start = [], time.perf_counter()
    for family in families:
        row = run_family(family, args, teacher, student)
        rows.append(row)
        print(f'{family:26s} {row["model"]:32s} student {row["student"]:7s} teacher {row["teacher"]:7s} '
              f'layer {row["layer"]:7s} {row["seconds"]:6.1f}s {"; ".join(row["reasons"])[:300]}', flush=True)
        out.write_text(report(rows, args, time.perf_counter() - start))
    both = sum(r['student'] == 'ok' and r['teacher'] == 'ok' for r in rows)
    print(f'{both} of {len(rows)} timm families distill as student and as teacher; wrote {out} '
          f'in {time.perf_counter() - start:.0f} s')
    return 0


if __name__ == '__main__':
    sys.exit(main())
