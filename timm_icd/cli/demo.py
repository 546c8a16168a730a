"""The README's demo: on the built-in digits data, on CPU, in a few minutes.

1. train a teacher with ``--method vanilla``;
2. distill a smaller student from it with ``icd+kd``;
3. train the same student ``vanilla`` as the baseline;

then print one table with the held-out top-1 of each, the time taken and where the student folder is. Each stage
is a real ``train_icd.py`` run; its log is kept next to its outputs.

    python -m timm_icd demo [--output output/demo] [--epochs 12]
"""
import json
import subprocess
import sys
import time
from pathlib import Path

from ..run import ArgumentParser

COMMON = ['--dataset', 'digits', '--input-size', '3', '32', '32', '-b', '64', '--hflip', '0', '--scale', '0.6', '1',
          '--color-jitter', '0', '--seed', '0', '--overwrite']
# the paper's learning rates: 0.05 for ResNet-style teachers, 0.01 for MobileNet/ShuffleNet students
TEACHER_LR, STUDENT_LR = ['--lr', '0.05'], ['--lr', '0.01']


def stage(name: str, out: Path, args: list) -> dict:
    """Run one train_icd.py stage, keep its log, and return its distillation.json record."""
    started = time.time()
    print(f'[{name}] train_icd.py {" ".join(args)}', flush=True)
    log = out / f'{name}.log'
    with open(log, 'w') as f:
        result = subprocess.run([sys.executable, '-m', 'timm_icd', 'train', *args, '--output', str(out / name)],
                                stdout=f, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:]
        raise SystemExit(f'[{name}] failed (exit {result.returncode}): {" ".join(tail)}; full log: {log}')
    record = json.loads((out / name / 'student' / 'distillation.json').read_text())
    record['seconds'] = time.time() - started
    print(f"[{name}] top-1 {record['top1']:.2f}% in {record['seconds']:.0f}s", flush=True)
    return record


def main(argv=None) -> int:
    parser = ArgumentParser(prog='python -m timm_icd demo', description=__doc__.splitlines()[0])
    parser.add_argument('--output', default='output/demo', help='demo folder (default: output/demo)')
    parser.add_argument('--epochs', type=int, default=12, help='epochs per stage (default: 12)')
    parser.add_argument('--teacher', default='resnet18', help='teacher architecture (default: resnet18)')
    parser.add_argument('--student', default='mobilenetv3_small_100',
                        help='student architecture (default: mobilenetv3_small_100)')
    args = parser.parse_args(argv)
    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    epochs = ['--epochs', str(args.epochs)]

    teacher = stage('teacher', out, ['--method', 'vanilla', '--student', args.teacher, *TEACHER_LR, *epochs, *COMMON])
    teacher_dir = out / 'teacher' / 'student'
    distilled = stage('student_icd_kd', out, [
        '--method', 'icd+kd', '--teacher', f'local-dir:{teacher_dir}', '--student', args.student,
        '--interpolation', 'bilinear', *STUDENT_LR, *epochs, *COMMON])
    vanilla = stage('student_vanilla', out, [
        '--method', 'vanilla', '--student', args.student, '--interpolation', 'bilinear', *STUDENT_LR, *epochs, *COMMON])

    rows = [
        (f'teacher ({args.teacher}, vanilla)', teacher['top1']),
        (f'student ({args.student}, vanilla)', vanilla['top1']),
        (f'student ({args.student}, icd+kd)', distilled['top1']),
    ]
    print(f"\nDigits, held-out split ({distilled['dataset']['eval_rows']} images), top-1 after {args.epochs} "
          f"epochs each:\n")
    print(f"| {'model':<44} | top-1 (%) |")
    print(f"|{'-' * 46}|-----------|")
    for name, top1 in rows:
        print(f'| {name:<44} | {top1:9.2f} |')
    print(f'\ndistilled - vanilla student: {distilled["top1"] - vanilla["top1"]:+.2f} points; '
          f'time taken: {time.time() - started:.0f}s')
    print(f'distilled student folder: {out / "student_icd_kd" / "student"}')
    print(f"load it with: timm.create_model('local-dir:{out / 'student_icd_kd' / 'student'}')")
    return 0


if __name__ == '__main__':
    sys.exit(main())
