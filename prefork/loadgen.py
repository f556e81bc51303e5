"""Picks the load generator's loop once; ``prefork bench`` imports this.

Chosen by ``prefork.fastio.choose``, like the hot loops:
``PREFORK_NO_EXTENSIONS=1`` forces the pure-Python ``prefork._loadgen_py``;
otherwise the compiled ``prefork._loadgen``, falling back to the twin only
when the extension is absent. Both stay importable under their own names so
one process can test both. The constants and the histogram helpers come
from ``prefork._loadgen_common``, where both implementations take them.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

from prefork import _loadgen_py
from prefork._loadgen_common import (
    BUCKETS,
    ERROR_KINDS,
    HEADER,
    MAX_DATAGRAM,
    MAX_EXCHANGE,
    bucket_high,
    percentile,
)
from prefork.fastio import choose, import_compiled

__all__ = [
    "BUCKETS",
    "ERROR_KINDS",
    "HEADER",
    "IMPLEMENTATION",
    "MAX_DATAGRAM",
    "MAX_EXCHANGE",
    "LoadGen",
    "bucket_high",
    "bucket_index",
    "load_compiled",
    "percentile",
]


def load_compiled() -> ModuleType | None:
    """The compiled load generator, or None when it is not built."""
    return import_compiled("_loadgen")


_impl, IMPLEMENTATION = choose("_loadgen", _loadgen_py)

# Typed as the specification's class: the compiled one has the same interface.
LoadGen: type[_loadgen_py.LoadGen] = _impl.LoadGen
bucket_index: Callable[[int], int] = _impl.bucket_index
