#!/usr/bin/env python3
"""Step-time benchmark: distillation against its cost floor and against timm's own distillation tasks.

The floor of a distillation step is one teacher inference (under inference_mode) plus one student training step
with CE on the same batch. For each teacher/student pair and input size, every variant is timed in ONE process,
interleaved (the order rotates each round), after warm-up, as a full optimizer step (forward, backward, SGD step)
on the same batch; the table reports medians and ratios to the floor and to timm's tasks:

    floor, timm_logit (timm.task.LogitDistillationTask), timm_feature (timm.task.FeatureDistillationTask),
    kd, icd, icd+kd (timm_icd), and options: icd+kd with a bf16 teacher, with channels_last (CNN pairs, against a
    channels_last floor), and with torch.compile (against a compiled floor).

Peak memory: on CUDA, torch.cuda.max_memory_allocated over one step of each variant in this process (and that peak
minus the allocation before the step, since every variant's models are resident); on CPU, from a separate
process that runs only that variant (RSS high-water marks cannot be separated inside one process): the peak RSS
over three steps after warm-up, and that peak minus the RSS at rest just before them (the step's own working set:
activations, gradients, temporaries).

    python benchmarks/step_time.py                 # writes benchmarks/results/step_time.md
    python benchmarks/step_time.py --quick         # tiny models, for the tests
    python benchmarks/step_time.py --profile resnet50->mobilenetv3_small_100 64   # where icd+kd spends its time
"""
import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.task import FeatureDistillationTask, LogitDistillationTask

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timm_icd import ICDDistillationTask  # noqa: E402

from common import machine, peak_rss_mib  # noqa: E402

PAIRS = {
    'resnet50->mobilenetv3_small_100': ('resnet50', 'mobilenetv3_small_100'),
    'vit_small_patch16_224->resnet18': ('vit_small_patch16_224', 'resnet18'),
}
QUICK_PAIRS = {'test_resnet->test_efficientnet': ('test_resnet', 'test_efficientnet'),
               'test_vit->test_resnet': ('test_vit', 'test_resnet')}
BASE = ('floor', 'timm_logit', 'timm_feature', 'kd', 'icd', 'icd+kd')
TARGETS = {'floor': 1.05, 'timm_feature': 1.00}


def make_models(pair: str, size: int, pairs: dict, device):
    teacher_name, student_name = pairs[pair]
    kwargs = {}
    if timm.models.get_pretrained_cfg_value(teacher_name, 'fixed_input_size'):
        kwargs['img_size'] = size
    torch.manual_seed(0)
    teacher = timm.create_model(teacher_name, num_classes=100, **kwargs).to(device).eval().requires_grad_(False)
    student = timm.create_model(student_name, num_classes=100).to(device)
    return teacher, student


class Variant:
    """One kind of training step, with its own copies of the models and its own optimizer."""

    def __init__(self, name: str, teacher, student, size: int, device):
        self.name = name
        teacher, student = copy.deepcopy(teacher), copy.deepcopy(student)
        base = name.split(' ')[0]
        channels_last = 'channels_last' in name
        compiled = 'compile' in name
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled='bf16-autocast' in name)
        if channels_last:
            teacher.to(memory_format=torch.channels_last)
            student.to(memory_format=torch.channels_last)
        self.channels_last = channels_last
        size3 = (3, size, size)
        if base == 'floor':
            self.task = None
            if compiled:
                self.student_fwd = torch.compile(student)
                self.teacher_fwd = torch.compile(teacher)
            else:
                self.student_fwd, self.teacher_fwd = student, teacher
        elif base == 'timm_logit':  # timm train.py defaults: weights 1.0, temperature 4
            self.task = LogitDistillationTask(student, teacher, temperature=4.0, verbose=False, device=device)
        elif base == 'timm_feature':
            self.task = FeatureDistillationTask(student, teacher, verbose=False, device=device)
        else:
            self.task = ICDDistillationTask(
                student, teacher, method=base, student_input_size=size3, teacher_input_size=size3,
                teacher_dtype=torch.bfloat16 if 'bf16' in name else None, verbose=False, device=device)
            if compiled:
                self.task.compile()
        trainable = student if self.task is None else self.task.get_trainable_module()
        self.optimizer = torch.optim.SGD(trainable.parameters(), lr=1e-4, momentum=0.9)

    def step(self, x, y):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.autocast:
            if self.task is None:
                with torch.inference_mode():
                    self.teacher_fwd(x)
                loss = F.cross_entropy(self.student_fwd(x), y)
            else:
                loss = self.task(x, y)['loss']
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def variant_names(pair: str, pairs: dict, compile_ok: bool, gpu: bool = False):
    names = list(BASE) + ['icd+kd bf16-teacher']
    if gpu:  # bf16 autocast of the whole step (CPU autocast is slower than fp32 on this project's machine)
        names += ['floor bf16-autocast', 'icd+kd bf16-autocast']
    teacher_name = pairs[pair][0]
    if 'vit' not in teacher_name:
        names += ['floor channels_last', 'icd+kd channels_last']
    if compile_ok:
        names += ['floor compile', 'icd+kd compile']
    return names


def can_compile(device) -> str:
    """'' when torch.compile works here, else why not (the compile rows are then skipped with that note)."""
    try:
        fn = torch.compile(lambda t: torch.sin(t) * 2)
        fn(torch.randn(4, device=device))
        return ''
    except Exception as e:  # no C++ compiler, unsupported platform, ...
        return f'{type(e).__name__}: {str(e).splitlines()[0][:120]}'


def time_all(variants, x, y, rounds: int, warmup: int, device):
    """Median seconds per step of each variant, interleaved and rotated so none always runs first."""
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    for v in variants:
        for _ in range(warmup):
            v.step(x, y)
    times = {v.name: [] for v in variants}
    for r in range(rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for v in order:
            sync()
            start = time.perf_counter()
            v.step(x, y)
            sync()
            times[v.name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_memory(args, pair: str, size: int, name: str) -> tuple:
    """(peak RSS, step peak above the resting RSS) in MiB, from a separate process running only this variant."""
    cmd = [sys.executable, __file__, '--memory-probe', json.dumps([pair, size, name]), '--batch-size',
           str(args.batch_size)] + (['--quick'] if args.quick else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    try:
        peak, above = out.stdout.strip().splitlines()[-1].split()
        return float(peak), float(above)
    except (ValueError, IndexError):
        return float('nan'), float('nan')


def memory_probe(args) -> int:
    """Prints the peak RSS over three steps of one variant after warm-up, and that peak minus the RSS at rest."""
    pair, size, name = json.loads(args.memory_probe)
    pairs = QUICK_PAIRS if args.quick else PAIRS
    pairs = {k: v for k, v in pairs.items() if not args.pairs or k in args.pairs}
    device = torch.device('cpu')
    teacher, student = make_models(pair, size, pairs, device)
    x, y = torch.randn(args.batch_size, 3, size, size), torch.randint(0, 100, (args.batch_size,))
    variant = Variant(name, teacher, student, size, device)
    del teacher, student
    for _ in range(2):
        variant.step(x, y)
    peak, above = peak_rss_mib(lambda: variant.step(x, y))
    print(f'{peak:.1f} {above:.1f}')
    return 0


def profile(args) -> int:
    """torch.profiler of the floor, timm_feature and icd+kd on one pair and size: where does icd+kd spend time?"""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    pair, size = args.profile[0], int(args.profile[1])
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    pairs = QUICK_PAIRS if args.quick else PAIRS
    pairs = {k: v for k, v in pairs.items() if not args.pairs or k in args.pairs}
    if pair not in pairs:
        raise SystemExit(f'error: unknown pair {pair!r}; choose from: {", ".join(pairs)}')
    teacher, student = make_models(pair, size, pairs, device)
    x = torch.randn(args.batch_size or 32, 3, size, size, device=device)
    y = torch.randint(0, 100, (x.shape[0],), device=device)
    names, rounds = ('floor', 'timm_feature', 'icd+kd'), 10
    variants = [Variant(name, teacher, student, size, device) for name in names]
    per_op = {name: {} for name in names}
    for v in variants:
        for _ in range(3):
            v.step(x, y)
    for r in range(rounds):  # one profiled step of each variant per round, interleaved like the timing
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:
            with torch_profile(activities=activities) as prof:
                v.step(x, y)
            for e in prof.key_averages():
                per_op[v.name][e.key] = per_op[v.name].get(e.key, 0.0) + e.self_cpu_time_total / rounds / 1e3
    total = {name: sum(ops.values()) for name, ops in per_op.items()}
    diff = {k: per_op['icd+kd'].get(k, 0.0) - per_op['floor'].get(k, 0.0) for k in per_op['floor'].keys()
            | per_op['icd+kd'].keys()}
    lines = [f'# Profile: icd+kd against the floor, {pair}, {size}x{size}, batch {x.shape[0]}', '',
             f'Generated by `python benchmarks/step_time.py --profile {pair} {size}` on {machine(device)}, '
             f'{time.strftime("%Y-%m-%d")}; torch.profiler, self CPU time of every op, mean of {rounds} steps per '
             f'variant after warm-up, interleaved.', '',
             f'Op time per step: floor {total["floor"]:.1f} ms, timm_feature {total["timm_feature"]:.1f} ms '
             f'({100 * (total["timm_feature"] / total["floor"] - 1):+.1f}%), icd+kd {total["icd+kd"]:.1f} ms '
             f'({100 * (total["icd+kd"] / total["floor"] - 1):+.1f}%).', '',
             'Ops with the largest extra time in icd+kd over the floor (ms per step):', '',
             '| op | floor | timm_feature | icd+kd | icd+kd - floor |', '|---|---|---|---|---|']
    ranked = sorted(diff, key=diff.get, reverse=True)
    for key in ranked[:12] + ['...'] + ranked[-5:]:
        if key == '...':
            lines.append('| ... (the ops with the least time in icd+kd relative to the floor:) | | | | |')
            continue
        lines.append(f'| `{key}` | {per_op["floor"].get(key, 0.0):.2f} | {per_op["timm_feature"].get(key, 0.0):.2f} '
                     f'| {per_op["icd+kd"].get(key, 0.0):.2f} | {diff[key]:+.2f} |')
    out = Path(args.out).with_name(f'step_time_profile_{"cnn" if "vit" not in pair else "vit"}_{size}.md')
    out.write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='tiny models and few rounds (for the tests)')
    parser.add_argument('--sizes', type=int, nargs='+', default=None, help='input sizes (default: 64 112 on CPU, '
                                                                            '160 224 on GPU)')
    parser.add_argument('--batch-size', type=int, default=None, help='default: 32 on CPU, 128 on GPU')
    parser.add_argument('--rounds', type=int, default=None, help='timed steps per variant (default: 20)')
    parser.add_argument('--out', default=str(Path(__file__).parent / 'results' / 'step_time.md'))
    parser.add_argument('--no-compile', action='store_true', help='skip the torch.compile rows')
    parser.add_argument('--pairs', nargs='+', default=None, help='only these pairs (default: all)')
    parser.add_argument('--profile', nargs=2, metavar=('PAIR', 'SIZE'), default=None,
                        help='torch.profiler of the floor, timm_feature and icd+kd for one pair and size; '
                             'writes step_time_profile_*.md next to --out')
    parser.add_argument('--memory-probe', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_probe:
        return memory_probe(args)
    if args.profile:
        return profile(args)
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    gpu = device.type == 'cuda'
    pairs = QUICK_PAIRS if args.quick else PAIRS
    pairs = {k: v for k, v in pairs.items() if not args.pairs or k in args.pairs}
    sizes = args.sizes or ([32] if args.quick else [160, 224] if gpu else [64, 112])
    args.batch_size = args.batch_size or (8 if args.quick else 128 if gpu else 32)
    rounds = args.rounds or (3 if args.quick else 20)
    compile_note = 'skipped (--no-compile)' if args.no_compile or args.quick else can_compile(device)
    started = time.time()
    sections, verdicts = [], []
    for pair in pairs:
        for size in sizes:
            teacher, student = make_models(pair, size, pairs, device)
            names = variant_names(pair, pairs, not compile_note, gpu)
            variants = [Variant(n, teacher, student, size, device) for n in names]
            torch.manual_seed(1)
            x = torch.randn(args.batch_size, 3, size, size, device=device)
            y = torch.randint(0, 100, (args.batch_size,), device=device)
            medians = time_all(variants, x, y, rounds, warmup=1 if args.quick else 3, device=device)
            memory = {}
            for v in variants:
                if gpu:  # every variant's models are resident: the step's own share is the peak above rest
                    torch.cuda.synchronize()
                    rest = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    v.step(x, y)
                    torch.cuda.synchronize()
                    peak = torch.cuda.max_memory_allocated()
                    memory[v.name] = (peak / 2 ** 20, (peak - rest) / 2 ** 20)
                elif 'compile' in v.name or args.quick:
                    memory[v.name] = (float('nan'),) * 2  # compile: minutes again in a separate process; quick: skip
                else:
                    memory[v.name] = peak_memory(args, pair, size, v.name)
            del variants, v  # free this setting's models before the next one is built
            rows = [f'### {pair}, {size}x{size}, batch {args.batch_size}', '',
                    '| variant | median ms/step | / floor | / timm_feature | / timm_logit | peak memory (MiB) '
                    '| step above rest (MiB) |', '|---|---|---|---|---|---|---|']
            for name in names:
                floor = medians[next((f'floor {o}' for o in ('channels_last', 'compile', 'bf16-autocast')
                                      if o in name), 'floor')]
                rows.append(f'| {name} | {medians[name] * 1e3:.1f} | {medians[name] / floor:.3f} | '
                            f'{medians[name] / medians["timm_feature"]:.3f} | '
                            f'{medians[name] / medians["timm_logit"]:.3f} | '
                            f'{memory[name][0]:.0f} | {memory[name][1]:.0f} |')
            sections += rows + ['']
            ratio_floor = medians['icd+kd'] / medians['floor']
            ratio_feature = medians['icd+kd'] / medians['timm_feature']
            met = ratio_floor <= TARGETS['floor'] and ratio_feature <= TARGETS['timm_feature']
            verdicts.append(f'| {pair} | {size} | {ratio_floor:.3f} | {ratio_feature:.3f} | '
                            f'{"met" if met else "missed"} |')
            print('\n'.join(rows), flush=True)
    header = [
        '# Step time: distillation against its floor and against timm\'s tasks', '',
        f'Generated by `python benchmarks/step_time.py{" --quick" if args.quick else ""}` on {machine(device)}, '
        f'{time.strftime("%Y-%m-%d")}; {rounds} timed steps per variant after warm-up, interleaved in one process, '
        f'medians. Each step: forward, backward and an SGD step of the student (and heads) on the same random '
        f'batch; the floor is the teacher under inference_mode plus a CE step of the student. Peak memory: '
        + ('CUDA max allocated during one step (every variant\'s models are resident), and that peak minus the '
           'allocation just before the step.' if gpu else
           'peak RSS of a separate process running only that variant, over three steps after warm-up (includes the '
           'Python/torch baseline of ~0.5 GB and the models), and that peak minus the RSS at rest just before the '
           'steps (the step\'s own activations, gradients and temporaries).'),
        '', f'torch.compile rows: {"measured" if not compile_note else compile_note}.', '',
        f'## Targets: icd+kd / floor <= {TARGETS["floor"]:.2f} and icd+kd / timm_feature <= '
        f'{TARGETS["timm_feature"]:.2f}', '',
        '| pair | size | icd+kd / floor | icd+kd / timm_feature | target |', '|---|---|---|---|---|', *verdicts, '',
        '## All variants', '']
    notes = Path(args.out).with_name(Path(args.out).stem + '_notes.md')
    footer = [f'Total benchmark time: {(time.time() - started) / 60:.1f} min.']
    if notes.exists():
        footer.append(f'Analysis and profile: [{notes.name}]({notes.name}).')
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text('\n'.join(header + sections + footer) + '\n')
    print(f'wrote {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
