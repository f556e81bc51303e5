"""fastio.EventLoop over real sockets, against both implementations.

The loop runs in a thread of the test process (the compiled one releases
the GIL, the spec releases it in every syscall) while clients connect.
Only that thread calls the loop's methods, as in the event worker: the test
asks for a call (``Running.call``) and wakes the loop through its wake-up
pipe, and the thread makes the call between two ``run`` calls. A call from
the test thread while ``run`` is under way would race with the loop (the
epoll set changes under it) in a way production never does.
"""

from __future__ import annotations

import collections
import os
import socket
import threading
import time

import pytest

from prefork._fastio_common import LOOP_COUNTERS, SLOT, SLOT_FIELDS, SLOT_SIZE, SWEEP_INTERVAL
from prefork.server.handlers import chargen_pattern

from support import EPOLL_RESOLUTION, KeepTalking, WakeupProbe, wait_until

pytestmark = pytest.mark.timeout(60)


class Running:
    """An EventLoop of ``impl`` on a fresh listener, run in a thread."""

    def __init__(self, impl, service="echo", backlog=128, **options) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(backlog)
        self.listener.setblocking(False)
        self.address = self.listener.getsockname()
        self.wakeup_r, self.wakeup_w = os.pipe2(os.O_NONBLOCK)
        self.loop = impl.EventLoop(
            [self.listener],
            service,
            wakeup_fd=self.wakeup_r,
            pattern=chargen_pattern(1),
            **options,
        )
        self.errors: list[BaseException] = []
        self._stop = False
        self._requests: collections.deque[tuple[str, threading.Event]] = collections.deque()
        self.runs = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self._stop and (self.loop.accepting or self.loop.active or self._requests):
                self.loop.run(0.2)
                self.runs += 1
                while self._requests:  # between two runs, as the worker handles a signal
                    method, done = self._requests.popleft()
                    try:
                        getattr(self.loop, method)()
                    finally:
                        done.set()
        except BaseException as exc:
            self.errors.append(exc)

    def call(self, method: str) -> None:
        """Have the loop's thread call ``loop.METHOD()`` (a flag and the
        wake-up pipe, as the event worker's signal handler does); return once
        it has."""
        done = threading.Event()
        self._requests.append((method, done))
        self.wake()
        assert done.wait(10), f"the loop's thread did not call {method}()"
        assert not self.errors, self.errors

    def connect(self) -> socket.socket:
        return socket.create_connection(self.address, timeout=10)

    def wake(self) -> None:
        os.write(self.wakeup_w, b"x")

    def stop(self) -> None:
        self._stop = True
        self.wake()
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.loop.close()
        self.listener.close()
        os.close(self.wakeup_r)
        os.close(self.wakeup_w)
        assert not self.errors, self.errors


@pytest.fixture
def running(impl):
    started: list[Running] = []

    def start(service="echo", **options) -> Running:
        r = Running(impl, service, **options)
        started.append(r)
        return r

    yield start
    for r in started:
        r.stop()


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(min(1 << 20, size - len(data)))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def test_echo_on_many_connections_at_once(running):
    r = running()
    socks = [r.connect() for _ in range(100)]
    payloads = [os.urandom(1000 + i) for i in range(100)]
    for sock, payload in zip(socks, payloads, strict=True):
        sock.sendall(payload)
    for sock, payload in zip(socks, payloads, strict=True):
        assert read_exactly(sock, len(payload)) == payload
    for sock in socks:
        sock.close()
    assert wait_until(lambda: r.loop.active == 0, 5)
    assert r.loop.accepted == 100
    total = sum(map(len, payloads))
    assert (r.loop.bytes_in, r.loop.bytes_out) == (total, total)


def test_half_close_flushes_what_is_owed_then_closes(running):
    r = running(max_buffer=4096)
    payload = os.urandom(3_000_000)
    with r.connect() as sock:
        sock.sendall(payload[:100_000])  # nobody reads yet: the server stops reading
        time.sleep(0.2)
        sender = threading.Thread(
            target=lambda: (sock.sendall(payload[100_000:]), sock.shutdown(socket.SHUT_WR))
        )
        sender.start()
        received = read_exactly(sock, len(payload) + 1)
        sender.join(10)
    assert received == payload  # everything, then end of file


def test_peer_that_never_reads_holds_bounded_memory(running):
    r = running(max_buffer=8192)
    payload = os.urandom(32 << 20)
    with r.connect() as sock:
        sock.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and sent < len(payload):
            try:
                sent += sock.send(payload[sent : sent + 65536])
            except BlockingIOError:
                time.sleep(0.01)
        # Backpressure: the server stopped reading long before 32 MiB.
        assert sent < len(payload)
        in_flight = r.loop.bytes_in - r.loop.bytes_out
        assert 0 < in_flight <= 8192
        sock.setblocking(True)
        sock.settimeout(10)
        sender = threading.Thread(
            target=lambda: (sock.sendall(payload[sent:]), sock.shutdown(socket.SHUT_WR))
        )
        sender.start()
        received = read_exactly(sock, len(payload) + 1)
        sender.join(20)
    assert received == payload


def sweep_interval(idle_timeout: float) -> float:
    """How often the loop looks for idle connections (the EventLoop docs:
    every SWEEP_INTERVAL, or half the timeout when that is shorter)."""
    return min(SWEEP_INTERVAL, idle_timeout / 2)


def assert_closed_for_idleness(
    last_io: tuple[float, float], closed_at: float, timeout, probe, round_trip: float = 0.0
):
    """The bounds on an idle close, derived from how the loop decides it.

    ``last_io`` brackets the connection's last activity as the loop stamped
    it: the test's clock before the last byte was sent and after the last
    byte came back (the loop stamps the time it woke for that I/O, in
    between). ``closed_at`` is when the test saw end of file.

    Never early, whatever the load: the loop closes a connection at a sweep
    that finds it idle for ``timeout`` since its stamp, and the test sees
    that close later still. Not late by more than one sweep interval (the
    close waits for the first sweep after the deadline), the epoll wait's
    millisecond rounding, and two wake-ups: the loop's at its sweep timer and
    the test's at end of file, measured by the probe meanwhile (or, if
    longer, a ``round_trip`` measured meanwhile through the loop, which
    takes the same two wake-ups and the loop's work between them).
    """
    sent_at, echoed_at = last_io
    early = closed_at - sent_at
    bound = timeout + sweep_interval(timeout) + EPOLL_RESOLUTION + probe.allowance(2, round_trip)
    late = closed_at - echoed_at
    print(
        f"\nidle close: {early:.4f}s after the send, {late:.4f}s after the echo, "
        f"bound {bound:.4f}s ({probe}, round trip {round_trip * 1e3:.2f} ms)"
    )
    assert early >= timeout, f"closed {timeout - early:.3f}s before its idle timeout"
    assert late <= bound, f"closed {late:.3f}s after its last byte, bound {bound:.3f}s ({probe})"


def echo_one_byte(sock: socket.socket) -> tuple[float, float]:
    """One byte there and back: the times that bracket the loop's stamp of it."""
    sent_at = time.monotonic()
    sock.sendall(b"x")
    assert read_exactly(sock, 1) == b"x"
    return sent_at, time.monotonic()


def test_idle_connections_are_closed(running):
    timeout = 0.5
    r = running(idle_timeout=timeout)
    with WakeupProbe() as probe, r.connect() as idle, r.connect() as busy:
        last_io = echo_one_byte(idle)
        with KeepTalking(busy, timeout / 5) as talking:  # the loop stays busy meanwhile
            idle.settimeout(timeout * 10)
            assert idle.recv(10) == b""
            closed_at = time.monotonic()
        assert talking.failure is None and talking.pings > 0, talking.failure
        busy.sendall(b"still")
        assert read_exactly(busy, 5) == b"still"
    assert_closed_for_idleness(last_io, closed_at, timeout, probe, talking.worst_rtt)
    assert r.loop.idle_closed == 1


def test_idle_timeout_zero_means_never(running):
    r = running(idle_timeout=0)
    with r.connect() as sock:
        time.sleep(1.2)
        sock.sendall(b"alive")
        assert read_exactly(sock, 5) == b"alive"


def test_max_connections_leaves_the_rest_in_the_backlog(running):
    r = running(max_connections=2)
    first, second, third = r.connect(), r.connect(), r.connect()  # kernel accepts all 3
    for sock in (first, second):
        sock.sendall(b"in")
        assert read_exactly(sock, 2) == b"in"
    third.sendall(b"wait")
    third.settimeout(0.5)
    with pytest.raises(TimeoutError):
        third.recv(4)  # not served: still queued, not accepted and dropped
    assert r.loop.active == 2
    first.close()
    third.settimeout(5)
    assert read_exactly(third, 4) == b"wait"
    second.close()
    third.close()


def test_discard_and_daytime_and_chargen(running):
    d = running("discard")
    with d.connect() as sock:
        sock.sendall(b"x" * 100_000)
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(10) == b""
    assert wait_until(lambda: d.loop.bytes_in == 100_000, 5)

    t = running("daytime")
    with t.connect() as sock:
        line = read_exactly(sock, 200)
    assert line.endswith(b"-UTC\r\n") and str(time.gmtime().tm_year).encode() in line

    c = running("chargen")
    pattern = chargen_pattern(1)
    with c.connect() as sock:
        sock.shutdown(socket.SHUT_WR)  # a half-closed reader still gets the stream
        data = read_exactly(sock, 3 * len(pattern))
    assert data == pattern * 3


def test_stop_accepting_finishes_open_connections(running):
    r = running()
    with r.connect() as sock:
        sock.sendall(b"before")
        assert read_exactly(sock, 6) == b"before"
        r.call("stop_accepting")
        assert not r.loop.accepting
        sock.sendall(b"after")
        assert read_exactly(sock, 5) == b"after"
        with r.connect() as late:  # the kernel still queues; nobody accepts
            late.sendall(b"x")
            late.settimeout(0.5)
            with pytest.raises(TimeoutError):
                late.recv(1)
    assert wait_until(lambda: not r.thread.is_alive(), 5)  # run() ends: nothing left


def test_reset_connections_do_not_disturb_others(running):
    import struct

    r = running()
    with r.connect() as keeper:
        for _ in range(50):
            sock = r.connect()
            sock.sendall(os.urandom(100_000))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        keeper.sendall(b"fine")
        assert read_exactly(keeper, 4) == b"fine"
    assert wait_until(lambda: r.loop.active == 0, 5)


def test_wakeup_fd_makes_run_return(impl):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        rfd, wfd = os.pipe2(os.O_NONBLOCK)
        loop = impl.EventLoop([listener], "echo", wakeup_fd=rfd)
        try:
            os.write(wfd, b"x")
            started = time.monotonic()
            loop.run(5.0)
            assert time.monotonic() - started < 1.0
            with pytest.raises(BlockingIOError):  # the loop drained the pipe
                os.read(rfd, 10)
        finally:
            loop.close()
            os.close(rfd)
            os.close(wfd)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"service": "nope"},
        {"service": "echo", "max_connections": 0},
        {"service": "echo", "max_buffer": 0},
        {"service": "echo", "idle_timeout": -1},
        {"service": "chargen", "pattern": b""},
    ],
)
def test_bad_arguments_are_value_errors(impl, kwargs):
    kwargs = dict(kwargs)
    service = kwargs.pop("service")
    with pytest.raises(ValueError):
        impl.EventLoop([], service, **kwargs)


# -- user protocols --------------------------------------------------------------------


class Recorder:
    """Records every callback; echoes; ``keep_open`` decides eof_received."""

    instances: list[Recorder] = []
    keep_open = False

    def __init__(self) -> None:
        self.calls: list = []
        Recorder.instances.append(self)

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.calls.append(("made", transport.get_extra_info("peername")))

    def data_received(self, data: bytes) -> None:
        self.calls.append(("data", data))
        self.transport.write(data)

    def eof_received(self):
        self.calls.append(("eof",))
        if self.keep_open:
            self.transport.write(b"bye")
            self.transport.close()
        return self.keep_open

    def connection_lost(self, exc) -> None:
        self.calls.append(("lost", type(exc).__name__ if exc else None))


@pytest.fixture
def recorder():
    Recorder.instances = []
    Recorder.keep_open = False
    yield Recorder


def test_protocol_callbacks_in_order(running, recorder):
    r = running("protocol", protocol_factory=recorder)
    with r.connect() as sock:
        sock.sendall(b"one")
        assert read_exactly(sock, 3) == b"one"
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(10) == b""
        peer = sock.getsockname()
    (proto,) = recorder.instances
    assert wait_until(lambda: proto.calls[-1][0] == "lost", 5)
    assert proto.calls == [("made", peer), ("data", b"one"), ("eof",), ("lost", None)]


def test_protocol_that_keeps_open_after_eof_can_still_write(running, recorder):
    recorder.keep_open = True
    r = running("protocol", protocol_factory=recorder)
    with r.connect() as sock:
        sock.sendall(b"x")
        assert read_exactly(sock, 1) == b"x"
        sock.shutdown(socket.SHUT_WR)
        assert read_exactly(sock, 4) == b"bye"  # then end of file
    assert wait_until(lambda: recorder.instances[0].calls[-1] == ("lost", None), 5)


def test_protocol_sees_the_reset(running, recorder):
    import struct

    r = running("protocol", protocol_factory=recorder)
    sock = r.connect()
    sock.sendall(b"x")
    assert read_exactly(sock, 1) == b"x"
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    assert wait_until(lambda: recorder.instances[0].calls[-1][0] == "lost", 5)
    assert recorder.instances[0].calls[-1] == ("lost", "ConnectionResetError")


class Flood:
    """Writes 1 MiB per byte received: a peer that does not read overflows."""

    lost: list = []

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        for _ in data:
            self.transport.write(b"z" * (1 << 20))

    def eof_received(self):
        return False

    def connection_lost(self, exc) -> None:
        Flood.lost.append(type(exc).__name__ if exc else None)


def test_a_protocol_cannot_owe_more_than_max_buffer(running):
    Flood.lost = []
    r = running("protocol", protocol_factory=Flood, max_buffer=1 << 20)
    with r.connect() as sock:
        sock.sendall(b"abcdefgh")  # 8 MiB of replies, never read
        assert wait_until(lambda: Flood.lost == ["BufferError"], 10)
    assert r.loop.active == 0


class Boom:
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        raise RuntimeError("boom")

    def eof_received(self):
        return False

    def connection_lost(self, exc) -> None:
        Boom.lost = exc


def test_a_protocol_exception_closes_its_connection(running, caplog):
    Boom.lost = None
    r = running("protocol", protocol_factory=Boom)
    with r.connect() as sock:
        sock.sendall(b"x")
        sock.settimeout(5)
        assert sock.recv(1) == b""
    assert wait_until(lambda: isinstance(getattr(Boom, "lost", None), RuntimeError), 5)
    assert "handler failed" in caplog.text


def test_close_flushes_what_is_owed_first(running):
    class Big:
        def connection_made(self, transport) -> None:
            transport.write(b"q" * (4 << 20))
            transport.close()

        def data_received(self, data) -> None:
            pass

        def eof_received(self):
            return False

        def connection_lost(self, exc) -> None:
            pass

    r = running("protocol", protocol_factory=Big, max_buffer=8 << 20)
    with r.connect() as sock:
        time.sleep(0.2)
        assert read_exactly(sock, (4 << 20) + 1) == b"q" * (4 << 20)


# -- datagrams ---------------------------------------------------------------------------


@pytest.fixture
def udp_loop(impl):
    """An EventLoop of ``impl`` serving one UDP socket; yields a factory."""
    made = []

    def make(service: str):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        loop = impl.EventLoop([], service, datagram_sockets=[sock], pattern=chargen_pattern(1))
        stop = threading.Event()
        thread = threading.Thread(
            target=lambda: [loop.run(0.05) for _ in iter(stop.is_set, True)], daemon=True
        )
        thread.start()
        made.append((sock, loop, stop, thread))
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.settimeout(5)
        made.append((client, None, None, None))
        return client, sock.getsockname(), loop

    yield make
    for sock, loop, stop, thread in made:
        if stop is not None:
            stop.set()
            thread.join(5)
            loop.close()
        sock.close()


@pytest.mark.parametrize("size", [0, 1, 1000, 9000, 65507])
def test_udp_echo_keeps_datagram_boundaries(udp_loop, size):
    client, address, loop = udp_loop("echo")
    payload = os.urandom(size)
    client.sendto(payload, address)
    data, sender = client.recvfrom(70_000)
    assert data == payload and sender == address


def test_udp_echo_of_a_burst(udp_loop):
    client, address, loop = udp_loop("echo")
    sent = [b"%05d" % i * (i % 7 + 1) for i in range(200)]
    # Bursts of up to 64 in flight: enough for the loop to take them in
    # batches, few enough that the default socket buffers (about 200 KiB,
    # charged ~1 KiB per small datagram) never overflow, so loopback keeps all.
    received = []
    for i, datagram in enumerate(sent):
        client.sendto(datagram, address)
        if i >= 63:
            received.append(client.recvfrom(70_000)[0])
    received += [client.recvfrom(70_000)[0] for _ in range(len(sent) - len(received))]
    assert sorted(received) == sorted(sent)
    total = sum(map(len, sent))
    # The loop counts a reply after sending it, so the client can read the last
    # reply a moment before bytes_out includes it: wait for the counters to settle.
    assert wait_until(lambda: loop.datagrams == 200 and loop.bytes_out == total, 5)
    assert loop.bytes_in == loop.bytes_out == total


def test_udp_discard_daytime_chargen(udp_loop):
    client, address, loop = udp_loop("discard")
    client.sendto(b"gone", address)
    assert wait_until(lambda: loop.datagrams == 1, 5)
    client.settimeout(0.3)
    with pytest.raises(TimeoutError):
        client.recvfrom(100)

    client, address, _ = udp_loop("daytime")
    client.sendto(b"", address)
    assert client.recvfrom(200)[0].endswith(b"-UTC\r\n")

    client, address, _ = udp_loop("chargen")
    pattern = chargen_pattern(1)
    sizes = set()
    for _ in range(40):
        client.sendto(b"?", address)
        reply = client.recvfrom(1000)[0]
        assert len(reply) <= 512 and pattern.startswith(reply)
        sizes.add(len(reply))
    assert len(sizes) > 5  # RFC 864: a random number of characters


def test_udp_is_refused_for_protocols(impl):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        with pytest.raises(ValueError):
            impl.EventLoop([], "protocol", protocol_factory=Recorder, datagram_sockets=[sock])


def test_loop_publishes_heartbeat_and_counters(running):
    stats = bytearray(SLOT_SIZE)
    r = running(stats=stats)

    def counters() -> dict[str, int]:
        values = SLOT.unpack_from(stats)
        return {name: values[SLOT_FIELDS.index(name)] for name in LOOP_COUNTERS}

    with r.connect() as sock:
        sock.sendall(b"12345")
        assert read_exactly(sock, 5) == b"12345"
        expected = dict.fromkeys(LOOP_COUNTERS, 0)
        expected.update(accepted=1, active=1, bytes_in=5, bytes_out=5)
        assert wait_until(lambda: counters() == expected, 5)
    beat = SLOT.unpack_from(stats)[SLOT_FIELDS.index("heartbeat")]
    assert 0 < time.monotonic() - beat < 2  # the same clock as the master's
    assert wait_until(lambda: counters()["active"] == 0, 5)
    assert SLOT.unpack_from(stats)[SLOT_FIELDS.index("pid")] == 0  # the worker's to write


def test_stats_buffer_is_checked(impl):
    with pytest.raises(ValueError):
        impl.EventLoop([], "echo", stats=bytearray(8))
    with pytest.raises(ValueError):
        impl.EventLoop([], "echo", stats=bytes(SLOT_SIZE))


def test_drain_takes_every_queued_connection_as_room_allows(running):
    """drain(): what is queued when a worker leaves is served, not reset,
    even when the loop is full and must wait for room."""
    r = running("echo", max_connections=1)
    busy = r.connect()
    busy.sendall(b"busy")
    assert read_exactly(busy, 4) == b"busy"  # the loop is full: no more accepts
    queued = [r.connect() for _ in range(4)]
    for i, sock in enumerate(queued):
        sock.sendall(b"queued %d" % i)
        sock.shutdown(socket.SHUT_WR)
    r.call("drain")
    time.sleep(0.3)
    assert r.loop.accepting  # still draining: the queue is not empty yet
    busy.close()  # room: the loop takes the queued ones one by one
    for i, sock in enumerate(queued):
        with sock:
            assert read_until_eof(sock) == b"queued %d" % i
    assert wait_until(lambda: not r.loop.accepting, 5)  # queue empty: done
    assert r.loop.accepted == 5


def test_a_recycled_loop_still_drains_when_told_to_stop(running):
    """max_accepts stops accepting but the listeners stay the worker's: what
    queues on them meanwhile is taken by a later drain (a worker told to stop
    while it finishes), not left for a last close to reset."""
    r = running("echo", max_accepts=1)
    busy = r.connect()
    busy.sendall(b"busy")
    assert read_exactly(busy, 4) == b"busy"
    assert wait_until(lambda: r.loop.recycled and not r.loop.accepting, 5)
    queued = r.connect()
    queued.sendall(b"queued")
    queued.shutdown(socket.SHUT_WR)
    time.sleep(0.3)
    assert r.loop.accepted == 1  # recycled: nobody takes it yet
    r.call("drain")
    with queued:
        assert read_until_eof(queued) == b"queued"
    assert wait_until(lambda: not r.loop.accepting and not r.loop.recycled, 5)
    assert r.loop.accepted == 2
    busy.close()


def test_a_stopped_loop_does_not_drain(impl):
    """After stop_accepting the listeners may be closed: drain() leaves them be."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        loop = impl.EventLoop([listener], "echo")
        try:
            loop.stop_accepting()
            with socket.create_connection(listener.getsockname(), timeout=5):
                loop.drain()
                loop.run(0.2)
                assert not loop.accepting and not loop.recycled and loop.accepted == 0
        finally:
            loop.close()


def read_until_eof(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


class NoEof:
    """A protocol that forgot eof_received."""

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)

    def connection_lost(self, exc):
        pass


def test_a_missing_callback_closes_its_connection_only(running, caplog):
    r = running("protocol", protocol_factory=NoEof)
    for _ in range(2):  # the loop lives on
        with r.connect() as sock:
            sock.sendall(b"hi")
            assert read_exactly(sock, 2) == b"hi"
            sock.shutdown(socket.SHUT_WR)
            assert read_until_eof(sock) == b""
    assert "eof_received" in caplog.text


class Broadcast:
    """Whatever one client sends is written to every other client."""

    members: list = []

    def connection_made(self, transport):
        self.transport = transport
        Broadcast.members.append(self)

    def data_received(self, data):
        for member in Broadcast.members:
            if member is not self:
                member.transport.write(data)

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        Broadcast.members.remove(self)


def test_idle_timeout_counts_what_a_protocol_writes(running):
    """A client that only listens is not idle while it is being written to."""
    Broadcast.members = []
    timeout = 0.6
    r = running("protocol", protocol_factory=Broadcast, idle_timeout=timeout)
    with r.connect() as listener, r.connect() as talker:
        assert wait_until(lambda: len(Broadcast.members) == 2, 5)
        for i in range(6):  # 1.5 s in all, a message every 0.25 s
            talker.sendall(b"%d" % i)
            assert read_exactly(listener, 1) == b"%d" % i
            time.sleep(0.25)
        assert r.loop.idle_closed == 0
    assert wait_until(lambda: not Broadcast.members, 5)
    # Silence for real: closed at the timeout. Its one activity is the
    # accept, after our connect began and before connection_made is seen.
    with WakeupProbe() as probe:
        connecting_at = time.monotonic()
        with r.connect() as quiet:
            assert wait_until(lambda: len(Broadcast.members) == 1, 5, interval=0.001)
            accepted_by = time.monotonic()
            assert read_until_eof(quiet) == b""
            closed_at = time.monotonic()
    assert_closed_for_idleness((connecting_at, accepted_by), closed_at, timeout, probe)
    assert r.loop.idle_closed == 1
