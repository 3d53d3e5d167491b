"""Ctrl-C / SIGTERM handling that never tears a write apart.

While weights are being written, a signal only sets a flag; the writer checks it between chunks
and stops cleanly (its rank's ``.tmp`` file is removed, finished ranks are kept for resume).
Outside such a section a signal interrupts at once, as usual.
"""
from __future__ import annotations

import signal
from contextlib import contextmanager

_state = {"deferred": 0, "stop": False}


class Interrupted(Exception):
    """Ctrl-C or SIGTERM during a write; finished ranks are kept for resume."""


def _handler(signum, frame):
    if _state["deferred"]:
        _state["stop"] = True
    else:
        raise KeyboardInterrupt


def install() -> None:
    """Route SIGINT and SIGTERM through the handler (main process and conversion workers)."""
    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)


def install_deferred() -> None:
    """``install``, with signals deferred for the life of the process: a conversion worker only
    writes, so a signal there always waits for the chunk boundary (its parent decides)."""
    install()
    _state["deferred"] = 1


def stop_requested() -> bool:
    return _state["stop"]


def check() -> None:
    if _state["stop"]:
        raise Interrupted("interrupted")


@contextmanager
def deferred():
    _state["deferred"] += 1
    try:
        yield
    finally:
        _state["deferred"] -= 1
