"""What the tests share besides fixtures (those are in ``tests/conftest.py``): the environment and flags
(``env``), the command runner (``cli``, with ``zygote.py`` its fork server), multi-process launches (``launch``),
reading runs back (``runs``), the loopback Hub (``hub_server``), and the programs the tests launch (the ``*_worker.py``
files, ``train_crash.py`` with ``crash.py``, ``zygote_probe.py``, ``loss_plugin.py``), which run as scripts with this
folder first on their path."""
from .cli import run_cli
from .env import FAST, HELPERS, REPO, closed_port, free_port, hub_env, offline_env
from .launch import accelerate_launch, two_machines
from .runs import eval_with_timm, read_summary

__all__ = ['FAST', 'HELPERS', 'REPO', 'accelerate_launch', 'closed_port', 'eval_with_timm', 'free_port', 'hub_env',
           'offline_env', 'read_summary', 'run_cli', 'two_machines']
