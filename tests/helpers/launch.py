"""Multi-process launches as a user runs them: ``accelerate launch`` of 2 CPU processes on one machine, or two
single-process launches as on two machines; each launch gets a free port picked at run time."""
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

from helpers.env import REPO, free_port, offline_env


def accelerate_launch(*args, timeout=600, env_extra=None) -> subprocess.CompletedProcess:
    """``accelerate launch`` of 2 CPU processes. A MULTI_CPU config file starts just one process without mpirun
    (accelerate 1.15 sends it to its simple launcher), so use the torchrun launcher with the CPU forced by env."""
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
           '--num_machines', '1', '--main_process_port', str(free_port()), '--mixed_precision', 'no',
           '--dynamo_backend', 'no', *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          env=offline_env(ACCELERATE_USE_CPU='1', **(env_extra or {})), timeout=timeout)


def two_machines(logs: Path, *args, env: Optional[dict] = None, timeout=300) -> List[subprocess.CompletedProcess]:
    """Two ``accelerate launch`` commands of one process each, as on two machines (both on 127.0.0.1 here, one free
    port for both); their output goes to files in ``logs`` (a pipe read only after the other launch ends could fill
    up and block it)."""
    procs, port = [], free_port()
    for rank in (0, 1):
        with open(logs / f'machine{rank}.out', 'w') as out, open(logs / f'machine{rank}.err', 'w') as err:
            procs.append(subprocess.Popen(
                [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_machines', '2',
                 '--num_processes', '2', '--machine_rank', str(rank), '--main_process_ip', '127.0.0.1',
                 '--main_process_port', str(port), '--mixed_precision', 'no', '--dynamo_backend', 'no',
                 *map(str, args)],
                cwd=REPO, stdout=out, stderr=err, text=True, env=env or offline_env(ACCELERATE_USE_CPU='1')))
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [subprocess.CompletedProcess(p.args, code, (logs / f'machine{rank}.out').read_text(),
                                        (logs / f'machine{rank}.err').read_text())
            for rank, (p, code) in enumerate(zip(procs, codes))]
