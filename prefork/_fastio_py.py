"""The hot loop in pure Python: the specification of ``prefork._fastio``.

Rules: this module imports nothing from ``prefork.server`` or
``prefork.tools``, and the compiled twin never imports it; what the two share
(constants, argument checks, the scoreboard slot's layout, the daytime
format) is defined once in ``prefork._fastio_common``.

Every function here has a compiled twin in ``_fastio.pyx`` with the same name,
signature, return value and exceptions; the test suite runs both and compares
them. This module is written for clarity with ``socket`` objects; the
compiled one calls libc with the GIL released. Results, counters, exceptions
and what each peer receives, in its order, are the same; so are the syscalls
and their order, except in these places:

- Wrapping. Where this module wraps a descriptor in a ``socket`` object,
  CPython adds calls of its own (``getsockname``/``getsockopt`` to wrap, a
  second call for ``setblocking``): an accepted connection is made
  non-blocking after ``accept4`` here, by ``accept4(SOCK_NONBLOCK)`` there.
  The compiled loop also wraps, where it calls Python code (a protocol's
  transport, a PROXY peer's address). It sends with ``MSG_NOSIGNAL``; this
  module relies on Python ignoring SIGPIPE (the same ``EPIPE`` either way,
  unless a program restores SIGPIPE's default).
- Datagrams. This module serves a batch one datagram at a time, ``recvmsg``
  then ``sendto``; the compiled loop receives the batch with one
  ``recvmmsg`` and sends the replies with ``sendmmsg`` (again after a
  partial send). The same replies in the same order, the same counters, the
  same batch (at most ``DATAGRAM_BATCH`` receives a wake-up; a receive error
  takes one place and the batch reads on: see ``_serve_datagrams``), with
  three consequences of the batching:
  - when the kernel cannot take a reply at once (EAGAIN), this module drops
    that reply and tries the next; the compiled loop drops the rest of the
    batch's replies (UDP may drop either);
  - an error pending on the socket (ECONNREFUSED after an ICMP port
    unreachable: only on a connected socket or one with ``IP_RECVERR``) goes
    to whichever call comes next. Here that is always a receive, since a
    receive follows every send. In the compiled loop it can be the next
    reply's send inside ``sendmmsg``, which then returns short and sends that
    reply again (nothing is lost); an error pending when ``sendmmsg`` starts
    drops that reply, as it does ``sendto`` here; and an error met by
    ``recvmmsg`` after some datagrams ends its batch there (the kernel keeps
    the error for the next call);
  - ``recvmmsg`` is called with ``MSG_DONTWAIT``, so the compiled loop does
    not block on a blocking socket; this module would (give it non-blocking
    sockets).
- Chargen over UDP answers with a random 0 to ``CHARGEN_DATAGRAM_MAX``
  characters; the two draw the lengths from different generators (``random``
  here, a xorshift there), so they differ reply by reply.

Conventions shared by every function:

- ``conn``/``listener`` is a file descriptor (``int``) or any object with a
  ``fileno()`` method. The descriptor is borrowed, never closed.
- The socket must be in blocking mode (except for ``accept``); a non-blocking
  socket raises ``BlockingIOError`` when it would block, like ``socket`` does.
- Errors are raised as ``OSError`` built from ``errno``, so they arrive as the
  same subclasses the ``socket`` module raises (``ConnectionResetError``,
  ``BrokenPipeError``, ...). A signal that interrupts a call runs the Python
  signal handlers; if one raises, its exception propagates, otherwise the call
  is retried (PEP 475). So does a blocking socket's send or receive timeout
  (``SO_SNDTIMEO``/``SO_RCVTIMEO``, ``EAGAIN``) expiring: the compiled loop,
  which runs handlers only when a call fails, then runs the ones a signal
  that landed between two calls left pending; the sync worker sets these
  timeouts so that it sees TERM while a client is idle.
- Arguments are checked before the descriptor is touched: an empty or
  read-only buffer is a ``ValueError``/``TypeError`` whatever the descriptor.
"""

from __future__ import annotations

import asyncio
import errno
import heapq
import os
import random
import select
import socket
import ssl
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from prefork import proxy
from prefork._fastio_common import (
    ACCEPT_BATCH,
    ACCESS_LOG_BUFFER,
    ACCESS_PIPE_WRITE,
    CHARGEN_DATAGRAM_MAX,
    CORK_BYTES,
    CORK_CHUNKS,
    COUNTERS_OFFSET,
    DATAGRAM_BATCH,
    DATAGRAM_SIZE,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_BUFFER,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_RATE_PREFIX,
    DEFAULT_TLS_HANDSHAKE_TIMEOUT,
    DRAIN_MAX,
    EMFILE_PAUSE,
    HEARTBEAT,
    HEARTBEAT_OFFSET,
    LOOP_COUNTERS_STRUCT,
    MAX_EVENTS,
    SWEEP_INTERVAL,
    TLS_HANDSHAKES_PER_TURN,
    WRITE_HIGH_WATER,
    WRITE_LOW_WATER,
    ClientLimits,
    access_line,
    byte_view,
    check_loop_args,
    check_rate_args,
    check_tls_args,
    client_address,
    datagram_loop_ports,
    datagram_refusal,
    daytime_line,
    fileno_of,
    format_client,
    peer_name,
    proxy_fds,
    rate_admit,
    rate_key,
    read_size_for,
    stats_view,
    table_lock_fd,
    write_buffer_limits,
)

__all__ = [
    "ConnectionCore",
    "EventLoop",
    "StreamCounts",
    "TimerQueue",
    "Transport",
    "accept",
    "chargen",
    "counted_write",
    "discard",
    "echo",
    "rate_admit",
    "sendall",
]


def _retry_timeouts(
    call: Callable[[memoryview], int], sock: socket.socket, view: memoryview
) -> int:
    """``call(view)``, again while it fails because a blocking socket's send
    or receive timeout expired (the signal handlers ran between the two
    calls); a non-blocking socket's BlockingIOError is the caller's to see."""
    while True:
        try:
            return call(view)
        except BlockingIOError:
            if not os.get_blocking(sock.fileno()):
                raise


def _recv_into(sock: socket.socket, view: memoryview) -> int:
    return _retry_timeouts(sock.recv_into, sock, view)


def _send(sock: socket.socket, view: memoryview) -> int:
    return _retry_timeouts(sock.send, sock, view)


def _send_all(sock: socket.socket, view: memoryview) -> None:
    """``sock.sendall``, but a send timeout retries the rest (sendall's
    would raise and lose the count of what it sent)."""
    sent = _send(sock, view)
    while sent < len(view):
        sent += _send(sock, view[sent:])


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
    fd = fileno_of(listener)
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
    fd = fileno_of(conn)
    view = byte_view(buffer, writable=True)
    nin = nout = 0
    with _borrowed(fd) as sock:
        while True:
            n = _recv_into(sock, view)
            if n == 0:
                return nin, nout
            nin += n
            _send_all(sock, view[:n])
            nout += n


def discard(conn: Any, buffer: Any) -> tuple[int, int]:
    """Read and drop everything from ``conn`` until end of file (RFC 863).

    Returns ``(bytes_in, 0)``.
    """
    fd = fileno_of(conn)
    view = byte_view(buffer, writable=True)
    nin = 0
    with _borrowed(fd) as sock:
        while True:
            n = _recv_into(sock, view)
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
    fd = fileno_of(conn)
    view = byte_view(pattern, writable=False)
    size = len(view)
    offset = nout = 0
    with _borrowed(fd) as sock:
        while True:
            try:
                n = _send(sock, view[offset:])
            except (BrokenPipeError, ConnectionResetError):
                return 0, nout
            nout += n
            offset = (offset + n) % size


def sendall(conn: Any, data: Any) -> int:
    """Send all of ``data`` (any bytes-like, may be empty); return its length."""
    fd = fileno_of(conn)
    view = memoryview(data).cast("B")
    with _borrowed(fd) as sock:
        _send_all(sock, view)
    return len(view)


# -- the event loop ------------------------------------------------------------------
#
# How it works: one epoll set per worker holds the listeners (EPOLLEXCLUSIVE,
# so one connection wakes one worker), the signal wake-up pipe and every
# connection (level-triggered). Echo reads into one shared buffer and sends
# straight back; only what the kernel did not take is kept in a
# per-connection pending buffer, and while anything is pending the
# connection is not read (backpressure), so a built-in service never holds
# more than one read, itself at most ``max_buffer``, per connection.
# ``_update`` is the one place that decides what a connection waits for.
# select.epoll is used directly rather than selectors because EPOLLEXCLUSIVE
# and the re-arm below need the raw calls.
#
# Fair accept: exclusive wake-ups go to the first idle waiter on the
# listener's queue, so one worker would take most connections. After each
# accept batch the worker removes and re-adds the listener, which moves it to
# the back of the queue: idle workers take turns. Every ``run`` call also
# re-adds them: a wake-up spent on a worker that then stopped accepting is
# not passed on by the kernel, and re-adding reports a waiting connection
# again (so it waits at most one tick, never until the next arrival).
#
# Datagram sockets (UDP) share the set, also exclusive and re-armed: each
# wake-up serves a batch of datagrams, one reply per datagram to its sender,
# boundaries preserved; a reply the kernel cannot take at once is dropped,
# as UDP allows.
#
# User protocols (service "protocol") get asyncio's Protocol callbacks and a
# Transport; a protocol that writes faster than its peer reads is cut off
# when it owes more than ``max_buffer`` (a slow consumer must not grow the
# worker without bound).

_EPOLLIN = select.EPOLLIN
_EPOLLOUT = select.EPOLLOUT
_LISTEN_EVENTS = select.EPOLLIN | select.EPOLLEXCLUSIVE
_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def _log() -> Any:
    import logging

    return logging.getLogger("prefork")


def _protocol_buffer(protocol: Any) -> tuple[Any, int]:
    """A BufferedProtocol's ``get_buffer(-1)`` and its size in bytes; an
    empty or read-only buffer is refused (a read into an empty one would look
    like the end of the stream)."""
    buffer = protocol.get_buffer(-1)
    with memoryview(buffer) as view:
        if view.readonly:
            raise TypeError("get_buffer() returned a read-only buffer")
        if not view.nbytes:
            raise RuntimeError("get_buffer() returned an empty buffer")
        return buffer, view.nbytes


class _Conn:
    __slots__ = (
        "sock",
        "fd",
        "pending",
        "eof",
        "reading",
        "last_active",
        "offset",
        "events",
        "registered",
        "protocol",
        "transport",
        "header",
        "peer",
        "peer_eof",
        "started",
        "nin",
        "nout",
        "client",
        "read_paused",
        "write_paused",
        "shut_when_flushed",
        "buffered",
        "read_wide",
        "held",
        "secure",
        "tls_ready",
        "tls_want_out",
        "tls_deadline",
    )

    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.pending = bytearray()  # owed to the peer, not yet taken by the kernel
        self.eof = False  # close once ``pending`` is flushed
        self.reading = True  # false after end of file
        self.last_active = now
        self.offset = 0  # chargen: position in the pattern
        self.events = 0  # what the epoll set waits for
        self.registered = False
        self.protocol: Any = None
        self.transport: Transport | None = None
        self.header: bytearray | None = None  # a PROXY header being read
        self.peer: Any = None  # the client's address, from a PROXY header
        self.held: Any = None  # its client's key in the per-client count, to release
        self.peer_eof = False  # the peer's end of file came (how it ended, for the log)
        # For the access log: since when, what this connection moved, who.
        self.started = now
        self.nin = self.nout = 0
        self.client = ""
        self.read_paused = False  # Transport.pause_reading()
        self.write_paused = False  # the protocol was told pause_writing()
        self.shut_when_flushed = False  # Transport.write_eof() while owing
        self.buffered = False  # an asyncio.BufferedProtocol: get_buffer/buffer_updated
        self.read_wide = False  # its last read filled its buffer: read on into the loop's
        # TLS (a tls_listeners connection): ``sock`` becomes an ssl.SSLSocket,
        # non-blocking, on the same descriptor (OpenSSL on the socket, as the
        # compiled loop drives it).
        self.secure = False  # it speaks TLS once its PROXY header, if any, is read
        self.tls_ready = False  # the handshake is done: the service runs
        self.tls_want_out = False  # OpenSSL waits to write before it can go on
        self.tls_deadline = 0.0  # the handshake must be done by then


class Transport:
    """What a protocol gets in ``connection_made``: asyncio's stream transport.

    ``write`` sends at once what the kernel takes and keeps the rest (the
    connection is not read meanwhile); writing nothing does nothing (no
    send, and no activity for the idle timeout), as in asyncio. The ``bytes``
    a protocol writes while it handles a read (``data_received``,
    ``buffer_updated``) go out together when it returns, in one system call
    (asyncio's loop and uvloop make one per write); any other call on the
    transport that depends on them (``get_write_buffer_size``, ``close``,
    ``write_eof``, ``set_write_buffer_limits``, a write of another type or
    past ``CORK_CHUNKS`` or ``CORK_BYTES``) sends them first, and ``abort``
    or a handler's error still sends what the kernel takes at once: nothing
    a protocol can see differs from a send per write. Flow control
    is asyncio's: past the high-water mark of what is owed the protocol is
    told ``pause_writing()``, at the low one ``resume_writing()``; a protocol
    that does not stop writing is cut off at --max-buffer. ``close`` closes
    after flushing, ``abort`` at once (what is owed is dropped), ``write_eof``
    shuts the sending side once what is owed has gone. ``pause_reading``
    stops reading until ``resume_reading``.
    """

    def __init__(self, loop: EventLoop, conn: _Conn) -> None:
        self._loop: EventLoop | None = loop
        self._conn: _Conn | None = conn
        self._high = WRITE_HIGH_WATER
        self._low = WRITE_LOW_WATER
        self._eof_written = False
        peer = peer_name(conn.sock)
        self._extra = {
            "peername": peer,
            "sockname": conn.sock.getsockname(),
            "socket": conn.sock,
        }
        if conn.peer is not None:  # behind a PROXY protocol balancer
            self._extra.update(peername=conn.peer, proxy_peername=peer)

    def write(self, data: Any) -> None:
        if self._eof_written:
            raise RuntimeError("Cannot call write() after write_eof()")
        conn, loop = self._conn, self._loop
        if loop is not None and conn is not None and loop._holding and loop._cork_conn is not conn:
            # A callback of the asyncio loop writes (hold_writes): another
            # connection's held bytes leave first, then this one's are held.
            loop._uncork()
            conn, loop = self._conn, self._loop
            if loop is not None and conn is not None and not conn.eof:
                loop._cork_conn = conn
        if loop is not None and conn is not None and not conn.eof and loop._cork_conn is conn:
            # Its protocol handles a read: bytes are kept (a reference) and
            # sent with the others when it returns. Anything else, or past
            # the bounds, first sends what came before, then goes as usual.
            if (
                type(data) is bytes
                and len(loop._corked) < CORK_CHUNKS
                and len(data) <= CORK_BYTES - loop._corked_len
                and not conn.pending
            ):
                if data:
                    loop._corked.append(data)
                    loop._corked_len += len(data)
                    conn.last_active = time.monotonic()
                return
            loop._uncork()
            conn, loop = self._conn, self._loop
        if loop is not None and conn is not None and not conn.eof:
            view = memoryview(data).cast("B")
            if view:
                loop._write(conn, view)
                if not conn.write_paused and len(conn.pending) > self._high:
                    if conn.fd in loop._conns:
                        conn.write_paused = True
                        loop._flow_control(conn, "pause_writing")

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def _uncork(self) -> None:
        """Send what this connection's protocol wrote during the read it
        handles now, before what follows (see EventLoop._uncork)."""
        if self._loop is not None and self._loop._cork_conn is self._conn:
            self._loop._uncork()

    def write_eof(self) -> None:
        self._uncork()
        conn = self._conn
        if conn is None or conn.eof or self._eof_written:
            return
        self._eof_written = True
        if conn.pending:
            conn.shut_when_flushed = True
        else:
            conn.sock.shutdown(socket.SHUT_WR)

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        self._uncork()
        if self._loop is not None and self._conn is not None:
            self._loop._close_when_flushed(self._conn)

    def abort(self) -> None:
        """Close now, dropping what is owed; the protocol's connection_lost(None)."""
        if self._loop is not None and self._conn is not None:
            self._loop._close(self._conn)

    def _force_close(self, exc: BaseException | None) -> None:
        """Close now, and the protocol's connection_lost(exc): not part of
        asyncio's public transport API, but what its TLS protocol
        (``asyncio.sslproto``, which the event worker runs TLS with) calls
        on a failed handshake, a handshake timeout or a fatal TLS error, as
        asyncio's own transports provide it. The access log says tls-failed."""
        if self._loop is not None and self._conn is not None:
            self._loop._close(self._conn, exc, "tls-failed")

    def is_closing(self) -> bool:
        return self._conn is None or self._conn.eof

    def pause_reading(self) -> None:
        self._set_reading(False)

    def resume_reading(self) -> None:
        self._set_reading(True)

    def _set_reading(self, reading: bool) -> None:
        conn, loop = self._conn, self._loop
        if conn is not None and loop is not None and conn.read_paused == reading:
            conn.read_paused = not reading
            if conn.registered:
                loop._update(conn)

    def is_reading(self) -> bool:
        return self._conn is not None and not self._conn.eof and not self._conn.read_paused

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high, self._low = write_buffer_limits(high, low)
        self._uncork()
        conn, loop = self._conn, self._loop
        if conn is not None and loop is not None and not conn.write_paused:
            if len(conn.pending) > self._high:
                conn.write_paused = True
                loop._flow_control(conn, "pause_writing")

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def get_write_buffer_size(self) -> int:
        self._uncork()
        return len(self._conn.pending) if self._conn is not None else 0

    def get_protocol(self) -> Any:
        return self._conn.protocol if self._conn is not None else None

    def set_protocol(self, protocol: Any) -> None:
        if self._conn is not None:
            self._conn.protocol = protocol
            self._conn.buffered = isinstance(protocol, asyncio.BufferedProtocol)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)


class EventLoop:
    """A worker's epoll loop serving one service on many connections.

    ``listeners`` are borrowed listening sockets (``int`` or ``fileno()``),
    non-blocking, shared with other workers. ``service`` is a built-in
    (``echo``, ``discard``, ``chargen`` with ``pattern``, ``daytime``) or
    ``protocol``: then ``protocol_factory()`` makes an object per connection
    with asyncio's ``connection_made(transport)``, ``data_received(data)``,
    ``eof_received()`` (return true to keep the connection open) and
    ``connection_lost(exc)``; an exception from one of them is logged and
    closes that connection only. ``wakeup_fd`` (the read end of
    ``signal.set_wakeup_fd``'s pipe, or -1) makes ``run`` return promptly
    after a signal.

    Limits: at ``max_connections`` the listeners are removed from the set and
    new connections wait in the backlog for other workers; a connection owes
    its peer at most ``max_buffer`` bytes and is not read while it owes any;
    one idle for ``idle_timeout`` seconds (no byte read or written; 0 =
    never) is closed.

    ``stats`` (a writable ``SLOT_SIZE``-byte buffer laid out as a scoreboard
    slot, ``_fastio_common.SLOT``: heartbeat, pid, then the counters; or
    None) receives ``time.monotonic()`` and the
    counters (``LOOP_COUNTERS``) every time the loop
    wakes, at least once per ``run``; the pid field is left alone. The
    master's watchdog and summaries read it.

    ``max_accepts`` (0 = no limit) stops accepting after that many
    connections, for recycling: ``run`` then returns once they are done.
    Until then the loop is ``recycled``: the listeners are still the
    caller's to keep open, and a ``drain()`` (the worker told to stop while
    it finishes) still takes what queued on them meanwhile.

    ``proxy_listeners`` (a subset of ``listeners``) carry the PROXY protocol:
    a connection accepted on one first sends a v1 or v2 header, and nothing
    reaches the service before it is whole (``prefork.proxy.parse``); a
    missing or malformed header closes the connection with a logged reason.
    ``proxy_trusted(peer)`` says which peers may send one (None: any); others
    are closed at once. The header's address becomes the protocol's
    ``peername`` (the balancer's is ``proxy_peername``).

    ``access_log`` (a descriptor open for appending, borrowed; -1: none)
    gets one line per connection when it ends (``_fastio_common.access_line``:
    time, client, pid, duration, bytes in and out, ``END_REASONS``). Lines
    wait in a buffer of ``ACCESS_LOG_BUFFER`` bytes, written when it is full
    and at the end of every ``run`` (and by ``close``) with one non-blocking
    write (``send(MSG_DONTWAIT)`` on a socket); what the file does not take
    stays buffered, and a line that finds the buffer full is dropped and
    counted in ``access_log_dropped``: the loop never waits for the log.

    ``datagram_sockets`` are bound UDP sockets (borrowed, non-blocking) on
    which the built-in service answers every datagram with one datagram to
    its sender (RFC 862/863/864/867 over UDP); ``stop_accepting`` stops them.
    The UDP guard (``_fastio_common.datagram_refusal``) drops unanswered
    what comes from a port below 1024 (unless ``udp_allow_low_ports``), from
    a port of these sockets or of ``udp_loop_ports`` (the server's other UDP
    services), or from an address no reply may go to; it counts them in
    ``udp_refused_loop`` and ``udp_refused_source``, and ``udp_refused_from``
    names the last sender refused for each reason. ``udp_rate`` (replies per
    second, 0 = none) limits the replies to each source prefix
    (``udp_rate_prefix``: IPv4 and IPv6 lengths) to a token bucket of
    ``udp_burst``, kept in ``udp_rate_table`` (a writable buffer of
    ``RATE_ENTRY``s, shared by every worker; None: one of this loop's own):
    see ``_fastio_common.rate_admit``. Datagrams over it go unanswered and
    count in ``udp_refused_rate``; a prefix still limited that a full table
    pushes out counts in ``udp_rate_evictions``. Discard sends nothing and
    is not limited.

    The per-client limits (``_fastio_common.ClientLimits``; the client is a
    PROXY header's source on a PROXY listener, else the peer):
    ``conn_limit`` (0 = none) connections open at once per client address,
    counted in table ``conn_slot`` of ``conn_tables`` (the master's client
    region, shared by every worker; None: one of this loop's own) and
    summed over the slots in use; ``conn_rate`` (per second, 0 = none) new
    connections per client, a token bucket of ``conn_burst`` kept in
    ``conn_rate_table`` (like ``udp_rate_table``). A connection over either
    is closed before the service starts (access log end ``limit-refused``)
    and counted in ``limit_refused_conns`` or ``limit_refused_rate``;
    ``limit_refused_from`` names the last client refused for each; a client
    still counted or limited that a full table pushes out counts in
    ``limit_evictions``.

    Counters (read at any time): ``accepted``, ``active``, ``bytes_in``,
    ``bytes_out``, ``datagrams`` (received), ``resource_errors`` (EMFILE
    and kin on accept; the loop pauses accepting for ``EMFILE_PAUSE``
    seconds each), and connections ended by the loop: ``idle_closed`` (the
    idle timeout), ``max_buffer_closed`` (owed more than ``max_buffer``),
    ``handler_errors`` (a protocol callback raised; counted per exception,
    ``connection_lost``'s too) and ``proxy_rejected`` (a peer not
    ``proxy_trusted``, or a malformed header; one that closes before its
    header is whole is not counted).
    """

    def __init__(
        self,
        listeners: Any,
        service: str,
        *,
        wakeup_fd: int = -1,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_buffer: int = DEFAULT_MAX_BUFFER,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        pattern: Any = b"",
        protocol_factory: Any = None,
        datagram_sockets: Any = (),
        max_accepts: int = 0,
        stats: Any = None,
        proxy_listeners: Any = (),
        proxy_trusted: Any = None,
        access_log: Any = -1,
        udp_allow_low_ports: bool = False,
        udp_loop_ports: Any = (),
        udp_rate: float = 0.0,
        udp_burst: int = 1,
        udp_rate_prefix: tuple[int, int] = DEFAULT_RATE_PREFIX,
        udp_rate_table: Any = None,
        conn_limit: int = 0,
        conn_tables: Any = None,
        conn_slot: int = 0,
        conn_rate: float = 0.0,
        conn_burst: int = 1,
        conn_rate_table: Any = None,
        tls_context: Any = None,
        tls_listeners: Any = (),
        tls_handshake_timeout: float = DEFAULT_TLS_HANDSHAKE_TIMEOUT,
    ) -> None:
        self._pattern = check_loop_args(
            service, max_connections, max_buffer, idle_timeout, pattern, protocol_factory
        )
        self._rate_table, self._rate_interval, self._rate_tolerance, *prefixes = check_rate_args(
            udp_rate, udp_burst, udp_rate_prefix, udp_rate_table
        )
        self._rate_prefixes = tuple(prefixes)
        self._rate_lock_fd = table_lock_fd(udp_rate_table)
        self._limits = ClientLimits(
            conn_limit, conn_tables, conn_slot, conn_rate, conn_burst, conn_rate_table
        )
        if datagram_sockets and service == "protocol":
            raise ValueError("datagram sockets serve the built-in services only")
        fds = [fileno_of(listener) for listener in listeners]
        dgram_fds = [fileno_of(sock) for sock in datagram_sockets]
        # TLS: the built-in services over OpenSSL on the socket; each
        # connection's handshake within tls_handshake_timeout.
        self._tls_fds = check_tls_args(
            service, tls_context, tls_listeners, fds, tls_handshake_timeout
        )
        self._tls_context = tls_context
        self._tls_timeout = tls_handshake_timeout
        self._handshakes = 0
        self.service = service
        self.max_connections = max_connections
        self.max_accepts = max_accepts
        self._stats = stats_view(stats)
        self.max_buffer = max_buffer
        self.idle_timeout = float(idle_timeout)
        self.accepted = self.bytes_in = self.bytes_out = 0
        self.idle_closed = self.resource_errors = self.datagrams = 0
        self.max_buffer_closed = self.handler_errors = self.proxy_rejected = 0
        self.access_log_dropped = 0
        self.udp_refused_loop = self.udp_refused_source = self.udp_refused_rate = 0
        self.udp_rate_evictions = 0
        self._refused_from = {"loop": "", "source": "", "rate": ""}
        self.limit_refused_conns = self.limit_refused_rate = self.limit_evictions = 0
        self._limit_refused_from = {"conns": "", "rate": ""}
        off = isinstance(access_log, int) and access_log < 0
        self._access_fd = -1 if off else fileno_of(access_log)
        self._access_sock: socket.socket | None = None  # set when the log is a socket
        mode = os.fstat(self._access_fd).st_mode if self._access_fd >= 0 else 0
        if stat.S_ISSOCK(mode):
            self._access_sock = socket.socket(fileno=self._access_fd)
        self._access_pipe = stat.S_ISFIFO(mode)  # written ACCESS_PIPE_WRITE at most
        self._access_buffer = bytearray()
        self._pid = os.getpid()
        self._factory = protocol_factory
        self._buffer = memoryview(bytearray(read_size_for(max_buffer)))
        # The connection whose protocol handles a read now, and the bytes it
        # wrote meanwhile, sent together when it returns (_uncork).
        self._cork_conn: _Conn | None = None
        self._holding = False  # hold_writes: the asyncio loop's callbacks run (see there)
        self._corked: list[bytes] = []
        self._corked_len = 0
        self._conns: dict[int, _Conn] = {}
        self._epoll = select.epoll()
        self._listeners = {fd: socket.socket(fileno=fd) for fd in fds}
        self._proxy_fds = proxy_fds(proxy_listeners, fds)
        self._proxy_trusted = proxy_trusted
        self._accepting = True
        self._recycled = False  # max_accepts stopped accepting; drain() may still
        self._armed = False
        self._draining = False
        self._drained = 0
        self._return_soon = False  # return_soon(): leave run() before waiting again
        self._paused_until = 0.0
        self._wakeup_fd = wakeup_fd
        self._watched_fd = -1  # watch()
        if wakeup_fd >= 0:
            self._epoll.register(wakeup_fd, _EPOLLIN)
        self._datagram_sockets = {fd: socket.socket(fileno=fd) for fd in dgram_fds}
        self._loop_ports = datagram_loop_ports(dgram_fds, udp_loop_ports)
        self._allow_low_ports = bool(udp_allow_low_ports)
        self._datagram_buffer = bytearray(DATAGRAM_SIZE) if dgram_fds else bytearray()
        for fd in self._datagram_sockets:
            self._epoll.register(fd, _LISTEN_EVENTS)
        self._sweep_interval = min(SWEEP_INTERVAL, self.idle_timeout / 2 or SWEEP_INTERVAL)
        if self._tls_fds:  # the sweep closes late handshakes too
            self._sweep_interval = min(self._sweep_interval, self._tls_timeout / 2)
        self._next_sweep = time.monotonic() + self._sweep_interval

    @property
    def active(self) -> int:
        return len(self._conns)

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def udp_refused_from(self) -> dict[str, str]:
        """The last sender the UDP guard refused, by reason ("" for none),
        as the access log writes addresses."""
        return dict(self._refused_from)

    @property
    def limit_refused_from(self) -> dict[str, str]:
        """The last client the per-client limits refused, by reason ("" for
        none), as the access log writes addresses."""
        return dict(self._limit_refused_from)

    @property
    def recycled(self) -> bool:
        """``max_accepts`` stopped accepting, and neither a drain nor
        ``stop_accepting`` has come since."""
        return self._recycled

    def drain(self) -> None:
        """Graceful stop: accept what the listeners have queued, then stop
        accepting. Connections still queued when the last process closes a
        listener are reset by the kernel, so a worker that leaves takes what
        is waiting first: at most ``max_connections`` at a time (it takes
        more as connections end) and ``DRAIN_MAX`` in all, and it stops once
        every listener's queue is empty. It takes effect at the loop's next
        turn: a signal handler may call it. A recycled loop drains too:
        connections may have queued since it stopped accepting."""
        if self._recycled:  # accept again, but only to take the queue
            self._recycled = False
            self._accepting = True
        if self._accepting and not self._draining:
            self._draining = True
            self._drained = 0

    def return_soon(self) -> None:
        """Make ``run`` return once it has served the events in hand, instead
        of waiting for more: the asyncio callbacks and timers that user code
        scheduled run between two ``run`` calls (workers/event_asyncio.py).
        Called by user code inside ``run``, or before it (``run`` then looks
        at what is ready once, without waiting, and returns)."""
        self._return_soon = True

    def hold_writes(self, on: bool) -> None:
        """Hold what callbacks write between two ``run`` calls, as during
        a read, and send it when they are done: the asyncio loop's turn runs
        its ready callbacks (tasks, timers) under ``hold_writes(True)``, so a
        task that writes several times before it waits again sends once. One
        connection is held at a time: a write to another sends the first
        one's bytes. ``hold_writes(False)``, ``run``, and every call that
        sends held bytes during a read (``close``, ``write_eof``,
        ``get_write_buffer_size``, ...) send them."""
        if not on:
            self._uncork()
            self._cork_conn = None
        self._holding = bool(on)

    def watch(self, fd: Any) -> None:
        """Make ``run`` return when ``fd`` (borrowed) is readable, without
        reading it: its owner does, between two runs. The event worker's
        asyncio loop watches its selector (the descriptors user code waits
        on: ``add_reader``, outgoing connections) so. One descriptor, for
        good; it stays watched after ``stop_accepting``. While there is no
        connection and the loop does not accept, ``run`` returns at once as
        ever: the owner waits on the descriptor itself then."""
        fd = fileno_of(fd)
        if self._watched_fd >= 0:
            raise ValueError("the loop watches one descriptor already")
        self._epoll.register(fd, _EPOLLIN)
        self._watched_fd = fd

    def stop_accepting(self) -> None:
        """Take the listeners out of the loop for good (graceful stop).

        Call it before closing the listeners: an epoll set keeps watching a
        listener another process still has open, even after we close ours.
        """
        self._recycled = False
        if not self._accepting:
            return
        self._accepting = False
        self._disarm()
        for fd in self._datagram_sockets:
            self._epoll.unregister(fd)
        for sock in self._datagram_sockets.values():
            sock.detach()
        self._datagram_sockets.clear()

    def close(self) -> None:
        """Close every connection and the epoll set; listeners stay open."""
        for conn in list(self._conns.values()):
            self._close(conn, end="shutdown")
        self._holding = False
        self._flush_access_log()
        if self._access_sock is not None:
            self._access_sock.detach()
            self._access_sock = None
        if self._accepting:
            self.stop_accepting()
        for sock in self._listeners.values():
            sock.detach()
        self._listeners.clear()
        self._epoll.close()

    # -- the loop -------------------------------------------------------------------

    def run(self, timeout: float) -> None:
        """Serve for up to ``timeout`` seconds.

        Returns early once a signal has arrived (its handlers have run) or
        when the loop has stopped accepting and has no connection left.
        The access log's buffer is written on the way out.
        """
        if self._holding:  # reads hold their own writes: what is held leaves first
            self.hold_writes(False)
        try:
            self._run(timeout)
        finally:
            self._flush_access_log()

    def _run(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self._rearm()
        while True:
            now = time.monotonic()
            if self._draining and self._accepting:
                self._drain(now)
            self._arm_if_ready(now)
            if not self._accepting and not self._conns:
                return
            if now >= self._next_sweep:
                self._sweep(now)
            wait = min(deadline, self._next_sweep) - now
            if self._accepting and not self._armed and self._paused_until > now:
                wait = min(wait, self._paused_until - now)
            if wait <= 0 and now >= deadline:
                return
            if self._return_soon:  # callbacks are waiting: look, do not wait
                wait = 0.0
            events = self._epoll.poll(max(wait, 0.0), MAX_EVENTS)
            now = time.monotonic()
            if self._stats is not None:
                self._publish(now)
            woken = False
            self._handshakes = 0  # handshake steps taken in this turn
            for fd, mask in events:
                conn = self._conns.get(fd)
                if conn is not None:
                    self._serve(conn, mask, now)
                elif fd == self._wakeup_fd:
                    woken = True
                    _drain(fd)
                elif fd == self._watched_fd:
                    woken = True  # its owner reads it, between two runs
                elif fd in self._listeners and self._armed:
                    self._accept(fd, now)
                elif fd in self._datagram_sockets:
                    self._serve_datagrams(fd)
            if woken or self._return_soon:
                self._return_soon = False
                return

    def _publish(self, now: float) -> None:
        """The heartbeat and the counters (``LOOP_COUNTERS``) into the slot."""
        assert self._stats is not None
        HEARTBEAT.pack_into(self._stats, HEARTBEAT_OFFSET, now)
        LOOP_COUNTERS_STRUCT.pack_into(
            self._stats,
            COUNTERS_OFFSET,
            self.accepted,
            len(self._conns),
            self.bytes_in,
            self.bytes_out,
            self.idle_closed,
            self.max_buffer_closed,
            self.handler_errors,
            self.proxy_rejected,
            self.udp_refused_loop,
            self.udp_refused_source,
            self.udp_refused_rate,
            self.udp_rate_evictions,
            self.limit_refused_conns,
            self.limit_refused_rate,
            self.limit_evictions,
        )

    def _arm_if_ready(self, now: float) -> None:
        if self._draining:  # _drain takes the queued connections itself
            if self._armed:
                self._disarm()
            return
        want = (
            self._accepting
            and len(self._conns) < self.max_connections
            and now >= self._paused_until
        )
        if want and not self._armed:
            for fd in self._listeners:
                self._epoll.register(fd, _LISTEN_EVENTS)
            self._armed = True
        elif not want and self._armed:
            self._disarm()

    def _rearm(self) -> None:
        """Re-add every armed socket: see "Fair accept" above."""
        armed = list(self._listeners) if self._armed else []
        for fd in armed + list(self._datagram_sockets):
            self._epoll.unregister(fd)
            self._epoll.register(fd, _LISTEN_EVENTS)

    def _disarm(self) -> None:
        if self._armed:
            for fd in self._listeners:
                self._epoll.unregister(fd)
            self._armed = False

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + self._sweep_interval
        if self.idle_timeout <= 0 and not self._tls_fds:
            return
        limit = now - self.idle_timeout
        for conn in list(self._conns.values()):
            if isinstance(conn.sock, ssl.SSLSocket) and not conn.tls_ready:
                if now >= conn.tls_deadline:
                    self._close(conn, end="tls-failed")  # no handshake in time
            elif self.idle_timeout > 0 and conn.last_active <= limit:
                self.idle_closed += 1
                self._close(conn, end="idle-timeout")

    # -- connections ------------------------------------------------------------------

    def _accept(self, fd: int, now: float) -> None:
        listener = self._listeners[fd]
        for _ in range(ACCEPT_BATCH):
            if len(self._conns) >= self.max_connections:
                break
            if self.max_accepts and self.accepted >= self.max_accepts:
                self.stop_accepting()  # recycled: serve what we have, then end
                self._recycled = True
                return
            if not self._accepting:  # a signal handler stopped us (and closed the listener)
                return
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, ConnectionAbortedError):
                break
            except OSError as exc:
                if not self._accepting:  # stopped between the check and the call
                    return
                if exc.errno not in _RESOURCE_ERRORS:
                    raise
                self.resource_errors += 1
                self._paused_until = now + EMFILE_PAUSE
                self._disarm()
                return
            self._open(sock, now, fd in self._proxy_fds, addr, fd in self._tls_fds)
        if self._armed:  # re-arm: to the back of the listener's wait queue
            self._epoll.unregister(fd)
            self._epoll.register(fd, _LISTEN_EVENTS)

    def _drain(self, now: float) -> None:
        """Take what is queued, as room allows; stop once the queues are empty."""
        empty = 0
        for fd, listener in self._listeners.items():
            while len(self._conns) < self.max_connections and self._drained < DRAIN_MAX:
                try:
                    sock, addr = listener.accept()
                except BlockingIOError:
                    empty += 1
                    break
                except ConnectionAbortedError:
                    continue
                except OSError:  # EMFILE and kin: try again at the next turn
                    break
                self._drained += 1
                self._open(sock, now, fd in self._proxy_fds, addr, fd in self._tls_fds)
        if empty == len(self._listeners) or self._drained >= DRAIN_MAX:
            self._draining = False
            self.stop_accepting()

    def _serve_datagrams(self, fd: int) -> None:
        """Answer a batch of datagrams, each to its own sender.

        At most ``DATAGRAM_BATCH`` receives: an error the socket reports
        once (ECONNREFUSED after an ICMP port unreachable, on a connected
        socket or one with IP_RECVERR) takes one of them and the batch reads
        on; EAGAIN ends it. A datagram cut short (longer than
        ``DATAGRAM_SIZE``: possible on a UNIX datagram socket only) is
        counted but never answered."""
        sock = self._datagram_sockets[fd]
        buffer = self._datagram_buffer
        for _ in range(DATAGRAM_BATCH):
            try:
                n, _, flags, sender = sock.recvmsg_into([buffer])
            except BlockingIOError:
                break
            except OSError:  # reported once: ECONNREFUSED after an ICMP error...
                continue
            self.datagrams += 1
            self.bytes_in += n
            refusal = datagram_refusal(sender, self._loop_ports, self._allow_low_ports)
            if refusal is not None:  # no reply: it could feed a loop or reflect
                if refusal == "loop":
                    self.udp_refused_loop += 1
                else:
                    self.udp_refused_source += 1
                self._refused_from[refusal] = format_client(sender)
                continue
            if self._rate_table is not None and self.service != "discard":
                if not self._admit(sender):
                    continue  # over the rate limit: no reply
            if flags & socket.MSG_TRUNC:
                continue  # never answer with a cut datagram
            if self.service == "echo":
                reply: Any = memoryview(buffer)[:n]
            elif self.service == "daytime":
                reply = daytime_line()
            elif self.service == "chargen":
                assert self._pattern is not None
                size = random.randrange(CHARGEN_DATAGRAM_MAX + 1)
                reply = self._pattern[: min(size, len(self._pattern))]
            else:
                continue  # discard
            try:
                self.bytes_out += sock.sendto(reply, sender)
            except OSError:  # full (EAGAIN) or refused: UDP may drop a reply
                pass
        if self._accepting:  # re-arm: to the back of the socket's wait queue
            self._epoll.unregister(fd)
            self._epoll.register(fd, _LISTEN_EVENTS)

    def _admit(self, sender: Any) -> bool:
        """The rate limit (``_fastio_common.rate_admit``): whether a reply
        may go to ``sender``'s prefix now; counts refusals and evictions."""
        assert self._rate_table is not None
        key = rate_key(sender, *self._rate_prefixes)
        if key is None:
            return True
        admitted, evicted = rate_admit(
            self._rate_table,
            key,
            time.monotonic_ns(),
            self._rate_interval,
            self._rate_tolerance,
            self._rate_lock_fd,
        )
        self.udp_rate_evictions += evicted
        if not admitted:
            self.udp_refused_rate += 1
            self._refused_from["rate"] = format_client(sender)
        return admitted

    def _open(
        self, sock: socket.socket, now: float, proxied: bool, addr: Any, secure: bool = False
    ) -> None:
        sock.setblocking(False)
        conn = _Conn(sock, now)
        conn.secure = secure
        self._conns[conn.fd] = conn
        self.accepted += 1
        if self._access_fd >= 0:  # the log's client: the address accept gave
            conn.client = format_client(addr)
        if proxied:
            peer = peer_name(sock)
            if self._proxy_trusted is not None and not self._proxy_trusted(peer):
                _log().warning("PROXY protocol: %s is not in --forwarded-allow-ips; closing", peer)
                self.proxy_rejected += 1
                self._close(conn, end="proxy-rejected")
                return
            conn.header = bytearray()  # the service starts once it is read
            self._update(conn)
            return
        if self._limits.enabled and not self._admit_client(conn, addr):
            return
        self._start(conn)

    def _admit_client(self, conn: _Conn, client: Any) -> bool:
        """The per-client limits (``_fastio_common.ClientLimits``) for a new
        connection from ``client``: False, with ``conn`` closed and counted,
        if it is over one."""
        refusal, key, evicted = self._limits.admit(client)
        self.limit_evictions += evicted
        if refusal is None:
            conn.held = key
            return True
        if refusal == "conns":
            self.limit_refused_conns += 1
        else:
            self.limit_refused_rate += 1
        assert key is not None  # a peer without a key is never refused
        self._limit_refused_from[refusal] = client_address(key)
        self._close(conn, end="limit-refused")
        return False

    def _start(self, conn: _Conn) -> None:
        """The service's first move on a new connection; on a TLS connection,
        the handshake's first, and the service's once it is done."""
        if conn.secure and not conn.tls_ready:
            self._begin_tls(conn)
            return
        if self.service == "daytime":
            conn.reading = False
            self._write(conn, memoryview(daytime_line()))
            self._close_when_flushed(conn)
        elif self.service == "protocol":
            conn.transport = Transport(self, conn)
            conn.protocol = self._call(conn, self._factory)
            if conn.protocol is not None:
                conn.buffered = isinstance(conn.protocol, asyncio.BufferedProtocol)
                self._call(conn, conn.protocol, conn.transport, method="connection_made")
        if conn.fd in self._conns:
            self._update(conn)

    def _update(self, conn: _Conn) -> None:
        """Make the epoll set wait for what ``conn`` needs now."""
        events = 0
        if conn.header is not None:
            events = _EPOLLIN
        elif conn.secure and not conn.tls_ready:  # the handshake waits on one side
            events = _EPOLLOUT if conn.tls_want_out else _EPOLLIN
        else:
            if conn.reading and not conn.pending and not conn.read_paused:
                events |= _EPOLLIN
            if conn.pending or (self.service == "chargen" and not conn.eof) or conn.tls_want_out:
                events |= _EPOLLOUT
        if not conn.registered:
            self._epoll.register(conn.fd, events)
            conn.registered = True
        elif conn.events != events:
            self._epoll.modify(conn.fd, events)
        conn.events = events

    def _close(self, conn: _Conn, exc: BaseException | None = None, end: str | None = None) -> None:
        """Close ``conn``; ``end`` says why for the access log (by default:
        an OSError is a reset, else the peer's end of file or the server's
        close)."""
        if conn is self._cork_conn:
            if self._corked:
                self._uncork(closing=True)  # what its protocol wrote before: asyncio had sent it
            self._cork_conn = None
        if conn.registered:
            self._epoll.unregister(conn.fd)
        del self._conns[conn.fd]
        if isinstance(conn.sock, ssl.SSLSocket) and conn.tls_ready:
            if end not in ("tls-failed", "reset") and not isinstance(exc, OSError):
                _send_close_notify(conn.sock)
        conn.sock.close()
        if conn.held is not None:
            self._limits.release(conn.held)
            conn.held = None
        if self._access_fd >= 0:
            if end is None:
                closed = "eof" if conn.peer_eof else "closed"
                end = "reset" if isinstance(exc, OSError) else closed
            self._log_access(conn, end)
        if conn.transport is not None:
            conn.transport._conn = None
            conn.transport._loop = None
        if conn.protocol is not None:
            protocol, conn.protocol = conn.protocol, None
            self._call(None, protocol, exc, method="connection_lost")

    def _close_when_flushed(self, conn: _Conn) -> None:
        conn.eof = True
        conn.reading = False
        if not conn.pending and conn.fd in self._conns:
            self._close(conn)

    def _call(self, conn: _Conn | None, func: Any, *args: Any, method: str | None = None) -> Any:
        """Call user code (``func``, or its ``method``); an exception, a
        missing method included, is logged and closes ``conn`` only."""
        try:
            if method is not None:
                func = getattr(func, method)
            return func(*args)
        except Exception as exc:
            self.handler_errors += 1
            if conn is not None and conn.fd in self._conns:
                client = conn.peer if conn.peer is not None else peer_name(conn.sock)
                _log().exception("handler failed; connection from %s closed", client)
                self._close(conn, exc, end="handler-error")
            else:
                _log().exception("handler failed")
            return None

    def _serve(self, conn: _Conn, mask: int, now: float) -> None:
        try:
            if conn.header is not None:  # nothing else before the header is whole
                self._read_header(conn, now)
            elif conn.secure and not conn.tls_ready:
                if self._handshakes >= TLS_HANDSHAKES_PER_TURN:
                    return  # the next turn: epoll reports it again
                self._handshakes += 1
                self._handshake(conn)
            else:
                self._serve_started(conn, mask, now)
        except OSError as exc:  # reset, broken pipe, a TLS error...: this connection only
            if conn.fd in self._conns:
                self._close(conn, exc, "tls-failed" if isinstance(exc, ssl.SSLError) else None)
        if conn.fd in self._conns and self._conns[conn.fd] is conn:
            self._update(conn)

    def _serve_started(self, conn: _Conn, mask: int, now: float) -> None:
        if conn.pending:
            self._flush(conn, now)
        elif self.service == "chargen" and mask & _EPOLLOUT:
            self._generate(conn, now)
        if conn.fd in self._conns and not conn.pending and (mask & ~_EPOLLOUT or conn.tls_want_out):
            if conn.reading:
                self._read(conn, now)
            else:  # error or hang-up on a connection no longer read
                self._close(conn)
        # Plaintext OpenSSL decrypted and holds: epoll cannot see it, so read
        # it now, while nothing is owed. Without read-ahead OpenSSL holds the
        # rest of one record at most, so this ends; it must not stop earlier,
        # or a small read size leaves plaintext nobody wakes for.
        while (
            isinstance(conn.sock, ssl.SSLSocket)
            and conn.fd in self._conns
            and conn.reading
            and not conn.pending
            and conn.sock.pending() > 0
        ):
            self._read(conn, now)

    # -- TLS: OpenSSL on the socket ---------------------------------------------------

    def _begin_tls(self, conn: _Conn) -> None:
        """Wrap the connection's socket (the same descriptor) and take the
        handshake's first step: the ClientHello may be there already."""
        # A TLS write is several records, written one by one: without
        # TCP_NODELAY the last short segment waits for the peer's delayed ACK.
        if conn.sock.family != socket.AF_UNIX:
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sock = self._tls_context.wrap_socket(
            conn.sock, server_side=True, do_handshake_on_connect=False
        )
        conn.tls_deadline = time.monotonic() + self._tls_timeout
        self._handshake(conn)

    def _handshake(self, conn: _Conn) -> None:
        """One step of the server's handshake; once done, the service starts.
        A bad or truncated handshake, a reset, the peer gone: tls-failed."""
        assert isinstance(conn.sock, ssl.SSLSocket)
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            conn.tls_want_out = False
        except ssl.SSLWantWriteError:
            conn.tls_want_out = True
        except OSError:
            self._close(conn, end="tls-failed")
        else:
            conn.tls_ready = True
            conn.tls_want_out = False
            conn.last_active = time.monotonic()
            self._start(conn)
            return
        if conn.fd in self._conns:
            self._update(conn)

    def _read_header(self, conn: _Conn, now: float) -> None:
        """Read towards a whole PROXY header; then start the service and hand
        it what came after the header."""
        assert conn.header is not None
        # Before TLS, not a byte past the header: the rest is OpenSSL's to read.
        size = proxy.exact_read_size(bytes(conn.header)) if conn.secure else len(self._buffer)
        try:
            n = conn.sock.recv_into(self._buffer, size)
        except BlockingIOError:
            return
        if n == 0:
            _log().debug("%s closed before its PROXY header", peer_name(conn.sock))
            conn.peer_eof = True
            self._close(conn)
            return
        conn.last_active = now
        conn.header += self._buffer[:n]
        try:
            header = proxy.parse(conn.header)
        except proxy.ProxyHeaderError as exc:
            _log().warning("PROXY header from %s: %s; closing", peer_name(conn.sock), exc)
            self.proxy_rejected += 1
            self._close(conn, end="proxy-rejected")
            return
        if header is None:
            return
        rest = len(conn.header) - header.length  # at most this read's n bytes
        self._buffer[:rest] = conn.header[header.length :]
        conn.header = None
        conn.peer = header.source
        if self._access_fd >= 0 and header.source is not None:
            conn.client = format_client(header.source)
        if self._limits.enabled:  # by the client the balancer names (LOCAL: itself)
            client = header.source if header.source is not None else peer_name(conn.sock)
            if not self._admit_client(conn, client):
                return
        self._start(conn)
        if rest and conn.fd in self._conns and conn.reading:
            self._received(conn, rest)

    def _read(self, conn: _Conn, now: float) -> None:
        if conn.buffered and not isinstance(conn.sock, ssl.SSLSocket):
            self._read_buffered(conn, now)
            return
        try:
            n = conn.sock.recv_into(self._buffer)
        except (BlockingIOError, ssl.SSLWantReadError):
            return
        except ssl.SSLWantWriteError:
            conn.tls_want_out = True
            return
        conn.tls_want_out = False
        if n == 0:
            self._end_of_file(conn)
            return
        conn.last_active = now
        self._received(conn, n)

    def _received(self, conn: _Conn, n: int) -> None:
        """Serve the ``n`` bytes at the start of the read buffer."""
        self.bytes_in += n
        conn.nin += n
        if self.service == "echo":
            self._write(conn, self._buffer[:n])
        elif self.service == "protocol":
            self._cork_conn = conn
            try:
                if conn.buffered:
                    self._give_buffered(conn, n)
                else:
                    self._call(conn, conn.protocol, bytes(self._buffer[:n]), method="data_received")
            finally:
                self._uncork()
                self._cork_conn = None
        # discard and chargen drop their input

    def _uncork(self, closing: bool = False) -> None:
        """Send what the protocol of ``_cork_conn`` wrote while it handled a
        read, in one call: ``send`` for one write, ``sendmsg`` for more (a
        protocol's socket is plaintext here: its TLS is asyncio's protocol
        over this transport). What the kernel does not take
        is owed, as from a write (and may pause the protocol); ``closing``:
        one try, the rest dropped, as asyncio's abort drops what is owed."""
        chunks, conn = self._corked, self._cork_conn
        if not chunks or conn is None:
            return
        self._corked, self._corked_len = [], 0
        if conn.fd not in self._conns:
            return
        try:
            if len(chunks) == 1:
                sent = _send_now(conn.sock, chunks[0])
            else:
                try:
                    sent = conn.sock.sendmsg(chunks)
                except BlockingIOError:
                    sent = 0
        except OSError as exc:
            if not closing:
                self._close(conn, exc)
            return
        if closing:
            return
        self.bytes_out += sent
        conn.nout += sent
        rest = b"".join(chunks)[sent:]
        if rest:
            self._keep(conn, memoryview(rest))
            transport = conn.transport
            if (
                conn.fd in self._conns
                and not conn.write_paused
                and transport is not None
                and len(conn.pending) > transport._high
            ):
                conn.write_paused = True
                self._flow_control(conn, "pause_writing")

    def _flow_control(self, conn: _Conn, method: str) -> None:
        """Tell the protocol ``pause_writing()`` or ``resume_writing()``, if it
        has them: a protocol without (not an asyncio.Protocol subclass) has
        opted out, and only --max-buffer bounds what it may owe."""
        callback = getattr(conn.protocol, method, None)
        if callback is not None:
            self._call(conn, callback)

    def _read_buffered(self, conn: _Conn, now: float) -> None:
        """A plaintext asyncio.BufferedProtocol: ``get_buffer(-1)``, as
        asyncio asks before each read, and the read lands in that buffer, then
        ``buffer_updated``. Once a read has filled the protocol's buffer, the
        next one goes on into the loop's buffer, up to the loop's read size in
        all (one call; reads bounded by the protocol's buffer made bulk
        transfers fall into a slow mode), and what went past the protocol's
        buffer is copied into the buffers it hands out next (``_give_buffered``).
        A read's error (a reset) is the connection's, as any read's."""
        got = self._call(conn, _protocol_buffer, conn.protocol)
        if got is None:  # it raised: the connection is closed
            return
        buffer, size = got
        try:
            if conn.read_wide and size < len(self._buffer):
                n = conn.sock.recvmsg_into([buffer, self._buffer[: len(self._buffer) - size]])[0]
            else:
                n = conn.sock.recv_into(buffer)
        except BlockingIOError:
            return
        if n == 0:
            self._end_of_file(conn)
            return
        conn.last_active = now
        self.bytes_in += n
        conn.nin += n
        direct = min(n, size)
        conn.read_wide = direct == size
        self._cork_conn = conn
        try:
            self._call(conn, conn.protocol, direct, method="buffer_updated")
            if n > direct and conn.fd in self._conns:
                self._give_buffered(conn, n - direct)  # it starts at the loop's buffer
        finally:
            self._uncork()
            self._cork_conn = None

    def _give_buffered(self, conn: _Conn, n: int) -> None:
        """An asyncio.BufferedProtocol, over TLS, after a PROXY header or
        past its buffer in a plaintext read: copy the ``n`` bytes at the
        start of the loop's buffer into the buffers it hands out, no bytes
        object per read (``_fill``)."""
        given = 0
        while given < n and conn.fd in self._conns:
            taken = self._call(conn, self._fill, conn.protocol, given, n - given)
            if taken is None:  # it raised: the connection is closed
                return
            given += taken

    def _fill(self, protocol: Any, start: int, count: int) -> int:
        """One get_buffer(count), filled from the read buffer at ``start``
        as far as it holds, then buffer_updated(taken); returns taken."""
        # Let go of the buffer before buffer_updated, as asyncio's recv_into
        # does: the protocol may resize its bytearray there.
        with memoryview(protocol.get_buffer(count)) as given, given.cast("B") as view:
            if not len(view):
                raise RuntimeError("get_buffer() returned an empty buffer")
            taken = min(len(view), count)
            view[:taken] = self._buffer[start : start + taken]
        protocol.buffer_updated(taken)
        return taken

    def _end_of_file(self, conn: _Conn) -> None:
        conn.reading = False
        conn.peer_eof = True
        if self.service == "chargen":
            return  # half-closed: the peer still reads the stream
        keep_open = False
        if self.service == "protocol":
            keep_open = bool(self._call(conn, conn.protocol, method="eof_received"))
        if not keep_open and conn.fd in self._conns:
            self._close_when_flushed(conn)  # flush what is owed, then close

    def _write(self, conn: _Conn, data: memoryview) -> None:
        """Send what the kernel takes now; keep the rest, up to max_buffer."""
        if self.service == "protocol":  # a protocol writing is activity (echo's read was)
            conn.last_active = time.monotonic()
        sent = 0
        if not conn.pending:
            try:
                sent = _send_now(conn.sock, data)
            except OSError as exc:
                self._close(conn, exc)
                return
            self.bytes_out += sent
            conn.nout += sent
        if sent < len(data):
            self._keep(conn, data[sent:])

    def _keep(self, conn: _Conn, data: memoryview) -> None:
        """Owe ``data`` to the peer, up to max_buffer, and wait for the
        socket to take it."""
        if len(conn.pending) + len(data) > self.max_buffer:
            _log().warning(
                "more than --max-buffer (%d bytes) owed to the peer; closing", self.max_buffer
            )
            self.max_buffer_closed += 1
            self._close(conn, BufferError("max_buffer exceeded"), end="max-buffer")
            return
        conn.pending += data
        if conn.registered:
            self._update(conn)

    def _flush(self, conn: _Conn, now: float) -> None:
        sent = _send_now(conn.sock, conn.pending)
        if not sent:
            return
        conn.last_active = now
        self.bytes_out += sent
        conn.nout += sent
        del conn.pending[:sent]
        if conn.write_paused and conn.transport is not None:
            if len(conn.pending) <= conn.transport._low:
                conn.write_paused = False
                self._flow_control(conn, "resume_writing")
                if conn.fd not in self._conns:
                    return
        if not conn.pending and conn.eof:
            self._close(conn)
        elif not conn.pending and conn.shut_when_flushed:
            conn.shut_when_flushed = False
            conn.sock.shutdown(socket.SHUT_WR)

    def _generate(self, conn: _Conn, now: float) -> None:
        assert self._pattern is not None
        sent = _send_now(conn.sock, self._pattern[conn.offset :])
        if not sent:
            return
        conn.last_active = now
        self.bytes_out += sent
        conn.nout += sent
        conn.offset = (conn.offset + sent) % len(self._pattern)

    # -- the access log -----------------------------------------------------------

    def _log_access(self, conn: _Conn, end: str) -> None:
        """Buffer ``conn``'s line; write the buffer first if the line does not
        fit, and drop the line if it still does not."""
        line = access_line(
            time.time_ns(),
            conn.client,
            self._pid,
            time.monotonic() - conn.started,
            conn.nin,
            conn.nout,
            end,
        )
        if len(self._access_buffer) + len(line) > ACCESS_LOG_BUFFER:
            self._flush_access_log()
            if len(self._access_buffer) + len(line) > ACCESS_LOG_BUFFER:
                self.access_log_dropped += 1
                return
        self._access_buffer += line

    def _flush_access_log(self) -> None:
        """Write what the log takes now, without waiting; keep the rest."""
        done = 0
        with memoryview(self._access_buffer) as view:
            while done < len(view):
                end = len(view)
                if self._access_pipe and end - done > ACCESS_PIPE_WRITE:
                    # the whole lines that fit (a line is far shorter)
                    end = self._access_buffer.rfind(b"\n", done, done + ACCESS_PIPE_WRITE) + 1
                try:
                    if self._access_sock is not None:
                        sent = self._access_sock.send(
                            view[done:end], socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
                        )
                    else:
                        sent = os.write(self._access_fd, view[done:end])
                except OSError:  # full (EAGAIN), gone (EPIPE), no space...: later
                    break
                if sent <= 0:
                    break
                done += sent
        del self._access_buffer[:done]


def _send_now(sock: socket.socket, data: Any) -> int:
    """Bytes the kernel takes now (0 if none). After a short send it tries
    again at once: the peer may have read meanwhile, and what it takes now
    need not wait a turn. An error after some bytes is left to the next send.
    On a TLS socket: plaintext bytes OpenSSL took; what it did not is offered
    again, from the same bytes (Python's ssl accepts a moving buffer)."""
    try:
        sent = sock.send(data)
    except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
        return 0
    if sent == 0 or sent == len(data):  # the usual case: one call
        return sent
    with memoryview(data) as view:
        while sent < len(view):
            try:
                sent += sock.send(view[sent:])
            except OSError:  # EAGAIN, or an error the next send reports
                break
    return sent


def _send_close_notify(sock: ssl.SSLSocket) -> None:
    """The server's close_notify, without waiting for the peer's: ``unwrap``
    on a non-blocking socket sends it, then finds the peer's not there."""
    try:
        sock.unwrap()
    except (OSError, ValueError):
        pass


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


# -- the -k asyncio worker's per-message path ---------------------------------------------
#
# A stock asyncio or uvloop loop calls the worker's protocol for every read,
# and the user's protocol calls the worker's transport for every write; both
# count bytes and mark the connection active. That is all the process model
# adds per message, so it is here, compiled: as Python it cost the worker
# 1.15x the standalone server's CPU per message, compiled 1.07x (0.98x with
# no wrapper at all).


class StreamCounts:
    """The bytes a ``-k asyncio`` worker's connections read and write (its
    scoreboard's ``bytes_in``/``bytes_out``); one per worker."""

    __slots__ = ("bytes_in", "bytes_out")

    def __init__(self) -> None:
        self.bytes_in = 0
        self.bytes_out = 0


class ConnectionCore:
    """What a ``-k asyncio`` connection (``prefork.server.workers.asyncio_worker.
    Connection``, a subclass) does per message: ``stream_received`` is the
    loop's ``data_received``, ``buffered_update`` its ``buffer_updated``, and
    ``counted_write`` the write the user's protocol calls. Each counts the
    bytes (``counts`` and ``nin``/``nout``), sets ``last_active`` (for
    --idle-timeout) and hands on to the user's protocol ``inner`` or the
    loop's ``transport``; an exception from the protocol goes to the
    subclass's ``fail(exc)``, which ends only this connection.

    Activity is a flag, ``active``, not a time: reading the clock twice per
    message cost more than the rest of the count. The worker's idle sweep
    turns a raised flag into ``last_active = now`` and lowers it, so a
    connection is closed no earlier than --idle-timeout after its last
    byte, and at most two sweep intervals later.

    ``closing`` too is a flag, not a call to the transport's ``is_closing()``
    per write (a Python call on asyncio's loop: 3% of its CPU per message):
    the subclass raises it when it closes or aborts the transport, when the
    peer's end of file closes it, and at ``connection_lost``. Writes the
    loop drops after a failed send, before ``connection_lost``, are counted,
    like bytes buffered when a connection dies: the counts are what the
    protocol handed to its open transport."""

    __slots__ = (
        "counts",
        "inner",
        "transport",
        "nin",
        "nout",
        "active",
        "last_active",
        "closing",
        "error",
    )

    def __init__(self, counts: StreamCounts, inner: Any) -> None:
        self.counts = counts
        self.inner = inner
        self.transport: Any = None  # the loop's, once connection_made
        self.nin = 0
        self.nout = 0
        self.active = False  # read or written since the idle sweep last looked
        self.last_active = time.monotonic()  # set by the idle sweep
        self.closing = False  # the transport is closing: writes are not counted
        self.error: BaseException | None = None  # what a handler raised

    def fail(self, exc: BaseException) -> None:
        raise NotImplementedError  # the subclass's: log, count, close

    def stream_received(self, data: bytes) -> None:
        n = len(data)
        self.counts.bytes_in += n
        self.nin += n
        self.active = True
        try:
            self.inner.data_received(data)
        except Exception as exc:
            self.fail(exc)

    def buffered_update(self, nbytes: int) -> None:
        if self.error is not None:
            return  # the buffer was a stand-in: the connection is closing
        self.counts.bytes_in += nbytes
        self.nin += nbytes
        self.active = True
        try:
            self.inner.buffer_updated(nbytes)
        except Exception as exc:
            self.fail(exc)


def counted_write(self: Any, data: Any) -> None:
    """``write`` of the transport a ``-k asyncio`` user's protocol gets
    (``self._conn`` is its ``ConnectionCore``): counted, then the loop's.
    Bytes for a transport known to be closing are not counted (the loop drops them)."""
    conn = self._conn
    transport = conn.transport
    n = len(data) if type(data) is bytes else memoryview(data).nbytes
    if n and not conn.closing:
        conn.counts.bytes_out += n
        conn.nout += n
        conn.active = True
    transport.write(data)


# -- the event worker's asyncio timers -----------------------------------------------------
#
# ``loop.call_later``/``call_at`` of the event worker's asyncio loop
# (``server/workers/event_asyncio.py``) keep their ``asyncio.TimerHandle``s
# here. A protocol that re-arms a timeout per message pushes one and cancels
# one per message: as a heap of TimerHandles every comparison was a Python
# ``__lt__`` call, and dropping the cancelled ones asked each for
# ``cancelled()``. The compiled twin keeps ``when`` beside each handle in C.


class TimerQueue:
    """The loop's timers, by ``when`` and then by the order they came in.

    ``push(handle)`` adds an ``asyncio.TimerHandle`` (marked ``_scheduled``);
    ``cancelled(handle)`` is the loop's ``_timer_handle_cancelled``, which
    ``TimerHandle.cancel()`` calls: it counts a scheduled one. Cancelled
    timers stay until they reach the top or until they are more than half
    of the queue (and more than ``COMPACT_AFTER``), when ``push`` drops them
    all. ``next_when()`` is when the first live timer is due (``inf``: none),
    ``pop_due(now, ready)`` appends the live timers due by ``now`` to
    ``ready`` in order, ``len()`` counts the queue, cancelled ones included,
    and ``clear()`` empties it.
    """

    COMPACT_AFTER = 50

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, asyncio.TimerHandle]] = []
        self._count = 0  # pushes so far: the tie-break, so equal whens keep their order
        self._cancelled = 0

    def __len__(self) -> int:
        return len(self._heap)

    @property
    def cancelled_count(self) -> int:
        return self._cancelled

    def push(self, handle: asyncio.TimerHandle) -> None:
        if self._cancelled > self.COMPACT_AFTER and self._cancelled > len(self._heap) // 2:
            self._compact()
        self._count += 1
        heapq.heappush(self._heap, (handle._when, self._count, handle))  # type: ignore[attr-defined]
        handle._scheduled = True  # type: ignore[attr-defined]  # as asyncio's loop does

    def cancelled(self, handle: asyncio.TimerHandle) -> None:
        if handle._scheduled:  # type: ignore[attr-defined]
            self._cancelled += 1

    def next_when(self) -> float:
        heap = self._heap
        while heap and heap[0][2]._cancelled:
            self._drop(heapq.heappop(heap)[2])
        return heap[0][0] if heap else float("inf")

    def pop_due(self, now: float, ready: Any) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            handle = heapq.heappop(heap)[2]
            if handle._cancelled:
                self._drop(handle)
                continue
            handle._scheduled = False  # type: ignore[attr-defined]
            ready.append(handle)

    def clear(self) -> None:
        for _, _, handle in self._heap:
            handle._scheduled = False  # type: ignore[attr-defined]
        self._heap = []
        self._cancelled = 0

    def _drop(self, handle: asyncio.TimerHandle) -> None:
        handle._scheduled = False  # type: ignore[attr-defined]
        self._cancelled -= 1

    def _compact(self) -> None:
        live = []
        for entry in self._heap:
            if entry[2]._cancelled:
                entry[2]._scheduled = False  # type: ignore[attr-defined]
            else:
                live.append(entry)
        heapq.heapify(live)
        self._heap = live
        self._cancelled = 0
