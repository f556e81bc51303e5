"""What the compiled hot loop (``_fastio.pyx``) and its specification
(``_fastio_py.py``) share: defined once, imported by both.

Rule: this module imports nothing from ``prefork.server`` or ``prefork.tools``,
and nothing from either implementation; each implementation imports it.
"""

from __future__ import annotations

import socket
from typing import Any


def peer_name(sock: socket.socket) -> Any:
    """A connected socket's peer address, or None once the peer is gone."""
    try:
        return sock.getpeername()
    except OSError:
        return None


def peer_of_fd(fd: int) -> Any:
    """``peer_name`` of the connection on descriptor ``fd`` (borrowed)."""
    sock = socket.socket(fileno=fd)
    try:
        return peer_name(sock)
    finally:
        sock.detach()
