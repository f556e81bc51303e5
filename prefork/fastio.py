"""Picks the hot-loop implementation once; the rest of prefork imports this.

Order (msgpack's): ``PREFORK_NO_EXTENSIONS=1`` forces pure Python; otherwise
the compiled ``prefork._fastio``, falling back to ``prefork._fastio_py`` only
when the extension is absent (an install with the variable set builds none).
Both stay importable under their own names so one process can test both.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

from prefork import _fastio_py

__all__ = [
    "IMPLEMENTATION",
    "EventLoop",
    "accept",
    "chargen",
    "discard",
    "echo",
    "extensions_disabled",
    "load_compiled",
    "sendall",
]


def extensions_disabled() -> bool:
    """True when ``PREFORK_NO_EXTENSIONS`` asks for the pure-Python code."""
    return os.environ.get("PREFORK_NO_EXTENSIONS", "") not in ("", "0")


def load_compiled() -> ModuleType | None:
    """The compiled module, or None when it is not built."""
    try:
        from prefork import _fastio
    except ImportError:
        return None
    return _fastio


def _choose() -> tuple[ModuleType, str]:
    if not extensions_disabled():
        compiled = load_compiled()
        if compiled is not None:
            return compiled, "cython"
    return _fastio_py, "python"


_impl, IMPLEMENTATION = _choose()

EventLoop = _impl.EventLoop
accept: Callable[[Any], int | None] = _impl.accept
echo: Callable[[Any, Any], tuple[int, int]] = _impl.echo
discard: Callable[[Any, Any], tuple[int, int]] = _impl.discard
chargen: Callable[[Any, Any], tuple[int, int]] = _impl.chargen
sendall: Callable[[Any, Any], int] = _impl.sendall
