"""Picks the hot-loop implementation once; the rest of prefork imports this.

Order (msgpack's): ``PREFORK_NO_EXTENSIONS=1`` forces pure Python; otherwise
the compiled ``prefork._fastio``, falling back to ``prefork._fastio_py`` only
when the extension is absent (an install with the variable set builds none).
Both stay importable under their own names so one process can test both.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

from prefork import _fastio_py
from prefork._fastio_common import peer_name, peer_of_fd

__all__ = [
    "IMPLEMENTATION",
    "ConnectionCore",
    "EventLoop",
    "StreamCounts",
    "TimerQueue",
    "accept",
    "chargen",
    "discard",
    "echo",
    "choose",
    "counted_write",
    "extensions_disabled",
    "import_compiled",
    "load_compiled",
    "peer_name",
    "peer_of_fd",
    "rate_admit",
    "sendall",
]


def extensions_disabled() -> bool:
    """True when ``PREFORK_NO_EXTENSIONS`` asks for the pure-Python code."""
    return os.environ.get("PREFORK_NO_EXTENSIONS", "") not in ("", "0")


def import_compiled(name: str) -> ModuleType | None:
    """The compiled module ``prefork.NAME``, or None when it is not built."""
    try:
        return importlib.import_module(f"prefork.{name}")
    except ImportError:
        return None


def choose(compiled: str, twin: ModuleType) -> tuple[ModuleType, str]:
    """The compiled module ``prefork.COMPILED`` unless extensions are disabled
    or it is not built, else its pure-Python ``twin``; and "cython" or "python"."""
    if not extensions_disabled():
        module = import_compiled(compiled)
        if module is not None:
            return module, "cython"
    return twin, "python"


def load_compiled() -> ModuleType | None:
    """The compiled hot loops, or None when they are not built."""
    return import_compiled("_fastio")


_impl, IMPLEMENTATION = choose("_fastio", _fastio_py)

EventLoop = _impl.EventLoop
# The -k asyncio worker's per-message path; typed as the spec's (same interface).
ConnectionCore: type[_fastio_py.ConnectionCore] = _impl.ConnectionCore
StreamCounts: type[_fastio_py.StreamCounts] = _impl.StreamCounts
counted_write: Callable[[Any, Any], None] = _impl.counted_write
# The event worker's asyncio timers (a heap compared in C).
TimerQueue: type[_fastio_py.TimerQueue] = _impl.TimerQueue
accept: Callable[[Any], int | None] = _impl.accept
echo: Callable[[Any, Any], tuple[int, int]] = _impl.echo
discard: Callable[[Any, Any], tuple[int, int]] = _impl.discard
chargen: Callable[[Any, Any], tuple[int, int]] = _impl.chargen
sendall: Callable[[Any, Any], int] = _impl.sendall
# The UDP and connection rate limits' admission (``_fastio_common.rate_admit``).
rate_admit: Callable[..., tuple[bool, bool]] = _impl.rate_admit
