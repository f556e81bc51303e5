"""The protocol transport's asyncio contract, both implementations of the loop.

Flow control (pause_writing past the high-water mark, resume_writing at the
low one, never cut off when the protocol honours it), pause_reading and
resume_reading, write_eof, abort, writelines, BufferedProtocol, the buffer
limits and the protocol switch. The loop runs in the test's own thread, as
in a worker: ``drive`` turns it until what the test waits for has happened.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

pytestmark = pytest.mark.timeout(60)

HIGH, LOW = 64 * 1024, 16 * 1024  # asyncio's defaults


def drive(loop, until, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "the loop never got there"
        loop.run(0.02)


class Served:
    """A loop of ``impl`` serving ``factory`` on a fresh listener; a client."""

    def __init__(self, impl, factory, **options) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.listener.setblocking(False)
        self.loop = impl.EventLoop([self.listener], "protocol", protocol_factory=factory, **options)
        self.client = socket.socket()
        self.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)  # before connect
        self.client.connect(self.listener.getsockname())
        self.client.setblocking(False)
        drive(self.loop, lambda: self.loop.accepted == 1)

    def read_all(self, until_eof: bool = True, size: int | None = None) -> bytes:
        """Read while driving the loop, to the end of file or ``size`` bytes."""
        data = bytearray()

        def done() -> bool:
            try:
                chunk = self.client.recv(1 << 20)
            except BlockingIOError:
                return False
            if not chunk:
                return True
            data.extend(chunk)
            return size is not None and len(data) >= size

        drive(self.loop, done)
        return bytes(data)

    def close(self) -> None:
        self.client.close()
        self.loop.close()
        self.listener.close()


@pytest.fixture
def served(impl):
    made: list[Served] = []

    def serve(factory, **options) -> Served:
        s = Served(impl, factory, **options)
        made.append(s)
        return s

    yield serve
    for s in made:
        s.close()


class Producer(asyncio.Protocol):
    """Writes TOTAL bytes in CHUNKs, as fast as flow control lets it."""

    TOTAL = 4 << 20
    CHUNK = 8 * 1024

    def __init__(self) -> None:
        self.sent = 0
        self.paused = False
        self.pauses = self.resumes = 0
        self.most_owed = 0
        self.lost: object = "open"

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.produce()

    def produce(self) -> None:
        while not self.paused and self.sent < self.TOTAL:
            self.transport.write(bytes([self.sent // self.CHUNK % 251]) * self.CHUNK)
            self.sent += self.CHUNK
            self.most_owed = max(self.most_owed, self.transport.get_write_buffer_size())
        if self.sent >= self.TOTAL:
            self.transport.close()

    def pause_writing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume_writing(self) -> None:
        self.paused = False
        self.resumes += 1
        self.produce()

    def connection_lost(self, exc) -> None:
        self.lost = exc


def test_a_producer_that_honours_flow_control_is_never_cut_off(served):
    """4 MiB through a 256 KiB --max-buffer to a client that reads late: the
    protocol is paused past the high-water mark, resumed at the low one,
    and every byte arrives in order."""
    protocols: list[Producer] = []
    s = served(lambda: protocols.append(Producer()) or protocols[-1], max_buffer=256 * 1024)
    (p,) = protocols
    assert p.paused and p.pauses == 1  # stopped at the mark, not at the ceiling
    assert HIGH < p.transport.get_write_buffer_size() <= HIGH + Producer.CHUNK
    data = s.read_all()
    expected = b"".join(bytes([i % 251]) * Producer.CHUNK for i in range(p.TOTAL // p.CHUNK))
    assert data == expected
    assert p.lost is None and p.resumes >= 1
    assert p.most_owed <= HIGH + Producer.CHUNK


def test_set_write_buffer_limits_moves_the_marks(served):
    protocols: list[Producer] = []

    class Early(Producer):
        def connection_made(self, transport) -> None:
            transport.set_write_buffer_limits(high=16 * 1024)
            assert transport.get_write_buffer_limits() == (4 * 1024, 16 * 1024)
            super().connection_made(transport)

    s = served(lambda: protocols.append(Early()) or protocols[-1])
    (p,) = protocols
    assert p.paused and p.transport.get_write_buffer_size() <= 16 * 1024 + Producer.CHUNK
    with pytest.raises(ValueError):
        p.transport.set_write_buffer_limits(high=1, low=2)
    assert len(s.read_all()) == p.TOTAL


def test_the_default_limits_are_asyncios(served):
    seen = []

    class Look(asyncio.Protocol):
        def connection_made(self, transport) -> None:
            seen.append(transport.get_write_buffer_limits())
            seen.append(transport.get_write_buffer_size())
            seen.append(transport.can_write_eof())
            sock = transport.get_extra_info("socket")
            seen.append(sock.getsockname() == transport.get_extra_info("sockname"))

    served(Look)
    assert seen == [(LOW, HIGH), 0, True, True]


def test_pause_reading_stops_data_until_resume(served):
    received: list[bytes] = []
    protocols: list[asyncio.Protocol] = []

    class Pauser(asyncio.Protocol):
        def connection_made(self, transport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            received.append(data)
            self.transport.pause_reading()

    s = served(lambda: protocols.append(Pauser()) or protocols[-1])
    s.client.sendall(b"first")
    drive(s.loop, lambda: received == [b"first"])
    transport = protocols[0].transport  # type: ignore[attr-defined]
    assert not transport.is_reading()
    s.client.sendall(b"second")
    for _ in range(10):
        s.loop.run(0.02)
    assert received == [b"first"]  # paused: not read
    transport.resume_reading()
    assert transport.is_reading()
    drive(s.loop, lambda: len(received) == 2)
    assert received[1] == b"second"


def test_write_eof_half_closes_and_the_connection_still_reads(served):
    received: list[bytes] = []
    errors: list[str] = []

    class Bye(asyncio.Protocol):
        def connection_made(self, transport) -> None:
            transport.writelines([b"b", b"y", b"e"])
            transport.write_eof()
            try:
                transport.write(b"more")
            except RuntimeError as exc:
                errors.append(str(exc))

        def data_received(self, data: bytes) -> None:
            received.append(data)

    s = served(Bye)
    assert s.read_all() == b"bye"  # then the end of file: the sending side shut
    s.client.sendall(b"still listening")
    drive(s.loop, lambda: received == [b"still listening"])
    assert errors == ["Cannot call write() after write_eof()"]


def test_abort_drops_what_is_owed_and_tells_the_protocol(served):
    SIZE = 16 << 20
    lost: list[object] = []
    owed: list[int] = []

    class Quitter(asyncio.Protocol):
        def connection_made(self, transport) -> None:
            # More than the kernel's buffers take (tcp_wmem's ceiling is 4 MiB
            # here), while the client reads nothing yet: the rest is owed.
            transport.write(b"x" * SIZE)
            owed.append(transport.get_write_buffer_size())
            transport.abort()

        def connection_lost(self, exc) -> None:
            lost.append(exc)

    s = served(Quitter, max_buffer=2 * SIZE)
    assert lost == [None]
    assert s.loop.active == 0
    assert owed[0] > 0
    # What the kernel had taken arrives; what was owed never does.
    assert s.read_all() == b"x" * (SIZE - owed[0])


class BufferedEcho(asyncio.BufferedProtocol):
    """Hands out 7-byte buffers: a read is copied into several of them."""

    def __init__(self) -> None:
        self.buffer = bytearray(7)
        self.updates = 0

    def connection_made(self, transport) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.updates += 1
        self.transport.write(bytes(self.buffer[:nbytes]))

    def data_received(self, data: bytes) -> None:  # pragma: no cover - must not be called
        raise AssertionError("a BufferedProtocol got data_received")


def test_a_buffered_protocol_reads_into_its_own_buffers(served):
    protocols: list[BufferedEcho] = []
    s = served(lambda: protocols.append(BufferedEcho()) or protocols[-1])
    payload = bytes(range(256)) * 40
    s.client.sendall(payload)
    assert s.read_all(size=len(payload)) == payload
    assert protocols[0].updates >= len(payload) // 7


@pytest.mark.parametrize(
    "buffer", [bytearray(), b"read-only", "not a buffer"], ids=["empty", "read-only", "str"]
)
def test_a_bad_buffer_from_get_buffer_closes_its_connection_only(served, buffer, caplog):
    class BadBuffer(asyncio.BufferedProtocol):
        def get_buffer(self, sizehint: int):
            return buffer

        def buffer_updated(self, nbytes: int) -> None:  # pragma: no cover - never reached
            raise AssertionError("no read can land in that buffer")

    s = served(BadBuffer)
    s.client.sendall(b"hello")
    drive(s.loop, lambda: s.loop.active == 0)
    assert s.loop.handler_errors == 1
    assert "handler failed" in caplog.text


class CallRecorder(asyncio.BufferedProtocol):
    """Records the calls a BufferedProtocol gets."""

    def __init__(self, calls: list) -> None:
        self.calls = calls
        self.buffer = bytearray(64)

    def get_buffer(self, sizehint: int) -> bytearray:
        self.calls.append(("get_buffer", sizehint))
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.calls.append(("buffer_updated", bytes(self.buffer[:nbytes])))

    def eof_received(self) -> None:
        self.calls.append(("eof_received",))


CHUNKS = [b"first", b"second chunk", b"3"]


def buffered_calls_under_asyncio() -> list:
    """What asyncio's own loop calls on CallRecorder when CHUNKS come one
    at a time (each answered before the next is sent), then the end of file."""
    calls: list = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        lost = loop.create_future()

        class Recorder(CallRecorder):
            def connection_lost(self, exc) -> None:
                lost.set_result(None)

        server = await loop.create_server(lambda: Recorder(calls), "127.0.0.1", 0)
        with socket.create_connection(server.sockets[0].getsockname()[:2]) as client:
            for chunk in CHUNKS:
                client.sendall(chunk)
                while ("buffer_updated", chunk) not in calls:
                    await asyncio.sleep(0.001)
            client.shutdown(socket.SHUT_WR)
            await asyncio.wait_for(lost, 20)
        server.close()
        await server.wait_closed()

    asyncio.run(main())
    return calls


def test_a_buffered_protocol_is_asked_for_its_buffer_before_the_read_as_in_asyncio(served):
    # Plaintext reads land straight in the protocol's buffer: get_buffer(-1)
    # comes before the read (asyncio's sizehint when the size is not known),
    # as asyncio's own loop asks, also for the read that finds the end.
    calls: list = []
    s = served(lambda: CallRecorder(calls))
    for chunk in CHUNKS:
        s.client.sendall(chunk)
        drive(s.loop, lambda chunk=chunk: ("buffer_updated", chunk) in calls)
    s.client.shutdown(socket.SHUT_WR)
    drive(s.loop, lambda: s.loop.active == 0)
    expected = []
    for chunk in CHUNKS:
        expected += [("get_buffer", -1), ("buffer_updated", chunk)]
    expected += [("get_buffer", -1), ("eof_received",)]
    assert calls == expected
    assert buffered_calls_under_asyncio() == expected


class GrowingBuffer(asyncio.BufferedProtocol):
    """Hands out a bytearray and doubles it in buffer_updated when a read
    filled it: as asyncio does, the loop has let go of the buffer by then (a
    bytearray with a buffer still taken from it cannot be resized)."""

    def __init__(self) -> None:
        self.buffer = bytearray(16)
        self.received = bytearray()

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.received += self.buffer[:nbytes]
        if nbytes == len(self.buffer):
            self.buffer.extend(bytes(len(self.buffer)))

    def eof_received(self) -> bool:
        return False


def test_a_buffered_protocol_may_resize_its_buffer_in_buffer_updated(served):
    protocols: list[GrowingBuffer] = []
    s = served(lambda: protocols.append(GrowingBuffer()) or protocols[-1])
    payload = bytes(range(256)) * 8
    s.client.sendall(payload)
    s.client.shutdown(socket.SHUT_WR)
    drive(s.loop, lambda: s.loop.active == 0)
    assert s.loop.handler_errors == 0
    assert bytes(protocols[0].received) == payload
    assert len(protocols[0].buffer) > 16


def test_data_a_protocol_keeps_is_never_rewritten(served):
    # Reads of one length, some kept, some dropped: what a protocol keeps
    # stays as it came, whichever bytes object a later read is given.
    kept: list[bytes] = []
    seen: list[bytes] = []

    class Keeper(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            seen.append(bytes(data))  # a copy: data itself may be dropped
            if len(seen) % 2:
                kept.append(data)

    s = served(Keeper)
    for i in range(8):
        s.client.sendall(bytes([i]) * 100)
        drive(s.loop, lambda i=i: len(seen) == i + 1)
    assert seen == [bytes([i]) * 100 for i in range(8)]
    assert kept == [bytes([i]) * 100 for i in range(0, 8, 2)]


def test_data_a_protocol_hashed_and_dropped_hashes_afresh_next_time(served):
    # A protocol that uses each read as a dict key: the next read of the
    # same length must not carry the hash of the last one's contents.
    hashes: list[bool] = []

    class Hasher(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            hashes.append(hash(data) == hash(bytes(bytearray(data))) and {data: 1}[data] == 1)

    s = served(Hasher)
    for i in range(4):
        s.client.sendall(bytes([65 + i]) * 64)
        drive(s.loop, lambda i=i: len(hashes) == i + 1)
    assert hashes == [True] * 4


def test_set_protocol_hands_the_connection_over(served):
    received: list[tuple[str, bytes]] = []

    class Second(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            received.append(("second", data))

    class First(asyncio.Protocol):
        def connection_made(self, transport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            received.append(("first", data))
            second = Second()
            self.transport.set_protocol(second)
            assert self.transport.get_protocol() is second

    s = served(First)
    s.client.sendall(b"one")
    drive(s.loop, lambda: len(received) == 1)
    s.client.sendall(b"two")
    drive(s.loop, lambda: len(received) == 2)
    assert received == [("first", b"one"), ("second", b"two")]


# -- writes during a read leave together ----------------------------------------
#
# What a protocol writes while it handles a read (data_received,
# buffer_updated) is sent in one system call when it returns. Nothing a
# protocol can observe differs from asyncio's loop, which sends each write at
# once: the tests below run the same protocols under asyncio itself.


def data_segments_out(sock: socket.socket) -> int:
    """TCP segments with data ``sock`` has sent (tcp_info's tcpi_data_segs_out)."""
    return int.from_bytes(
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)[156:160], "little"
    )


class Lines(asyncio.Protocol):
    """Answers each message with LINES lines, one write per line."""

    LINES = 8

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.sock = transport.get_extra_info("socket")

    def data_received(self, data: bytes) -> None:
        for i in range(self.LINES):
            self.transport.write(b"line %d of %s\n" % (i, data))


class BufferedLines(asyncio.BufferedProtocol):
    """Lines, as a BufferedProtocol (its reads land in its own buffer)."""

    def __init__(self) -> None:
        self.buffer = bytearray(4096)

    connection_made = Lines.connection_made

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        Lines.data_received(self, bytes(self.buffer[:nbytes]))  # type: ignore[arg-type]

    LINES = Lines.LINES


@pytest.mark.parametrize("kind", [Lines, BufferedLines])
def test_the_writes_a_protocol_makes_in_one_read_leave_in_one_segment(served, kind):
    made: list = []
    s = served(lambda: made.append(kind()) or made[-1])
    expected = b"".join(b"line %d of ping\n" % i for i in range(Lines.LINES))
    for round_ in range(3):
        s.client.sendall(b"ping")
        assert s.read_all(until_eof=False, size=len(expected)) == expected
        # One send per read (asyncio's loop and uvloop send eight).
        assert data_segments_out(made[0].sock) == round_ + 1


def under_asyncio(factory, message: bytes) -> bytes:
    """What a client that sends ``message`` and reads to the end of file
    gets from ``factory``'s protocol served by asyncio's own loop."""

    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(factory, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
        writer.write(message)
        try:
            received = await asyncio.wait_for(reader.read(), 20)
        except ConnectionResetError:  # pragma: no cover - asyncio closed with unread data
            received = b"reset"
        writer.close()
        server.close()
        await server.wait_closed()
        return received

    return asyncio.run(main())


class Observer(asyncio.Protocol):
    """Writes in every way the transport offers, looks at the buffer size
    after the first write, then ends as ``ending`` says."""

    def __init__(self, ending: str, seen: list) -> None:
        self.ending = ending
        self.seen = seen

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        t = self.transport
        t.write(b"a")
        self.seen.append(t.get_write_buffer_size())
        t.write(bytearray(b"b"))
        t.write(b"c")
        t.write(memoryview(b"xdx")[1:2])
        t.writelines([b"e", b"f"])
        t.write(b"")
        t.write(b"g")  # b to g are still to go when the protocol ends
        if self.ending == "close":
            t.close()
            t.write(b"after close")  # dropped, as in asyncio
        elif self.ending == "write_eof":
            t.write_eof()
        elif self.ending == "abort":
            t.abort()
        elif self.ending == "raise":
            raise RuntimeError("the handler fails after writing")

    def eof_received(self) -> None:
        self.transport.close()


@pytest.mark.parametrize("ending", ["close", "write_eof", "abort", "raise"])
def test_what_a_protocol_writes_in_a_read_is_delivered_as_by_asyncio(served, ending):
    seen: list = []
    s = served(lambda: Observer(ending, seen))
    s.client.sendall(b"go")
    if ending == "write_eof":
        assert s.read_all() == b"abcdefg"  # the end of file came: now ours
        s.client.shutdown(socket.SHUT_WR)
        drive(s.loop, lambda: s.loop.active == 0)
    else:
        assert s.read_all() == b"abcdefg"
    theirs: list = []
    assert under_asyncio(lambda: Observer(ending, theirs), b"go") == b"abcdefg"
    assert seen == theirs == [0]


class Flood(asyncio.Protocol):
    """Writes ``count`` chunks of ``size`` bytes in one data_received, to a
    client that reads nothing yet; a socket buffer far smaller than that."""

    def __init__(self, count: int, size: int, events: list, observe: bool) -> None:
        self.count, self.size, self.events, self.observe = count, size, events, observe

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=16 * 1024)
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

    def data_received(self, data: bytes) -> None:
        for i in range(self.count):
            self.transport.write(bytes([i % 251]) * self.size)
        if self.observe:
            self.events.append(("owed", self.transport.get_write_buffer_size() > 0))
        self.transport.close()

    def pause_writing(self) -> None:
        self.events.append("pause")

    def resume_writing(self) -> None:
        self.events.append("resume")


@pytest.mark.parametrize(
    ("count", "size"),
    [(16, 4096), (40, 3000), (3, 60000)],
    ids=["at-the-bounds", "past-the-bounds", "large"],
)
@pytest.mark.parametrize("observe", [True, False], ids=["observed", "closed-at-once"])
def test_writes_the_kernel_cannot_take_at_once_are_owed_and_pause_the_protocol(
    served, count, size, observe
):
    # The send after the read is short (the client reads nothing yet): the
    # rest is owed, past the high-water mark the protocol is paused, and
    # every byte arrives, in order.
    events: list = []
    s = served(lambda: Flood(count, size, events, observe))
    s.client.sendall(b"go")
    drive(s.loop, lambda: events)
    expected = b"".join(bytes([i % 251]) * size for i in range(count))
    assert s.read_all() == expected
    assert events == (["pause", ("owed", True), "resume"] if observe else ["pause", "resume"])


# -- writes from the asyncio loop's callbacks (hold_writes) ---------------------
#
# The event worker's asyncio loop runs its ready callbacks (a task's step, a
# timer) under EventLoop.hold_writes(True): what they write is held as during
# a read, one connection at a time, and sent when they are done.


class Kept(asyncio.Protocol):
    """Keeps its transport for the test to write with, from outside a read."""

    def __init__(self, made: list) -> None:
        made.append(self)
        self.events: list = []

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.sock = transport.get_extra_info("socket")

    def pause_writing(self) -> None:
        self.events.append("pause")

    def resume_writing(self) -> None:
        self.events.append("resume")


def test_what_callbacks_write_is_held_and_leaves_in_one_segment(served):
    made: list = []
    s = served(lambda: Kept(made))
    t = made[0].transport
    expected = b"".join(b"line %d\n" % i for i in range(8))
    for round_ in range(2):
        s.loop.hold_writes(True)
        for i in range(8):
            t.write(b"line %d\n" % i)
        with pytest.raises(BlockingIOError):  # held: nothing has left
            s.client.recv(100)
        s.loop.hold_writes(False)
        assert s.read_all(until_eof=False, size=len(expected)) == expected
        assert data_segments_out(made[0].sock) == round_ + 1


def test_held_writes_to_two_connections_keep_their_order(served):
    made: list = []
    s = served(lambda: Kept(made))
    other = socket.create_connection(s.listener.getsockname(), timeout=20)
    try:
        drive(s.loop, lambda: len(made) == 2)
        ours = {p.transport.get_extra_info("peername"): p.transport for p in made}
        a, b = ours[s.client.getsockname()], ours[other.getsockname()]
        s.loop.hold_writes(True)
        a.write(b"a1")
        b.write(b"b1")  # a1 leaves: one connection is held at a time
        assert s.client.recv(100) == b"a1"
        a.write(b"a2")
        a.write(b"a3")
        b.write(b"b2")
        s.loop.run(0)  # a run sends what is held first
        assert s.read_all(until_eof=False, size=4) == b"a2a3"
        other.settimeout(20)
        received = b""
        while len(received) < 4:
            received += other.recv(100)
        assert received == b"b1b2"
        s.loop.hold_writes(False)
    finally:
        other.close()


@pytest.mark.parametrize("ending", ["close", "write_eof", "abort", "observe"])
def test_held_writes_leave_before_what_follows(served, ending):
    made: list = []
    s = served(lambda: Kept(made))
    t = made[0].transport
    s.loop.hold_writes(True)
    t.write(b"a")
    t.write(b"b")
    if ending == "observe":
        assert t.get_write_buffer_size() == 0  # sent first, as asyncio had
        assert s.client.recv(100) == b"ab"
        t.write(b"c")
        s.loop.hold_writes(False)
        assert s.read_all(until_eof=False, size=1) == b"c"
        return
    getattr(t, ending)()
    s.loop.hold_writes(False)
    if ending == "write_eof":
        assert s.read_all() == b"ab"
    else:
        assert s.read_all() == b"ab"
        assert s.loop.active == 0


@pytest.mark.parametrize(("count", "size"), [(16, 4096), (40, 3000), (3, 60000)])
def test_held_writes_the_kernel_cannot_take_are_owed_and_pause_the_protocol(served, count, size):
    made: list = []
    s = served(lambda: Kept(made))
    p = made[0]
    p.transport.set_write_buffer_limits(high=16 * 1024)
    p.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    s.loop.hold_writes(True)
    for i in range(count):
        p.transport.write(bytes([i % 251]) * size)
    s.loop.hold_writes(False)
    assert p.events == ["pause"]
    p.transport.close()
    expected = b"".join(bytes([i % 251]) * size for i in range(count))
    assert s.read_all() == expected
    assert p.events == ["pause", "resume"]
