"""What every test shares: the repository root, the fast training flags, the environment of the commands the tests
run (offline, one thread, this checkout's package), and loopback ports picked at run time."""
import os
import socket
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HELPERS = REPO / 'tests' / 'helpers'  # the programs the tests launch
# tiny, fast settings for digits-sized runs; augmentation kept mild so a couple of epochs learn something
FAST = ['--input-size', '3', '16', '16', '-j', '0', '--hflip', '0', '--scale', '0.7', '1', '--color-jitter', '0',
        '--log-interval', '5']


def offline_env(**extra) -> dict:
    """The environment of a command the tests run: offline, one torch thread, this checkout's package first."""
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1', 'PYTHONPATH': str(REPO),
           'OMP_NUM_THREADS': '1', 'TOKENIZERS_PARALLELISM': 'false'}
    env.pop('RANK', None)
    env.update(extra)
    return env


def hub_env(hub, tmp_path, token=True, endpoint=None) -> dict:
    """The environment of a process that talks to the loopback Hub ``hub`` (``tests/helpers/hub_server.py``) with the
    real huggingface_hub client: its endpoint, a fresh cache under ``tmp_path``, and the token unless ``token`` is
    False."""
    env = offline_env(HF_HUB_OFFLINE='0', HF_ENDPOINT=endpoint or hub.endpoint, HF_HOME=str(tmp_path / 'hf_home'),
                      HF_HUB_DISABLE_TELEMETRY='1', HF_HUB_DISABLE_IMPLICIT_TOKEN='0')
    env.pop('HF_TOKEN', None)
    if token:
        env['HF_TOKEN'] = hub.token
    return env


def free_port() -> int:
    """A loopback port free now, picked by the kernel (bound to port 0, read, closed): a launch that binds it right
    after gets it, and two pytest-xdist workers never pick the same one (no fixed ports to collide on)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def closed_port() -> int:
    """A loopback port nothing listens on (connections to it are refused)."""
    return free_port()
