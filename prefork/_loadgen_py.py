"""The load generator's loop in pure Python: the specification of ``prefork._loadgen``.

``LoadGen`` drives a closed loop against an echo server: ``connections``
sockets, each with up to ``depth`` messages in flight, every echoed byte
checked against what was sent and every message's latency recorded in a
log-bucketed histogram. ``prefork bench`` (``prefork/tools/bench.py``) runs it in
short slices, for its progress line and so that Ctrl-C is seen at once.
The compiled twin makes the same syscalls in the same order, with the GIL
released for a whole slice; the test suite runs both against real servers.

Rules: this module imports nothing from ``prefork.server`` or
``prefork.tools``, and the compiled twin never imports it; what the two
share (constants, states, argument checks, the pattern and the histogram's
buckets) is defined once in ``prefork._loadgen_common``.

How it works. One epoll set (level-triggered) holds every socket; all of
them are non-blocking. Three modes:

- ``stream`` (TCP or a UNIX socket): each connection is opened once, then
  keeps ``depth`` messages of ``size`` bytes in flight: when a message's echo
  is complete another is queued. A connection's bytes form one stream, byte
  ``o`` of which is ``o % PERIOD``; ``PERIOD`` is prime, so consecutive
  messages differ and an echo of the wrong message is caught. Sending and
  checking both read one fixed pattern buffer (``PERIOD + CHUNK`` bytes):
  nothing is allocated per message. A connection that fails is not
  reopened; the run ends when none is left.
- ``connect``: each message on a fresh connection: connect, send, read the
  whole echo, close; latency runs from the connect to the last byte of the
  echo. This measures the server's accept path. A failed attempt is retried
  at the next turn of the loop.
- ``datagram`` (UDP): each socket keeps ``depth`` datagrams in flight, one
  per window position; a datagram starts with its position and a sequence
  number (``HEADER``), so a reply is matched whatever the order replies come
  in, then the pattern. A datagram not answered within ``timeout`` is
  counted lost and its position sends a new one; a reply that comes later
  is ignored (it is already counted).

Request and reply (``request`` and ``reply``, bytes; stream and connect
modes), for a server that answers rather than echoes: each message sends
``request`` (``size`` is its length) and is answered once ``len(reply)``
bytes came back, each equal to ``reply``'s. Sending and checking read the
two repeated into fixed buffers (``len + CHUNK`` bytes), as the pattern is.
A server may answer a message before all of it has arrived (a line
protocol answers each line); more than one reply per message begun is
``excess``.

TLS (``tls``, a client ``ssl.SSLContext``; stream and connect modes): once
connected, a connection makes its TLS handshake (the context verifies the
certificate and, when it checks host names, ``server_hostname``; a name
that is not an IP address is also sent as SNI), and only then counts as
opened and starts its messages: in ``connect`` mode every message costs a
full handshake (no session is resumed), and its latency runs from the
connect through the handshake to the last byte of the echo. Each
``WANT_READ``/``WANT_WRITE`` of the handshake, a read or a write becomes
epoll interest; decrypted bytes OpenSSL still holds (``pending()``) are
read before waiting, as epoll cannot see them; a write that OpenSSL asked
to repeat is repeated with the same length. A connection that ends after
its echo sends ``close_notify`` before closing.

A message is answered when its whole echo is back; it is a success
(``messages``, its latency recorded) if every byte matched, else a failure
(``failed``). Errors are counted by kind (``ERROR_KINDS``):

- ``connect``: a connection could not be made (refused, timed out after
  ``timeout``, no descriptors left), or for UDP the kernel reported that
  nothing listens (ICMP port unreachable);
- ``reset``: an open connection failed (ECONNRESET, EPIPE, ...);
- ``closed``: the server closed while echoes were owed (a short echo);
- ``mismatch``: an echo differed from what was sent (counted once a message);
  for UDP also a reply of the wrong size or to a datagram never sent;
- ``excess``: more came back than was sent (for UDP: a second reply);
- ``timeout``: a stream message not answered within ``timeout`` (the
  connection is closed);
- ``lost``: a datagram not answered within ``timeout``;
- ``tls``: the TLS handshake failed (refused, a certificate that does not
  verify, the connection lost during it) or did not end within
  ``timeout``, or a TLS record was bad.

Messages still in flight when a connection fails count as failed. With a
``limit``, no message starts once answered + failed + in-flight messages
reach it, so exactly ``limit`` are accounted for at the end.

Latencies are in nanoseconds. The histogram has ``BUCKETS`` buckets: exact
below ``2**SUB_BITS`` ns, then ``2**SUB_BITS`` buckets per power of two (a
bucket is at most 1/32 = 3% wide); ``bucket_index`` maps a latency to its
bucket and ``bucket_high`` (in ``prefork._loadgen_common``) gives the
largest latency a bucket holds.
"""

from __future__ import annotations

import errno
import select
import socket
import ssl
import time
from typing import Any

from prefork._loadgen_common import (
    ANSWERED,
    BUCKETS,
    CHUNK,
    CONNECTING,
    DATAGRAM_BATCH,
    DEAD,
    EMPTY,
    ERROR_KINDS,
    HANDSHAKING,
    HEADER,
    IDLE,
    LOST,
    MAX_BITS,
    MAX_EVENTS,
    OPEN,
    PERIOD,
    SUB_BITS,
    SWEEP_INTERVAL_NS,
    WAITING,
    check_args,
    check_exchange,
    check_tls_args,
    make_pattern,
    repeated,
    sockaddr_bytes,
)

__all__ = ["LoadGen", "bucket_index"]

_ERROR = {kind: i for i, kind in enumerate(ERROR_KINDS)}
_IN = select.EPOLLIN
_OUT = select.EPOLLOUT


def bucket_index(ns: int) -> int:
    """The histogram bucket of a latency of ``ns`` nanoseconds (>= 0)."""
    if ns < 0:
        raise ValueError("a latency cannot be negative")
    if ns < 1 << SUB_BITS:
        return ns
    shift = ns.bit_length() - SUB_BITS - 1
    if shift > MAX_BITS - SUB_BITS - 1:
        return BUCKETS - 1
    return ((shift + 1) << SUB_BITS) + (ns >> shift) - (1 << SUB_BITS)


class _Slot:
    """One connection (or UDP socket) and the messages it has in flight.

    Stream counters are byte offsets in the connection's stream: ``queued``
    bytes belong to started messages, ``out`` have been sent, ``inp`` echoed.
    ``starts[m % depth]`` is when message ``m`` started (ns); ``started`` and
    ``done`` count messages. Datagram positions use ``starts``, ``seqs`` and
    ``waits`` by position instead.
    """

    __slots__ = (
        "sock",
        "state",
        "since",
        "out",
        "queued",
        "inp",
        "started",
        "done",
        "bad",
        "writing",
        "starts",
        "seqs",
        "waits",
        "retry",
        "read_wants_out",
    )

    def __init__(self, depth: int) -> None:
        self.sock: socket.socket | None = None
        self.state = IDLE
        self.since = 0  # when the connect began
        self.out = self.queued = self.inp = 0
        self.started = self.done = 0
        self.bad = False  # the message being echoed has a wrong byte
        self.writing = False  # EPOLLOUT is in the set
        self.starts = [0] * depth
        self.seqs = [0] * depth
        self.waits = [EMPTY] * depth
        self.retry = 0  # TLS: the length of a write OpenSSL asked to repeat
        self.read_wants_out = False  # TLS: a read waits for the socket to be writable


class LoadGen:
    """A closed-loop load generator against the echo server at ``address``.

    ``family`` and ``address`` are as ``socket.getaddrinfo`` returns them
    (``AF_UNIX`` and a path for a UNIX socket); the address is used as it is,
    never resolved (a host name is a ValueError). ``mode`` is ``stream``,
    ``connect`` or ``datagram`` (see the module's docstring). ``timeout``
    bounds a connect and the wait for an echo, in seconds. Nothing is opened
    before the first ``run``.

    Counters, read at any time, cover the time since the last ``reset``:
    ``messages`` (answered, every byte right), ``failed``, ``bytes_sent``,
    ``bytes_received``, ``connections_opened``, ``errors`` (a dict by kind),
    ``histogram()`` and ``latency_min``/``latency_max``/``latency_total`` in
    ns (``latency_min`` is 0 before the first message). ``in_flight`` and
    ``live`` (sockets open or opening) are the current state.

    ``tls`` (a client ``ssl.SSLContext``) runs every connection over TLS,
    verified against ``server_hostname`` when the context checks host
    names (see the module's docstring). ``request`` and ``reply`` (bytes,
    both or neither) make every message that request, answered by that
    reply instead of by its echo; ``size`` is then the request's length.
    """

    def __init__(
        self,
        family: int,
        address: Any,
        mode: str = "stream",
        *,
        connections: int = 50,
        size: int = 1024,
        depth: int = 1,
        timeout: float = 2.0,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        request: bytes | None = None,
        reply: bytes | None = None,
    ) -> None:
        exchange = check_exchange(mode, request, reply)
        if exchange is not None:
            size = len(exchange[0])
        check_args(family, mode, connections, size, depth, timeout)
        check_tls_args(mode, tls, server_hostname)
        sockaddr_bytes(family, address)  # the same ValueError as the compiled twin
        self.tls = tls
        self.server_hostname = server_hostname
        self.family = family
        self.address = address
        self.mode = mode
        self.connections = connections
        self.size = size
        self.depth = depth
        self.timeout = float(timeout)
        self._timeout_ns = int(self.timeout * 1e9)
        self._type = socket.SOCK_DGRAM if mode == "datagram" else socket.SOCK_STREAM
        self.request = self.reply = None
        if exchange is None:  # an echo: the reply is what was sent
            self._period = self._reply_period = PERIOD
            self._reply_size = size
            self._pattern = self._expected = memoryview(make_pattern(PERIOD + CHUNK))
        else:
            self.request, self.reply = exchange
            self._period, self._reply_size = len(self.request), len(self.reply)
            self._reply_period = self._reply_size
            self._pattern = memoryview(repeated(self.request, self._period + CHUNK))
            self._expected = memoryview(repeated(self.reply, self._reply_size + CHUNK))
        self._buffer = memoryview(bytearray(CHUNK))
        self._datagram = bytearray(self._pattern[: size if mode == "datagram" else 0])
        self._slots = [_Slot(depth) for _ in range(connections)]
        self._by_fd: dict[int, _Slot] = {}
        self._epoll: Any = select.epoll()
        self._started = False
        self._idle = 0  # slots in IDLE waiting for the next turn
        self._next_sweep = 0
        self.in_flight = 0
        self.live = 0
        self.reset()

    # -- counters -------------------------------------------------------------------

    def reset(self) -> None:
        """Zero the counters and the histogram (after a warm-up); connections
        and messages in flight carry on."""
        self.messages = self.failed = 0
        self.bytes_sent = self.bytes_received = 0
        self.connections_opened = 0
        self.latency_min = self.latency_max = self.latency_total = 0
        self._errors = [0] * len(ERROR_KINDS)
        self._histogram = [0] * BUCKETS

    @property
    def errors(self) -> dict[str, int]:
        return dict(zip(ERROR_KINDS, self._errors, strict=True))

    def histogram(self) -> list[int]:
        """The count of messages per latency bucket (see ``bucket_index``)."""
        return list(self._histogram)

    def _record(self, ns: int) -> None:
        ns = max(ns, 0)
        self._histogram[bucket_index(ns)] += 1
        self.latency_total += ns
        if self.messages == 1 or ns < self.latency_min:
            self.latency_min = ns
        self.latency_max = max(self.latency_max, ns)

    def _error(self, kind: str) -> None:
        self._errors[_ERROR[kind]] += 1

    # -- the loop -------------------------------------------------------------------

    def run(self, seconds: float, limit: int = 0) -> bool:
        """Run for up to ``seconds``; True once the run is over: ``limit``
        messages (0 = no limit) since the last ``reset`` are answered or
        failed and none is in flight, or every connection has failed."""
        if self._epoll.closed:
            raise ValueError("load generator is closed")
        if not 0 <= seconds < float("inf") or limit < 0:
            raise ValueError("seconds and limit must not be negative")
        deadline = time.monotonic_ns() + int(seconds * 1e9)
        if not self._started:
            self._started = True
            now = time.monotonic_ns()
            self._next_sweep = now + SWEEP_INTERVAL_NS
            for slot in self._slots:
                if self.mode != "connect":
                    self._open(slot, now, limit)
                elif self._may_start(limit):
                    self._restart(slot, now, limit)
                else:
                    self._idle += 1
        while True:
            now = time.monotonic_ns()
            if self._idle:
                self._restart_idle(now, limit)
            if now >= self._next_sweep:
                self._sweep(now, limit)
                self._next_sweep = now + SWEEP_INTERVAL_NS
            if self._finished(limit):
                return True
            if now >= deadline:
                return False
            wait_ms = -(-(min(deadline, self._next_sweep) - now) // 1_000_000)
            events = self._epoll.poll(wait_ms / 1000, MAX_EVENTS)
            for fd, mask in events:
                self._serve(self._by_fd[fd], mask, time.monotonic_ns(), limit)

    def close(self) -> None:
        """Close every socket and the epoll set."""
        for slot in self._slots:
            if slot.sock is not None:
                self._close(slot, polite=True)
        self._epoll.close()

    def _finished(self, limit: int) -> bool:
        if self.in_flight:
            return False
        if limit and self.messages + self.failed >= limit:
            return True
        return self.live == 0 and self._idle == 0

    def _may_start(self, limit: int) -> bool:
        return not limit or self.messages + self.failed + self.in_flight < limit

    # -- opening and closing ----------------------------------------------------------

    def _open(self, slot: _Slot, now: int, limit: int) -> None:
        """Start connecting ``slot``: CONNECTING, OPEN, or failed."""
        slot.since = now
        try:
            sock = socket.socket(self.family, self._type | socket.SOCK_NONBLOCK)
        except OSError:
            self._error("connect")
            self._lose(slot)
            return
        if self.family != socket.AF_UNIX and self._type == socket.SOCK_STREAM:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        slot.sock = sock
        self._by_fd[sock.fileno()] = slot
        self.live += 1
        err = sock.connect_ex(self.address)
        if err in (errno.EINPROGRESS, errno.EINTR):
            slot.state = CONNECTING
            self._epoll.register(sock.fileno(), _OUT)
            slot.writing = True
        elif err:
            self._fail(slot, "connect")
        else:
            self._epoll.register(sock.fileno(), _IN)
            slot.writing = False
            self._established(slot, now, limit)

    def _established(self, slot: _Slot, now: int, limit: int) -> None:
        """The connect succeeded: the TLS handshake begins, or the messages."""
        if self.tls is None:
            self._connected(slot, now, limit)
            return
        assert slot.sock is not None
        slot.state = HANDSHAKING
        slot.retry = 0
        slot.read_wants_out = False
        # Python sends SNI for a name, never for an IP address (the compiled twin follows).
        try:
            slot.sock = self.tls.wrap_socket(
                slot.sock, server_hostname=self.server_hostname, do_handshake_on_connect=False
            )
        except (OSError, ValueError):
            self._fail(slot, "tls")
            return
        self._handshake(slot, now, limit)

    def _handshake(self, slot: _Slot, now: int, limit: int) -> None:
        """One step of the TLS handshake; once done, the connection is open."""
        assert isinstance(slot.sock, ssl.SSLSocket)
        try:
            slot.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._want(slot, False)
        except ssl.SSLWantWriteError:
            self._want(slot, True)
        except OSError:  # refused, not verified, reset, closed: ssl.SSLError is one
            self._fail(slot, "tls")
        else:
            self._want(slot, False)
            self._connected(slot, now, limit)

    def _want(self, slot: _Slot, writing: bool) -> None:
        """EPOLLOUT in the slot's interest or not (EPOLLIN always)."""
        assert slot.sock is not None
        if writing != slot.writing:
            self._epoll.modify(slot.sock.fileno(), _IN | _OUT if writing else _IN)
            slot.writing = writing

    def _connected(self, slot: _Slot, now: int, limit: int) -> None:
        slot.state = OPEN
        self.connections_opened += 1
        if self.mode == "datagram":
            for position in range(self.depth):
                if self._may_start(limit):
                    self._send_datagram(slot, position, now)
            return
        if self.mode == "stream":
            for _ in range(self.depth):
                if self._may_start(limit):
                    self._start_message(slot, now)
        self._flush(slot)

    def _restart(self, slot: _Slot, now: int, limit: int) -> None:
        """``connect`` mode: the next message, on a new connection."""
        slot.out = slot.queued = slot.inp = slot.started = slot.done = 0
        slot.bad = False
        self._start_message(slot, now)
        self._open(slot, now, limit)

    def _restart_idle(self, now: int, limit: int) -> None:
        """Reopen the slots a failure left closed (``connect`` mode), one
        turn later, so that a refused server is not retried in a tight loop."""
        for slot in self._slots:
            if slot.state == IDLE and self._may_start(limit):
                self._idle -= 1
                self._restart(slot, now, limit)

    def _close(self, slot: _Slot, polite: bool = False) -> None:
        """Close the slot's socket; ``polite``: an open TLS connection
        sends its close_notify first (without waiting for the server's)."""
        assert slot.sock is not None
        del self._by_fd[slot.sock.fileno()]
        if polite and slot.state == OPEN and isinstance(slot.sock, ssl.SSLSocket):
            try:
                slot.sock.unwrap()  # sends close_notify, then finds no reply yet
            except (OSError, ValueError):
                pass
        slot.sock.close()  # leaves the epoll set with it
        slot.sock = None
        self.live -= 1

    def _lose(self, slot: _Slot) -> None:
        """The slot's messages in flight have failed; the slot is done for now."""
        if self.mode == "datagram":
            owed = sum(1 for w in slot.waits if w == WAITING)
        else:
            owed = slot.started - slot.done
        self.failed += owed
        self.in_flight -= owed
        slot.started = slot.done
        if self.mode == "connect":
            slot.state = IDLE
            self._idle += 1
        else:
            slot.state = DEAD

    def _fail(self, slot: _Slot, kind: str | None) -> None:
        """Close ``slot`` after an error of ``kind`` (None: a quiet close)."""
        if kind is not None:
            self._error(kind)
        self._close(slot)
        self._lose(slot)

    def _sweep(self, now: int, limit: int) -> None:
        """Timeouts: connects, stream echoes, datagram replies; and datagram
        positions left empty by a failed send get a new datagram."""
        expired = now - self._timeout_ns
        for slot in self._slots:
            if slot.state in (CONNECTING, HANDSHAKING) and slot.since < expired:
                self._fail(slot, "connect" if slot.state == CONNECTING else "tls")
            elif slot.state != OPEN:
                continue
            elif self.mode == "datagram":
                for position in range(self.depth):
                    wait = slot.waits[position]
                    if wait == WAITING and slot.starts[position] < expired:
                        slot.waits[position] = LOST
                        self.in_flight -= 1
                        self.failed += 1
                        self._error("lost")
                        wait = LOST
                    if wait != WAITING and self._may_start(limit):
                        self._send_datagram(slot, position, now)
            elif slot.started > slot.done and slot.starts[slot.done % self.depth] < expired:
                self._fail(slot, "timeout")

    # -- streams ------------------------------------------------------------------------

    def _serve(self, slot: _Slot, mask: int, now: int, limit: int) -> None:
        assert slot.sock is not None
        if slot.state == CONNECTING:
            err = slot.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._fail(slot, "connect")
                return
            self._epoll.modify(slot.sock.fileno(), _IN)
            slot.writing = False
            self._established(slot, now, limit)
        elif slot.state == HANDSHAKING:
            self._handshake(slot, now, limit)
        elif self.mode == "datagram":
            self._receive_datagrams(slot, limit)
        elif self.tls is not None:  # a read or a write may wait for either event
            self._receive_tls(slot, now, limit)
        elif mask & _OUT and not mask & _IN:
            self._flush(slot)
        else:  # readable, or an error or hang-up that recv reports
            self._receive(slot, now, limit)

    def _start_message(self, slot: _Slot, now: int) -> None:
        slot.starts[slot.started % self.depth] = now
        slot.started += 1
        slot.queued += self.size
        self.in_flight += 1

    def _flush(self, slot: _Slot) -> None:
        """Send what is queued until the kernel takes no more; EPOLLOUT while
        something is left."""
        assert slot.sock is not None
        if self.tls is not None:
            self._flush_tls(slot)
            return
        while slot.out < slot.queued:
            offset = slot.out % self._period
            length = min(slot.queued - slot.out, CHUNK)
            try:
                sent = slot.sock.send(self._pattern[offset : offset + length], socket.MSG_NOSIGNAL)
            except BlockingIOError:
                break
            except OSError:
                self._fail(slot, "reset")
                return
            slot.out += sent
            self.bytes_sent += sent
        self._want(slot, slot.out < slot.queued)

    def _flush_tls(self, slot: _Slot) -> None:
        """``_flush`` over TLS: EPOLLOUT only while OpenSSL waits to write
        (a write waiting to read is retried after the next read)."""
        assert isinstance(slot.sock, ssl.SSLSocket)
        blocked = False
        while slot.out < slot.queued:
            offset = slot.out % self._period
            length = slot.retry or min(slot.queued - slot.out, CHUNK)
            try:
                sent = slot.sock.send(self._pattern[offset : offset + length])
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError) as exc:
                slot.retry = length  # OpenSSL wants the same write again
                blocked = isinstance(exc, ssl.SSLWantWriteError)
                break
            except ssl.SSLError as exc:
                self._fail(slot, _tls_failure(exc))
                return
            except OSError:
                self._fail(slot, "reset")
                return
            slot.retry = 0
            slot.out += sent
            self.bytes_sent += sent
        self._want(slot, blocked or slot.read_wants_out)

    def _receive(self, slot: _Slot, now: int, limit: int) -> None:
        """One recv: check the bytes, answer the messages it completes, queue
        the next ones and send them."""
        assert slot.sock is not None
        try:
            n = slot.sock.recv_into(self._buffer, CHUNK)
        except BlockingIOError:
            return
        except OSError:
            self._fail(slot, "reset")
            return
        if self._consume(slot, n, now, limit):
            self._flush(slot)

    def _receive_tls(self, slot: _Slot, now: int, limit: int) -> None:
        """``_receive`` over TLS: read until OpenSSL holds no decrypted byte
        (epoll cannot see those), then send."""
        assert isinstance(slot.sock, ssl.SSLSocket)
        slot.read_wants_out = False
        while True:
            try:
                n = slot.sock.recv_into(self._buffer, CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLWantWriteError:
                slot.read_wants_out = True
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                n = 0  # close_notify, or an end without it
            except ssl.SSLError as exc:
                self._fail(slot, _tls_failure(exc))
                return
            except OSError:
                self._fail(slot, "reset")
                return
            if not self._consume(slot, n, now, limit):
                return
            if not slot.sock.pending():
                break
        self._flush(slot)

    def _consume(self, slot: _Slot, n: int, now: int, limit: int) -> bool:
        """Check ``n`` received bytes and answer the messages they complete;
        False when the slot was closed (or, in ``connect`` mode, begun anew)."""
        if n == 0:
            self._fail(slot, "closed" if slot.started > slot.done else None)
            return False
        self.bytes_received += n
        # An echo owes what was sent; a server with replies, one per message begun.
        owed = slot.out if self.request is None else slot.started * self._reply_size
        if slot.inp + n > owed:
            self._fail(slot, "excess")
            return False
        size = self._reply_size
        position = 0
        while position < n:
            take = min(n - position, size - slot.inp % size)
            offset = slot.inp % self._reply_period
            if (
                not slot.bad
                and self._buffer[position : position + take]
                != self._expected[offset : offset + take]
            ):
                slot.bad = True
                self._error("mismatch")
            position += take
            slot.inp += take
            if slot.inp % size == 0:
                self._answered(slot, now, limit)
                if self.mode == "connect":  # closed, and maybe a new connection begun
                    return False
        return True

    def _answered(self, slot: _Slot, now: int, limit: int) -> None:
        """Message ``slot.done`` is fully echoed."""
        start = slot.starts[slot.done % self.depth]
        slot.done += 1
        self.in_flight -= 1
        if slot.bad:
            slot.bad = False
            self.failed += 1
        else:
            self.messages += 1
            self._record(now - start)
        if self.mode == "connect":
            self._close(slot, polite=True)
            if self._may_start(limit):
                self._restart(slot, now, limit)
            else:
                slot.state = IDLE
                self._idle += 1
        elif self._may_start(limit):
            self._start_message(slot, now)

    # -- datagrams ------------------------------------------------------------------

    def _send_datagram(self, slot: _Slot, position: int, now: int) -> None:
        assert slot.sock is not None
        seq = (slot.seqs[position] + 1) & 0xFFFFFFFF
        slot.seqs[position] = seq
        HEADER.pack_into(self._datagram, 0, position, seq)
        slot.starts[position] = now
        slot.waits[position] = WAITING
        self.in_flight += 1
        try:
            sent = slot.sock.send(self._datagram)
        except BlockingIOError:
            return  # dropped here rather than on the way: it will count as lost
        except OSError:
            slot.waits[position] = EMPTY  # the next sweep sends another
            self.in_flight -= 1
            self.failed += 1
            self._error("connect")
            return
        self.bytes_sent += sent

    def _receive_datagrams(self, slot: _Slot, limit: int) -> None:
        assert slot.sock is not None
        for _ in range(DATAGRAM_BATCH):
            try:
                n = slot.sock.recv_into(self._buffer)
            except BlockingIOError:
                return
            except OSError:  # ECONNREFUSED: an ICMP error for an earlier datagram
                self._error("connect")
                continue
            self.bytes_received += n
            # A fresh time for each: a reply to a datagram sent in this batch can be in it.
            self._check_reply(slot, n, time.monotonic_ns(), limit)

    def _check_reply(self, slot: _Slot, n: int, now: int, limit: int) -> None:
        if n < HEADER.size:
            self._error("mismatch")
            return
        position, seq = HEADER.unpack_from(self._buffer)
        if position >= self.depth:
            self._error("mismatch")
            return
        behind = (slot.seqs[position] - seq) & 0xFFFFFFFF
        if behind >= 1 << 31:  # a sequence number not sent yet
            self._error("mismatch")
        elif behind or slot.waits[position] == LOST:
            pass  # a late reply, already counted lost (or a copy of one)
        elif slot.waits[position] == ANSWERED:
            self._error("excess")
        elif slot.waits[position] == EMPTY:  # its send failed: it never left
            self._error("mismatch")
        else:
            slot.waits[position] = ANSWERED
            self.in_flight -= 1
            size = self.size
            if n == size and self._buffer[HEADER.size : n] == self._pattern[HEADER.size : size]:
                self.messages += 1
                self._record(now - slot.starts[position])
            else:
                self.failed += 1
                self._error("mismatch")
            if self._may_start(limit):
                self._send_datagram(slot, position, now)


def _tls_failure(exc: ssl.SSLError) -> str:
    """The error kind of a failed TLS read or write: ``tls`` for a bad
    record (OpenSSL's SSL_ERROR_SSL), ``reset`` for a lost connection."""
    lost = (ssl.SSLZeroReturnError, ssl.SSLEOFError, ssl.SSLSyscallError)
    return "reset" if isinstance(exc, lost) else "tls"
