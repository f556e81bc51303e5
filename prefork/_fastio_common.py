"""What the compiled hot loop (``_fastio.pyx``) and its specification
(``_fastio_py.py``) share: defined once, imported by both.

Rule: this module imports nothing from ``prefork.server`` or ``prefork.tools``,
and nothing from either implementation; each implementation imports it.
"""

from __future__ import annotations

import socket
from typing import Any

# EventLoop's limits when the caller gives none (the settings' defaults too).
DEFAULT_MAX_CONNECTIONS = 1024  # connections one event worker serves at once
DEFAULT_MAX_BUFFER = 256 * 1024  # bytes a connection may owe its peer
DEFAULT_IDLE_TIMEOUT = 300.0  # seconds without a byte either way; 0 = never


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
