"""The hot loop in pure Python: the specification of ``prefork._fastio``.

Every function here has a compiled twin in ``_fastio.pyx`` with the same name,
signature, return value and exceptions; the test suite runs both and compares
them. This module is written for clarity with ``socket.recv_into`` and
``socket.sendall``; the compiled one makes the same syscalls in the same order
with the GIL released, so the two can be checked against each other.

Conventions shared by every function:

- ``conn``/``listener`` is a file descriptor (``int``) or any object with a
  ``fileno()`` method. The descriptor is borrowed, never closed.
- The socket must be in blocking mode (except for ``accept``); a non-blocking
  socket raises ``BlockingIOError`` when it would block, like ``socket`` does.
- Errors are raised as ``OSError`` built from ``errno``, so they arrive as the
  same subclasses the ``socket`` module raises (``ConnectionResetError``,
  ``BrokenPipeError``, ...). A signal that interrupts a call runs the Python
  signal handlers; if one raises, its exception propagates, otherwise the call
  is retried (PEP 475).
- Arguments are checked before the descriptor is touched: an empty or
  read-only buffer is a ``ValueError``/``TypeError`` whatever the descriptor.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["accept", "chargen", "discard", "echo", "sendall"]


def _fileno(obj: Any) -> int:
    """Return the descriptor of an ``int`` or an object with ``fileno()``."""
    fd = obj if isinstance(obj, int) else obj.fileno()
    if not isinstance(fd, int):
        raise TypeError(f"fileno() returned {type(fd).__name__}, not int")
    if fd < 0:
        raise ValueError(f"negative file descriptor: {fd}")
    return fd


def _byte_view(data: Any, *, writable: bool) -> memoryview:
    """A flat, non-empty byte view of ``data``; checks done before any I/O."""
    view = memoryview(data)
    if writable and view.readonly:
        raise TypeError("buffer must be writable")
    view = view.cast("B")  # TypeError for non-contiguous buffers
    if len(view) == 0:
        raise ValueError("buffer must not be empty")
    return view


@contextmanager
def _borrowed(fd: int) -> Iterator[socket.socket]:
    """A socket object around ``fd`` that leaves the descriptor open."""
    sock = socket.socket(fileno=fd)  # EBADF, ENOTSOCK raised here
    try:
        yield sock
    finally:
        sock.detach()


def accept(listener: Any) -> int | None:
    """Accept one connection on ``listener``; return its descriptor.

    The new descriptor is blocking and close-on-exec; the caller owns it.
    Returns ``None`` when no connection is waiting (``EAGAIN`` on a
    non-blocking listener: another worker won the race) or the one waiting
    was aborted by its peer (``ECONNABORTED``). Any other error, notably
    ``EMFILE``/``ENFILE``, is raised for the caller to back off.
    """
    fd = _fileno(listener)
    with _borrowed(fd) as sock:
        try:
            conn, _ = sock.accept()
        except (BlockingIOError, ConnectionAbortedError):
            return None
        return conn.detach()


def echo(conn: Any, buffer: Any) -> tuple[int, int]:
    """Echo everything read from ``conn`` back to it until end of file.

    Reads into ``buffer`` (writable, non-empty, reused for every read: no
    allocation per message) and writes each chunk back in full before the
    next read. Returns ``(bytes_in, bytes_out)``, equal on success.
    """
    fd = _fileno(conn)
    view = _byte_view(buffer, writable=True)
    nin = nout = 0
    with _borrowed(fd) as sock:
        while True:
            n = sock.recv_into(view)
            if n == 0:
                return nin, nout
            nin += n
            sock.sendall(view[:n])
            nout += n


def discard(conn: Any, buffer: Any) -> tuple[int, int]:
    """Read and drop everything from ``conn`` until end of file (RFC 863).

    Returns ``(bytes_in, 0)``.
    """
    fd = _fileno(conn)
    view = _byte_view(buffer, writable=True)
    nin = 0
    with _borrowed(fd) as sock:
        while True:
            n = sock.recv_into(view)
            if n == 0:
                return nin, 0
            nin += n


def chargen(conn: Any, pattern: Any) -> tuple[int, int]:
    """Send ``pattern`` over and over until the peer goes away (RFC 864).

    ``pattern`` must hold whole periods of the character stream, so that
    sending it in a cycle is the stream. Input is not read. The peer closing
    (``EPIPE``) or resetting (``ECONNRESET``) is the normal end and returns
    ``(0, bytes_out)``, counting the bytes the kernel accepted.
    """
    fd = _fileno(conn)
    view = _byte_view(pattern, writable=False)
    size = len(view)
    offset = nout = 0
    with _borrowed(fd) as sock:
        while True:
            try:
                n = sock.send(view[offset:])
            except (BrokenPipeError, ConnectionResetError):
                return 0, nout
            nout += n
            offset = (offset + n) % size


def sendall(conn: Any, data: Any) -> int:
    """Send all of ``data`` (any bytes-like, may be empty); return its length."""
    fd = _fileno(conn)
    view = memoryview(data).cast("B")
    with _borrowed(fd) as sock:
        sock.sendall(view)
    return len(view)
