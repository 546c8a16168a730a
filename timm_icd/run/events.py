"""Named points of a run that outside code can watch: ``emit(point)`` calls every listener added.

The loop emits ``step`` (after backward, before the optimizer step), ``checkpoint`` (checkpoint files written, not
yet renamed into place) and ``eval`` (after the first eval batch). The kill-and-resume tests listen here and SIGKILL
the process at a chosen point (``tests/helpers/crash.py``); nothing in the package listens, so an emit costs one loop
over an empty list.
"""
from typing import Callable, List

_listeners: List[Callable[[str], None]] = []


def add_listener(listener: Callable[[str], None]) -> None:
    """Call ``listener(point)`` at every named point of the run from now on."""
    _listeners.append(listener)


def emit(point: str) -> None:
    """Tell the listeners that the run reached ``point``."""
    for listener in _listeners:
        listener(point)
