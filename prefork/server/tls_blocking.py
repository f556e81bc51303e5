"""TLS on the sync and thread workers: one connection, blocking, in Python.

The handshake runs against one deadline (``--tls-handshake-timeout``), not
a timeout per read: a client that sends its ClientHello a byte at a time
cannot hold the worker longer than that. Then the handler runs on the
``ssl.SSLSocket``: the built-in services as loops of ``recv_into`` and
``sendall`` (OpenSSL does the crypto without the GIL, the loop is Python),
a protocol over ``BlockingTransport``, and a user's ``handle(sock, address)``
or socketserver request handler on the TLS socket itself.

The close sends the server's close_notify without waiting for the peer's:
a client that never answers cannot hold the worker either.
"""

from __future__ import annotations

import os
import select
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

from prefork._fastio_common import daytime_line
from prefork.server.handlers import (
    CHARGEN_PATTERN,
    LoadedHandler,
    serve_handle_on,
    serve_protocol_on,
    serve_request_handler_on,
)

# (TLS socket, buffer, PROXY client or None) -> (plaintext bytes in, out).
TLSHandler = Callable[[ssl.SSLSocket, Any, Any], tuple[int, int]]


class HandshakeFailed(Exception):
    """The client did not complete a TLS handshake (why: the message)."""


def handshake(context: ssl.SSLContext, fd: int, timeout: float) -> ssl.SSLSocket:
    """Wrap the connected descriptor ``fd`` (a duplicate: the worker closes
    the original) and complete the server's handshake within ``timeout``
    seconds; raises HandshakeFailed."""
    sock = socket.socket(fileno=os.dup(fd))
    sock.setblocking(False)
    if sock.family != socket.AF_UNIX:
        # A TLS write is several records, written one by one: without
        # TCP_NODELAY the last short segment waits for the peer's delayed ACK.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        tls = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    except OSError as exc:
        sock.close()
        raise HandshakeFailed(str(exc)) from None
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                readable, writable = [tls], []
            except ssl.SSLWantWriteError:
                readable, writable = [], [tls]
            left = deadline - time.monotonic()
            if left <= 0 or not any(select.select(readable, writable, [], left)):
                raise TimeoutError("timed out")
    except OSError as exc:  # a bad handshake, a reset, the peer gone, the deadline
        tls.close()
        why = exc.reason if isinstance(exc, ssl.SSLError) else exc.strerror
        raise HandshakeFailed(why or str(exc)) from None
    tls.setblocking(True)
    return tls


def close_tls(tls: ssl.SSLSocket) -> None:
    """Send close_notify (not waiting for the peer's), then close."""
    try:
        tls.settimeout(0.0)
        tls.unwrap()
    except (OSError, ValueError):
        pass  # the peer's close_notify is not awaited; a gone peer is fine too
    finally:
        tls.close()


def echo(tls: ssl.SSLSocket, buffer: Any) -> tuple[int, int]:
    view = memoryview(buffer)
    nin = nout = 0
    while True:
        n = tls.recv_into(view)  # 0 at the end, with or without close_notify
        if n == 0:
            return nin, nout
        nin += n
        tls.sendall(view[:n])
        nout += n


def discard(tls: ssl.SSLSocket, buffer: Any) -> tuple[int, int]:
    view = memoryview(buffer)
    nin = 0
    while True:
        n = tls.recv_into(view)
        if n == 0:
            return nin, 0
        nin += n


def daytime(tls: ssl.SSLSocket, buffer: Any) -> tuple[int, int]:
    line = daytime_line()
    tls.sendall(line)
    return 0, len(line)


def chargen(tls: ssl.SSLSocket, buffer: Any) -> tuple[int, int]:
    nout = 0
    while True:  # until the client goes away (EPIPE, reset)
        tls.sendall(CHARGEN_PATTERN)
        nout += len(CHARGEN_PATTERN)


BUILTIN_TLS = {"echo": echo, "discard": discard, "daytime": daytime, "chargen": chargen}


def tls_handler(loaded: LoadedHandler) -> TLSHandler:
    """What the sync and thread workers run on a TLS connection (as
    ``LoadedHandler.for_blocking_workers`` on a plain one's descriptor)."""
    if loaded.builtin is not None:
        builtin = BUILTIN_TLS[loaded.builtin]
        return lambda tls, buffer, client: builtin(tls, buffer)
    factory, handle = loaded.protocol_factory, loaded.handle
    if factory is not None:
        return lambda tls, buffer, client: serve_protocol_on(tls, buffer, factory, client)
    assert handle is not None
    if loaded.kind == "request-handler":
        return lambda tls, buffer, client: serve_request_handler_on(tls, handle, client)
    return lambda tls, buffer, client: serve_handle_on(tls, handle, client)
