"""``python -m timm_icd COMMAND [ARGS]``: every command of timm_icd behind one front door.

    python -m timm_icd --help              # the commands, one line each
    python -m timm_icd push --help         # one command's flags
    accelerate launch -m timm_icd cache TEACHER ...

Each command is also a console script (``setup.cfg``: ``timm-icd-push``, ...; ``timm-icd COMMAND`` is this module),
and ``train`` is ``train_icd.py``. The commands live in ``timm_icd/cli/``; a command's line below is the first line
of its module's docstring.
"""
import sys
from types import ModuleType
from typing import Dict, List, Optional

from .cli import cache, demo, hub, push, report, shards, sweep, train, validate

COMMANDS: Dict[str, ModuleType] = {
    'train': train, 'sweep': sweep, 'cache': cache, 'shards': shards, 'report': report, 'validate': validate,
    'push': push, 'hub': hub, 'demo': demo,
}
USAGE = 'usage: python -m timm_icd COMMAND [ARGS]   (python -m timm_icd COMMAND --help for its flags)'


def summary(module: ModuleType) -> str:
    """A command's one line: the first line of its module's docstring."""
    return module.__doc__.strip().splitlines()[0].replace('``', '')


def commands_help() -> str:
    width = max(len(name) for name in COMMANDS)
    return '\n'.join([USAGE, '', 'commands:'] + [f'  {name:<{width}}  {summary(m)}' for name, m in COMMANDS.items()])


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``COMMAND`` with the rest of ``argv``; ``--help`` lists the commands, and anything else is one error line
    (exit 2)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (['-h'], ['--help']):
        print(commands_help())
        return 0
    if not argv or argv[0] not in COMMANDS:
        problem = f"unknown command '{argv[0]}'" if argv else 'no command given'
        print(f"error: {problem}: one of {', '.join(COMMANDS)} (python -m timm_icd --help)", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]].main(argv[1:])


if __name__ == '__main__':
    sys.exit(main())
