"""Short sends: the peer stalls, the socket buffers are small, and the hot
loop's sends come up short; for the compiled loop and its twin.

A peer that reads as fast as the server writes never makes a send come up
short, and then a loop that restarts chargen's pattern, drops the rest of a
write or forgets to count it passes every test. Here the socket buffers are
a few KiB on both ends (``stalls``) and the peer stalls as a rule: it reads
nothing, a byte, or a few KiB at a time, so the writer keeps running into a
full send queue. Every test checks three things:

- what the peer reads is what it should (echo: the same bytes in order;
  chargen: the pattern, carried on from where a short send stopped; the
  protocol and PROXY cases likewise), and the end of file comes after it;
- every counter equals what the peer saw: the return value of a blocking
  call, and for the event loop ``accepted``, ``active``, ``bytes_in`` and
  ``bytes_out`` as its scoreboard slot shows them (and as its attributes do);
  while the peer stalls, what the loop counts as sent is what the peer has
  read plus what the kernel still holds;
- short sends did happen, counted, so the test fails if its set-up stops
  producing them. A blocking call's short sends are made by a signal
  interrupting a send that has queued some bytes (``stalls.BlockedWriter``
  reads where the writer sleeps before and after: the same buffer moved on
  is a short send). The event loop never blocks: there a stall in which the
  loop still owes bytes, its socket taking none (``Served.settle`` runs the
  loop until ``writable`` is false), means its last send came up short or
  took nothing; for chargen, a count sent
  that is not a whole number of patterns means the last send stopped inside
  the pattern. Datagram replies go to a UNIX datagram peer that stops
  reading: its queue fills, the reply's send fails with EAGAIN, and the reply
  is dropped, uncounted.

The event loops run a slice at a time in the test's own thread, so nothing
moves while the test looks. Each test runs once per implementation; the
second run of a pair also compares what the two observed (``agree``: the
bytes, the results and the final counters; how many sends came up short
depends on timing and is not compared). UDP over loopback cannot fill a
sender's buffer (the kernel releases each datagram as it delivers it), hence
the UNIX datagram peer.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import random
import socket
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from prefork.server.handlers import chargen_pattern
from prefork.server.scoreboard import Scoreboard, WorkerStats

import stalls
from stalls import BlockedWriter, read_available, server_end, unread, writable

pytestmark = pytest.mark.timeout(120)

PATTERN = chargen_pattern(1)  # 7030 bytes: more than the small buffers hold
READS = (0, 0, 1, 700, 4096, 65536)  # what the peer reads in one go; 0 is a stall
MIN_SHORT = 3  # short sends each test must see; it sees dozens
MAX_ROUNDS = 20_000
SETTLE_SLICES = 10_000
SLICE = 0.002  # seconds per EventLoop.run while the test is the only peer


def randbytes(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def cycle_of(pattern: bytes, size: int) -> bytes:
    return (pattern * (size // len(pattern) + 1))[:size]


def chargen_at(offset: int, size: int) -> bytes:
    """``size`` bytes of the chargen stream from ``offset``."""
    start = offset % len(PATTERN)
    return cycle_of(PATTERN[start:] + PATTERN[:start], size)


def keep(received: bytearray, data: bytes, stream: Callable[[int, int], bytes] | bytes) -> None:
    """Add ``data`` to ``received``, failing at once (not rounds later) if it
    is not what comes next in ``stream`` (bytes, or a function of offset
    and size)."""
    at = len(received)
    want = stream[at : at + len(data)] if isinstance(stream, bytes) else stream(at, len(data))
    assert data == want, f"the peer read wrong bytes at offset {at}"
    received += data


def feed(sock: socket.socket, data: bytes, pos: int, limit: int | None = None) -> int:
    """Send from ``data[pos:]`` what a non-blocking ``sock`` takes now (at
    most ``limit`` bytes); return the new position."""
    end = len(data) if limit is None else min(len(data), pos + limit)
    for _ in range(MAX_ROUNDS):
        if pos >= end:
            break
        try:
            pos += sock.send(data[pos:end])
        except BlockingIOError:
            break
    return pos


@pytest.fixture(scope="module")
def observed() -> dict[str, dict[str, Any]]:
    return {}


@pytest.fixture
def agree(request: pytest.FixtureRequest, observed: dict[str, dict[str, Any]], impl) -> Callable:
    """``agree(observation)``: record what this implementation observed;
    once both have run the same test, they must have observed the same."""
    test = request.node.originalname + str(
        {k: v for k, v in request.node.callspec.params.items() if k != "impl"}
    )

    def record(observation: Any) -> None:
        seen = observed.setdefault(test, {})
        seen[impl.__name__] = observation
        if len(seen) == 2:
            compiled, twin = seen.values()
            assert compiled == twin, f"the implementations disagree: {seen}"

    return record


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- blocking calls ---------------------------------------------------------------------

PAIRS = {"unix": stalls.unix_pair, "tcp": stalls.tcp_pair}


def held_by_kernel(client: socket.socket, server: Any) -> int:
    """Bytes the server's side has sent that ``client`` has not read: in the
    client's receive queue, or (TCP) not yet transmitted. For TCP, first wait
    until everything transmitted has been acknowledged, so that no byte is in
    both queues (or in neither, lost and to be sent again)."""
    if client.family == socket.AF_UNIX:
        return unread(client)
    deadline = time.monotonic() + stalls.PATIENCE
    while stalls.queued(server) != stalls.unsent(server) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert stalls.queued(server) == stalls.unsent(server), "unacknowledged bytes never settled"
    return unread(client) + stalls.unsent(server)


@pytest.mark.parametrize("transport", PAIRS)
def test_blocking_echo_through_short_sends(impl, agree, transport):
    payload = randbytes(1, 256 * 1024)
    rng = random.Random(11)
    received = bytearray()
    client, server = PAIRS[transport]()
    with client, server, stalls.interrupt_handler():
        client.setblocking(False)
        writer = BlockedWriter(impl.echo, server, bytearray(65536))
        pos, shut, eof = 0, False, False
        for _ in range(MAX_ROUNDS):
            pos = feed(client, payload, pos)
            if pos == len(payload) and not shut:
                client.shutdown(socket.SHUT_WR)
                shut = True
            writer.interrupt()
            data, eof = read_available(client, rng.choice(READS))
            keep(received, data, payload)
            if eof:
                break
        result = writer.join()
    assert eof and bytes(received) == payload
    assert result == (len(payload), len(payload))
    assert writer.interrupts.short >= MIN_SHORT, writer.interrupts
    agree((digest(received), result))


@pytest.mark.parametrize("transport", PAIRS)
def test_blocking_chargen_carries_on_after_short_sends(impl, transport):
    target = 40 * len(PATTERN)
    rng = random.Random(12)
    received = bytearray()
    client, server = PAIRS[transport]()
    with client, server, stalls.interrupt_handler():
        client.setblocking(False)
        writer = BlockedWriter(impl.chargen, server, PATTERN)
        for _ in range(MAX_ROUNDS):
            if len(received) >= target and writer.interrupts.short >= MIN_SHORT:
                break
            writer.interrupt()
            data, _ = read_available(client, rng.choice(READS))
            keep(received, data, chargen_at)
        sleeping = writer.sleeping()  # stalled, with more to send
        assert sleeping is not None and sleeping[0] == writer.send_call
        held = held_by_kernel(client, server)
        client.close()  # the normal end: chargen returns what the kernel took
        nin, nout = writer.join()
    assert bytes(received) == cycle_of(PATTERN, len(received))
    assert (nin, nout) == (0, len(received) + held)
    assert writer.interrupts.short >= MIN_SHORT, writer.interrupts


@pytest.mark.parametrize("transport", PAIRS)
def test_blocking_sendall_through_short_sends(impl, agree, transport):
    data = randbytes(2, 256 * 1024)
    rng = random.Random(13)
    received = bytearray()
    client, server = PAIRS[transport]()
    with client, server, stalls.interrupt_handler():
        client.setblocking(False)
        writer = BlockedWriter(impl.sendall, server, data)
        eof = False
        for _ in range(MAX_ROUNDS):
            writer.interrupt()
            chunk, eof = read_available(client, rng.choice(READS))
            keep(received, chunk, data)
            if eof:
                break
        result = writer.join()
    assert eof and bytes(received) == data
    assert result == len(data)
    assert writer.interrupts.short >= MIN_SHORT, writer.interrupts
    agree((digest(received), result))


# -- the event loop ---------------------------------------------------------------------


class Served:
    """An EventLoop of ``module`` with a scoreboard slot, run a slice at a
    time by the test: on a TCP listener with small buffers, or on
    ``datagram_sockets``."""

    def __init__(self, module, service: str, *, rcvbuf: int | None = None, **options) -> None:
        self.listener: socket.socket | None = None
        if "datagram_sockets" not in options:
            self.listener = stalls.tcp_listener(rcvbuf=rcvbuf)
            if options.pop("proxy", False):
                options["proxy_listeners"] = [self.listener]
        self.scoreboard = Scoreboard(1)
        self.slot = self.scoreboard.slot_view(0)
        options.setdefault("idle_timeout", 0)
        self.loop = module.EventLoop(
            [self.listener] if self.listener is not None else [],
            service,
            pattern=PATTERN,
            stats=self.slot,
            **options,
        )

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.close()
        del self.loop  # it holds the slot: let it go before the scoreboard's memory
        if self.listener is not None:
            self.listener.close()
        # Something still holding the slot (a failing test's traceback) must
        # not hide the failure: the memory then goes with the last reference.
        with contextlib.suppress(BufferError):
            self.slot.release()
            self.scoreboard.close()

    def connect(self, **buffers: int) -> socket.socket:
        assert self.listener is not None
        client = stalls.tcp_client(self.listener.getsockname(), **buffers)
        client.setblocking(False)
        return client

    def attributes(self) -> tuple[int, ...]:
        loop = self.loop
        return (loop.accepted, loop.active, loop.bytes_in, loop.bytes_out, loop.datagrams)

    def settle(self, waiting: Callable[[], bool] = lambda: False) -> WorkerStats:
        """Run the loop until three slices in a row change nothing, its
        scoreboard slot shows what its attributes do (it writes the slot when
        it wakes, before serving what woke it) and ``waiting()`` is false;
        return the slot. ``waiting``: the loop has work the kernel would take
        now (a delayed ACK can make room after three quiet slices). Nothing
        runs between that last look and the return."""
        stable, last = 0, None
        deadline = time.monotonic() + stalls.PATIENCE
        for _ in range(SETTLE_SLICES):
            self.loop.run(SLICE)
            now = self.attributes()
            stable = stable + 1 if now == last else 0
            last = now
            if stable >= 3:
                stats = self.scoreboard.read(0)
                shown = (stats.accepted, stats.active, stats.bytes_in, stats.bytes_out)
                if shown == now[:4] and not waiting():
                    return stats
            if time.monotonic() > deadline:
                break
        raise AssertionError(f"the loop never settled: {self.attributes()}")

    def owing(self, fd: int, written: Callable[[], int] | None = None) -> Callable[[], bool]:
        """For ``settle``: the loop owes bytes (read, or ``written`` by a
        protocol, but not sent) and its socket ``fd`` would take some."""
        loop = self.loop

        def waiting() -> bool:
            owed = (loop.bytes_in if written is None else written()) - loop.bytes_out
            return fd >= 0 and loop.active > 0 and owed > 0 and writable(fd)

        return waiting


def check_accounts(stats: WorkerStats, received: int, client: socket.socket, fd: int) -> None:
    """What the loop counts as sent is what the peer read plus what the
    kernel holds: at least what is in the peer's receive queue, at most that
    and the loop's whole send queue (TCP counts a byte received but not yet
    acknowledged in both)."""
    held = stalls.queued(fd)  # first: a byte moving on to the peer meanwhile is counted twice
    waiting = unread(client)
    assert received + waiting <= stats.bytes_out <= received + waiting + held


def short_send_seen(owed: int) -> bool:
    """Whether the loop owes bytes after ``settle(served.owing(fd))``: then
    its last send came up short or took nothing (the loop keeps bytes only
    when the kernel would not take them), and ``settle``'s last look saw its
    socket take none."""
    return owed > 0


def final(stats: WorkerStats) -> tuple[int, int, int, int]:
    return (stats.accepted, stats.active, stats.bytes_in, stats.bytes_out)


def test_event_loop_echo_through_short_sends(impl, agree):
    payload = randbytes(3, 512 * 1024)
    rng = random.Random(21)
    received = bytearray()
    short = 0
    with Served(impl, "echo") as served, served.connect() as client:
        pos, shut, eof, fd = 0, False, False, -1
        for _ in range(MAX_ROUNDS):
            pos = feed(client, payload, pos)
            if pos == len(payload) and not shut:
                client.shutdown(socket.SHUT_WR)
                shut = True
            if fd < 0 and served.settle().active:
                fd = server_end(client)
            stats = served.settle(served.owing(fd))
            if stats.active:
                check_accounts(stats, len(received), client, fd)
                short += short_send_seen(stats.bytes_in - stats.bytes_out)
            data, eof = read_available(client, rng.choice(READS))
            keep(received, data, payload)
            if eof:
                break
        stats = served.settle()
    assert eof and bytes(received) == payload
    assert final(stats) == (1, 0, len(payload), len(payload))
    assert short >= MIN_SHORT
    agree((digest(received), final(stats)))


def test_event_loop_chargen_carries_on_after_short_sends(impl, agree):
    target = 60 * len(PATTERN)
    rng = random.Random(22)
    received = bytearray()
    short = 0
    with Served(impl, "chargen") as served, served.connect() as client:
        served.settle()
        fd = server_end(client)
        for _ in range(MAX_ROUNDS):
            # Chargen always has more to send: it is settled once the kernel takes none.
            stats = served.settle(lambda: writable(fd))
            check_accounts(stats, len(received), client, fd)
            short += stats.bytes_out % len(PATTERN) != 0  # stopped inside the pattern
            if len(received) >= target:
                break
            data, _ = read_available(client, rng.choice(READS))
            keep(received, data, chargen_at)
        held = held_by_kernel(client, fd)
        assert stats.bytes_out == len(received) + held
        client.close()  # unread bytes: a reset, the loop's next send fails
        closed = served.settle()
    assert bytes(received) == cycle_of(PATTERN, len(received))
    assert final(closed) == (1, 0, 0, stats.bytes_out)
    assert short >= MIN_SHORT


M = 40  # bytes Expand writes per byte it reads
REQUEST = randbytes(4, 6000)
REPLIES = randbytes(5, len(REQUEST) * M)


class Expand:
    """Writes M bytes of REPLIES per byte it receives, from M times the
    position of that byte: what the peer reads does not depend on how the
    request was cut into reads. Each write is more than the buffers hold.
    It writes ``bytes`` (kept and sent when data_received returns) or a
    ``bytearray`` (sent at once)."""

    def __init__(self, kind: type = bytes) -> None:
        self.kind = kind
        self.received = self.written = 0
        self.lost: Any = "open"

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        start = self.received * M
        self.received += len(data)
        reply = self.kind(REPLIES[start : self.received * M])
        self.transport.write(reply)
        self.written += len(reply)

    def eof_received(self) -> bool:
        return False  # close once everything written is flushed

    def connection_lost(self, exc) -> None:
        self.lost = exc


@pytest.mark.parametrize("kind", [bytes, bytearray], ids=["bytes", "bytearray"])
def test_event_loop_protocol_writes_through_short_sends(impl, agree, kind):
    protocols: list[Expand] = []

    def factory() -> Expand:
        protocols.append(Expand(kind))
        return protocols[-1]

    rng = random.Random(23)
    received = bytearray()
    short = 0
    with (
        Served(impl, "protocol", protocol_factory=factory, max_buffer=8 << 20) as served,
        served.connect() as client,
    ):
        pos, shut, eof, fd = 0, False, False, -1
        for _ in range(MAX_ROUNDS):
            pos = feed(client, REQUEST, pos, limit=rng.randint(1, 500))
            if pos == len(REQUEST) and not shut:
                client.shutdown(socket.SHUT_WR)
                shut = True
            if fd < 0 and served.settle().active:
                fd = server_end(client)
            stats = served.settle(served.owing(fd, lambda: protocols[0].written))
            if stats.active:
                check_accounts(stats, len(received), client, fd)
                assert stats.bytes_in == protocols[0].received
                short += short_send_seen(protocols[0].written - stats.bytes_out)
            data, eof = read_available(client, rng.choice(READS))
            keep(received, data, REPLIES)
            if eof:
                break
        stats = served.settle()
    (protocol,) = protocols
    assert eof and bytes(received) == REPLIES
    assert final(stats) == (1, 0, len(REQUEST), len(REPLIES))
    assert (protocol.written, protocol.lost) == (len(REPLIES), None)
    assert short >= MIN_SHORT
    agree((digest(received), final(stats)))


PROXY_HEADER = b"PROXY TCP4 192.0.2.1 198.51.100.2 40000 7\r\n"


def test_event_loop_proxy_hand_over_through_short_sends(impl, agree):
    """The header and 40 KiB arrive before the loop first reads: it reads
    them at once, hands the 40 KiB to echo, and that echo comes up short."""
    payload = randbytes(6, 256 * 1024)
    first = 40 * 1024
    rng = random.Random(24)
    received = bytearray()
    short = 0
    # A large receive buffer on the loop's side only, so the first read holds
    # the header and all 40 KiB; everything the loop sends meets small buffers.
    with Served(impl, "echo", rcvbuf=256 * 1024, proxy=True) as served:
        with served.connect() as client:
            head = PROXY_HEADER + payload[:first]
            assert feed(client, head, 0) == len(head)
            served.settle()
            fd = server_end(client)
            stats = served.settle(served.owing(fd))
            # One read took the header and the 40 KiB; the echo of it is short.
            assert (stats.accepted, stats.bytes_in) == (1, first)
            assert short_send_seen(stats.bytes_in - stats.bytes_out)
            pos, shut, eof = first, False, False
            for _ in range(MAX_ROUNDS):
                data, eof = read_available(client, rng.choice(READS))
                keep(received, data, payload)
                if eof:
                    break
                pos = feed(client, payload, pos)
                if pos == len(payload) and not shut:
                    client.shutdown(socket.SHUT_WR)
                    shut = True
                stats = served.settle(served.owing(fd))
                if stats.active:
                    check_accounts(stats, len(received), client, fd)
                    short += short_send_seen(stats.bytes_in - stats.bytes_out)
        stats = served.settle()
    assert eof and bytes(received) == payload
    assert final(stats) == (1, 0, len(payload), len(payload))  # the header is not counted
    assert short >= MIN_SHORT
    agree((digest(received), final(stats)))


_names = itertools.count()


def unix_datagram_socket() -> socket.socket:
    """A bound, non-blocking UNIX datagram socket with small buffers. Unlike
    UDP over loopback, a send to a peer whose queue is full fails (EAGAIN)."""
    sock = stalls.shrink(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
    sock.bind(f"\0prefork-short-sends-{os.getpid()}-{next(_names)}")
    sock.setblocking(False)
    return sock


def datagrams(seed: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    for number in itertools.count():
        yield struct.pack(">I", number) + rng.randbytes(rng.randint(0, 3000))


def test_event_loop_datagram_replies_to_a_full_peer_are_dropped(impl, agree):
    """Requests whose replies meet a full peer queue (EAGAIN) get none; the
    others get theirs, in order, and bytes_out counts exactly those."""
    rng = random.Random(25)
    sent: list[bytes] = []
    replies: list[bytes] = []
    source = datagrams(7)
    with unix_datagram_socket() as server, unix_datagram_socket() as client:
        with Served(impl, "echo", datagram_sockets=[server]) as served:
            for _ in range(60):
                for _ in range(rng.randint(1, 40)):
                    request = next(source)
                    try:
                        client.sendto(request, server.getsockname())
                    except BlockingIOError:  # the loop's queue is full: next round
                        break
                    sent.append(request)
                served.settle()
                for _ in range(rng.choice((0, 0, 3, 100))):
                    try:
                        replies.append(client.recv(65536))
                    except BlockingIOError:
                        break
            stats = served.settle()
            while True:
                try:
                    replies.append(client.recv(65536))
                except BlockingIOError:
                    break
            count = served.loop.datagrams
    answered = iter(sent)
    assert all(reply in answered for reply in replies), "replies out of order or altered"
    assert count == len(sent)
    assert final(stats) == (0, 0, sum(map(len, sent)), sum(map(len, replies)))
    assert len(replies) + MIN_SHORT <= len(sent), "no reply met a full queue"
    agree(([digest(reply) for reply in replies], final(stats)))


BIG = randbytes(8, 1 << 20)
WIDE = 1 << 20  # the peer's receive buffer in the next test: a wide window


class WriteOnRequest:
    """Writes BIG when its peer sends a byte, and notes how much of it the
    loop sent before ``write`` returned."""

    def __init__(self, loop: Callable[[], Any]) -> None:
        self.loop = loop
        self.taken = -1

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        before = self.loop().bytes_out
        self.transport.write(BIG)
        self.taken = self.loop().bytes_out - before

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc) -> None:
        pass


def one_send() -> int:
    """What one non-blocking send of BIG takes on a connection like the
    loop's in the next test: the same buffers, the peer spoke first."""
    with stalls.tcp_listener() as listener:
        client = stalls.tcp_client(listener.getsockname(), rcvbuf=WIDE)
        listener.setblocking(True)
        server, _ = listener.accept()
        with client, server:
            client.sendall(b"?")
            assert server.recv(1) == b"?"
            server.setblocking(False)
            return server.send(BIG)


def write_once(impl) -> tuple[int, bytes, WorkerStats]:
    """A loop of ``impl`` writes BIG to a peer that does not read, until the
    peer reads it all; what the write took at once, what the peer read and
    the final counters."""
    protocols: list[WriteOnRequest] = []

    def factory() -> WriteOnRequest:
        protocols.append(WriteOnRequest(lambda: served.loop))
        return protocols[-1]

    received = bytearray()
    eof = False
    with Served(impl, "protocol", max_buffer=2 * len(BIG), protocol_factory=factory) as served:
        with served.connect(rcvbuf=WIDE) as client:
            client.send(b"?")
            served.settle(lambda: not protocols or protocols[0].taken < 0)
            client.shutdown(socket.SHUT_WR)
            for _ in range(MAX_ROUNDS):
                served.settle()
                data, eof = read_available(client, len(BIG))
                keep(received, data, BIG)
                if eof:
                    break
        stats = served.settle()
    assert eof
    return protocols[0].taken, bytes(received), stats


def test_a_short_send_is_followed_at_once_by_another(impl, agree):
    """After a short send the loop sends again at once, until the kernel
    takes nothing, rather than waiting a turn for EPOLLOUT.

    The loop's socket has a small send buffer and its peer, which does not
    read, a wide window. A send stops once the send buffer is spent, but over
    loopback the peer's kernel acknowledges within that send, and the
    acknowledgements free the buffer as the send returns: the next send takes
    more at once. So one ``transport.write`` must take more than one send does
    on an identical connection (measured: ``one_send``)."""
    for _ in range(3):  # the kernel may defer the acknowledgements: try again
        single = one_send()
        assert single < len(BIG), "one send took everything: nothing came up short"
        taken, received, stats = write_once(impl)
        assert received == BIG
        assert final(stats) == (1, 0, 1, len(BIG))
        if taken > single:
            break
    assert taken > single, (taken, single)
    agree((digest(received), final(stats)))


class Relay:
    """On every read, writes nothing (``b""``) to each other connection."""

    def __init__(self, members: list[Relay]) -> None:
        self.members = members
        self.lost: Any = "open"

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.members.append(self)

    def data_received(self, data: bytes) -> None:
        for member in self.members:
            if member is not self:
                member.transport.write(b"")

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc) -> None:
        self.lost = exc
        self.members.remove(self)


def test_an_empty_write_is_nothing(impl):
    """Writing zero bytes sends nothing and is no activity (asyncio: a no-op),
    so a connection that is only ever written nothing still idles out, while
    the one that talks stays."""
    timeout = 0.5  # seconds: longer than any pause of this process between two sends
    members: list[Relay] = []
    with Served(
        impl, "protocol", protocol_factory=lambda: Relay(members), idle_timeout=timeout
    ) as served:
        with served.connect() as quiet, served.connect() as talker:
            served.settle()
            assert len(members) == 2
            started = time.monotonic()
            # The quiet one is written nothing on every byte the talker sends:
            # it must idle out all the same, long before 10 idle timeouts.
            while served.loop.idle_closed == 0 and time.monotonic() - started < 10 * timeout:
                talker.send(b"x")
                served.loop.run(timeout / 4)
            assert served.loop.idle_closed == 1
            assert read_available(quiet, 1) == (b"", True)
            assert served.loop.active == 1  # the talker's reads are activity
