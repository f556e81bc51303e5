"""Worker classes as real servers: scale, fair accept, limits, EMFILE, threads."""

from __future__ import annotations

import os
import platform
import re
import resource
import selectors
import socket
import subprocess
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefork._fastio_common import SWEEP_INTERVAL

from support import (
    EPOLL_RESOLUTION,
    KeepTalking,
    WakeupProbe,
    anon_bytes,
    connections_per_worker,
    cpu_seconds,
    owed_memory_bound,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)


def raise_descriptor_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.fail(f"descriptor limit {hard} < {needed}: cannot run this test here")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def echo_all(socks: list[socket.socket], payload_for, timeout: float = 60) -> None:
    """Send each socket its payload and check each echo, all concurrently."""
    sel = selectors.DefaultSelector()
    expected = {}
    for i, sock in enumerate(socks):
        sock.setblocking(False)
        data = payload_for(i)
        sock.send(data)  # small: fits the socket buffer
        expected[sock] = [data, bytearray()]
        sel.register(sock, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while expected and time.monotonic() < deadline:
        for key, _ in sel.select(1.0):
            sock = key.fileobj
            data, got = expected[sock]
            chunk = sock.recv(65536)
            assert chunk, "server closed a connection"
            got += chunk
            if len(got) >= len(data):
                assert bytes(got) == data
                sel.unregister(sock)
                del expected[sock]
    sel.close()
    assert not expected, f"{len(expected)} connections got no echo"


def test_five_thousand_connections_through_one_worker(server_factory):
    count = 5000
    raise_descriptor_limit(2 * count + 200)  # the server inherits it too
    server = server_factory(
        "-w", "1", "-k", "event", "--max-connections", str(count + 100), "--backlog", "4096"
    )
    server.wait_workers(1)
    socks = []
    try:
        for _ in range(count):
            socks.append(server.connect())
        echo_all(socks, lambda i: b"%d " % i * 20)
        (worker,) = server.workers()
        assert connections_per_worker(server.tcp()[1]) == {worker: count}
    finally:
        for sock in socks:
            sock.close()


def wait_until_all_accept(server, workers: list[int]) -> None:
    """Hold connections until each of ``workers`` owns one. A worker that
    wait_workers counts may still be booting (importing, building its loop);
    on a busy machine that takes long enough for the others to serve a
    hundred connections, and a fairness figure taken meanwhile measures the
    boot, not the accept (seen under two CPU hogs: 67, 26, 7 and 0)."""
    port = server.tcp()[1]
    held = []
    deadline = time.monotonic() + 20
    try:
        while set(connections_per_worker(port)) != set(workers):
            assert time.monotonic() < deadline, connections_per_worker(port)
            sock = server.connect()
            sock.sendall(b"x")
            assert sock.recv(1) == b"x"
            held.append(sock)
    finally:
        for sock in held:
            sock.close()


# The numbers /proc/PID/syscall shows while a worker waits: epoll_wait,
# epoll_pwait and epoll_pwait2 (arm64 has no plain epoll_wait).
EPOLL_WAIT_CALLS = {"x86_64": {232, 281, 441}, "aarch64": {22, 441}}.get(platform.machine(), set())


def wait_until_idle_in_epoll(workers: list[int]) -> None:
    """Wait until every worker is blocked in epoll_wait (its main thread's
    /proc/PID/syscall). The kernel hands an exclusive wake-up to the first
    *waiting* worker on the listener's queue; a worker still finishing its
    last connection, or runnable but not yet given a core by a busy machine,
    is passed over, and the spread would measure the scheduler instead of
    the loop's re-arm. Waiting for all of them makes every accept a choice
    among idle workers, which is what "idle workers take turns" promises."""
    assert EPOLL_WAIT_CALLS, f"epoll_wait's syscall numbers unknown on {platform.machine()}"
    deadline = time.monotonic() + 30
    while True:
        numbers = []
        for pid in workers:
            with open(f"/proc/{pid}/syscall") as f:
                first = f.read().split(" ", 1)[0]
            numbers.append(int(first) if first.lstrip("-").isdigit() else first)
        if all(n in EPOLL_WAIT_CALLS for n in numbers):
            return
        assert time.monotonic() < deadline, f"workers not idle in epoll_wait: {numbers}"
        time.sleep(0.001)


def test_accepts_are_spread_fairly_over_workers(server_factory):
    server = server_factory("-w", "4", "-k", "event")
    workers = server.wait_workers(4)
    wait_until_all_accept(server, workers)
    socks = []
    try:
        for _ in range(100):
            wait_until_idle_in_epoll(workers)
            sock = server.connect()
            sock.sendall(b"x")
            assert sock.recv(1) == b"x"  # accepted and served before the next
            socks.append(sock)
        counts = connections_per_worker(server.tcp()[1])
        print(f"\naccepts per worker: {sorted(counts.values())}")
        assert sorted(counts) == sorted(workers), counts
        assert max(counts.values()) <= 1.5 * min(counts.values()), counts
    finally:
        for sock in socks:
            sock.close()


def test_max_connections_spills_over_to_other_workers(server_factory):
    server = server_factory("-w", "2", "-k", "event", "--max-connections", "3")
    workers = server.wait_workers(2)
    socks = [server.connect() for _ in range(6)]
    try:
        echo_all(socks, lambda i: b"conn %d" % i)
        counts = connections_per_worker(server.tcp()[1])
        assert counts == {workers[0]: 3, workers[1]: 3}
        # A seventh waits in the backlog (not accepted and dropped) until one leaves.
        extra = server.connect()
        extra.sendall(b"7th")
        extra.settimeout(0.5)
        with pytest.raises(TimeoutError):
            extra.recv(3)
        socks[0].close()
        extra.settimeout(10)
        assert extra.recv(3) == b"7th"
        extra.close()
    finally:
        for sock in socks:
            sock.close()


def test_out_of_descriptors_backs_off_without_spinning(server_factory):
    limit = 64

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    server = server_factory("-w", "1", "-k", "event", "--backlog", "256", preexec_fn=low_limit)
    (worker,) = server.wait_workers(1)
    socks = [server.connect() for _ in range(2 * limit)]
    try:
        assert wait_until(lambda: "out of file descriptors" in server.log, 5), server.log
        before = cpu_seconds(worker)
        time.sleep(2.0)
        used = cpu_seconds(worker) - before
        assert used < 0.2, f"worker used {used:.2f}s of CPU in 2s while out of descriptors"
        assert server.log.count("out of file descriptors") <= 6  # at most about once a second
        assert server.workers() == [worker]
    finally:
        for sock in socks:
            sock.close()
    # Descriptors free up: service resumes.
    with server.connect() as sock:
        sock.sendall(b"back")
        sock.settimeout(10)
        assert sock.recv(4) == b"back"


def test_thread_worker_serves_one_connection_per_thread(server_factory):
    server = server_factory("-w", "1", "-k", "thread", "--threads", "4")
    (worker,) = server.wait_workers(1)
    socks = [server.connect() for _ in range(4)]
    try:
        echo_all(socks, lambda i: b"thread %d" % i)  # all four at once, one process
        assert connections_per_worker(server.tcp()[1]) == {worker: 4}
        fifth = server.connect()  # queued until a thread is free
        fifth.sendall(b"5th")
        fifth.settimeout(0.5)
        with pytest.raises(TimeoutError):
            fifth.recv(3)
        socks[0].close()
        fifth.settimeout(10)
        assert fifth.recv(3) == b"5th"
        fifth.close()
    finally:
        for sock in socks:
            sock.close()


def test_udp_and_tcp_on_the_same_port(server_factory):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = server_factory("-w", "2", "-b", f"udp://127.0.0.1:{port}", "-b", f"127.0.0.1:{port}")
    assert server.addresses == [f"udp://127.0.0.1:{port}", f"127.0.0.1:{port}"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(5)
        for size in (1, 512, 65507):
            payload = os.urandom(size)
            udp.sendto(payload, ("127.0.0.1", port))
            assert udp.recvfrom(70_000)[0] == payload
    with server.connect(1) as tcp:
        tcp.sendall(b"stream")
        assert tcp.recv(6) == b"stream"


def test_udp_on_ipv6(server_factory):
    server = server_factory("-w", "1", "-b", "udp://[::1]:0")
    host, port = server.addresses[0].removeprefix("udp://").rsplit(":", 1)
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as udp:
        udp.settimeout(5)
        udp.sendto(b"six", (host.strip("[]"), int(port)))
        assert udp.recvfrom(100)[0] == b"six"


@pytest.fixture(scope="module")
def event_server():
    from support import start_server

    server = start_server("-w", "2", "-k", "event", "--idle-timeout", "1")
    yield server
    server.kill_all()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    chunks=st.lists(st.integers(1, 100_000), min_size=1, max_size=12),
    read_size=st.integers(1, 70_000),
)
def test_event_server_echo_is_byte_exact_under_random_chunking(event_server, chunks, read_size):
    payload = os.urandom(sum(chunks))

    def send_chunks(sock: socket.socket) -> None:
        offset = 0
        for size in chunks:
            sock.sendall(payload[offset : offset + size])
            offset += size
        sock.shutdown(socket.SHUT_WR)

    with event_server.connect() as sock:
        sender = threading.Thread(target=send_chunks, args=(sock,))
        sender.start()
        received = bytearray()
        while data := sock.recv(read_size):
            received += data
        sender.join(10)
    assert bytes(received) == payload


def test_event_server_closes_idle_connections(event_server):
    """--idle-timeout 1 in a real worker, while another connection keeps it busy.

    The bounds are the ones tests/test_eventloop.py derives for the loop: no
    earlier than the timeout after the last byte (strict: the test's clock
    before it was sent is earlier than the worker's stamp of it); no later
    than the timeout after the echo came back, plus one sweep interval, the
    epoll wait's millisecond rounding and two wake-ups (the worker's at its
    sweep, ours at end of file) as long as the probe measured them, or as
    long as the busy connection's longest round trip (the same wake-ups and
    the worker's work between them) if that is longer.
    """
    timeout = 1.0  # the event_server's --idle-timeout
    sweep = min(SWEEP_INTERVAL, timeout / 2)
    with WakeupProbe() as probe, event_server.connect() as idle:
        with event_server.connect() as busy, KeepTalking(busy, timeout / 10) as talking:
            sent_at = time.monotonic()
            idle.sendall(b"x")
            assert idle.recv(1) == b"x"
            echoed_at = time.monotonic()
            idle.settimeout(timeout * 10)
            assert idle.recv(1) == b""
            closed_at = time.monotonic()
        assert talking.failure is None and talking.pings > 0, talking.failure
    bound = timeout + sweep + EPOLL_RESOLUTION + probe.allowance(2, talking.worst_rtt)
    print(
        f"\nidle close: {closed_at - sent_at:.4f}s after the send, "
        f"{closed_at - echoed_at:.4f}s after the echo, bound {bound:.4f}s ({probe}, "
        f"round trip {talking.worst_rtt * 1e3:.2f} ms)"
    )
    assert closed_at - sent_at >= timeout, closed_at - sent_at
    assert closed_at - echoed_at <= bound, (closed_at - echoed_at, bound, str(probe))


def listening_sockets(port: int) -> int:
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    return len(out.splitlines())


def queue_behind(server, victim: int) -> list[socket.socket]:
    """Stop ``victim`` (SIGSTOP) and open 40 connections, each sending two
    digits and half-closing; return them all once some wait in the victim's
    own --reuse-port queue (the others are answered by the other workers)."""
    import signal

    os.kill(victim, signal.SIGSTOP)
    socks = []
    for i in range(40):
        sock = server.connect()
        sock.sendall(b"%02d" % i)
        sock.shutdown(socket.SHUT_WR)  # so a sync worker can finish it and go on
        socks.append(sock)
    time.sleep(0.5)
    sel = selectors.DefaultSelector()
    for sock in socks:
        sel.register(sock, selectors.EVENT_READ)
    answered = {key.fileobj for key, _ in sel.select(0)}
    sel.close()
    assert len(answered) < len(socks), "the kernel hashed no connection to the stopped worker"
    return socks


def assert_all_answered(socks: list[socket.socket]) -> None:
    for i, sock in enumerate(socks):
        sock.settimeout(10)
        assert sock.recv(2) == b"%02d" % i
        assert sock.recv(1) == b""


def position_of(server, position: int) -> int:
    """The pid of the worker last spawned in ``position`` (--log-level debug).
    The log is read by a thread: the line may come a moment after the worker."""
    pattern = rf"\(pid (\d+)\) in position {position}\b"
    assert wait_until(lambda: re.search(pattern, server.log), 10), server.log
    return int(re.findall(pattern, server.log)[-1])


@pytest.mark.parametrize("k", [["-k", "event"], ["-k", "sync"], ["-k", "asyncio"]])
def test_reuse_port_respawned_worker_inherits_its_slot_queue(server_factory, k):
    import signal

    server = server_factory("-w", "2", *k, "--reuse-port")
    workers = server.wait_workers(2)
    port = server.tcp()[1]
    assert listening_sockets(port) == 2  # one SO_REUSEPORT socket per worker slot
    victim = workers[0]
    socks = queue_behind(server, victim)
    try:
        os.kill(victim, signal.SIGKILL)  # its queue stays with the master: nothing is reset
        assert wait_until(lambda: victim not in server.workers(), 5)
        server.wait_workers(2)
        assert_all_answered(socks)
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.parametrize("k", [["-k", "event"], ["-k", "sync"], ["-k", "asyncio"]])
def test_reuse_port_ttou_serves_a_queue_its_worker_left_behind(server_factory, k):
    """TTOU retires the highest position while connections wait in its queue
    and its worker dies without taking them (as one that stopped accepting
    at --max-requests and then ended would): the master must not close the
    sockets on them, but fork a worker there to serve them."""
    import signal

    server = server_factory("-w", "2", *k, "--reuse-port", "--log-level", "debug")
    server.wait_workers(2)
    port = server.tcp()[1]
    victim = position_of(server, 1)
    socks = queue_behind(server, victim)
    try:
        server.signal(signal.SIGTTOU)  # TERM to the victim stays pending while it is stopped
        assert wait_until(lambda: "TTOU: 1 worker(s)" in server.log, 5)
        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: victim not in server.workers(), 5)
        assert_all_answered(socks)
        assert wait_until(lambda: listening_sockets(port) == 1, 10)
        server.wait_workers(1)
        assert "retired position 1: connections queued after its workers left" in server.log
        assert "with connections queued" not in server.log
    finally:
        for sock in socks:
            sock.close()


def test_reuse_port_hup_to_fewer_workers_retires_the_extra_positions(server_factory, tmp_path):
    """A HUP that lowers the worker count retires the positions above it as
    TTOU does: what waits in their queues is served, then their sockets go."""
    import signal

    config = tmp_path / "prefork.toml"
    config.write_text("workers = 3\nreuse-port = true\n")
    server = server_factory("-c", str(config), "--log-level", "debug")
    server.wait_workers(3)
    port = server.tcp()[1]
    assert listening_sockets(port) == 3
    socks = queue_behind(server, position_of(server, 2))
    try:
        config.write_text("workers = 1\nreuse-port = true\n")
        server.signal(signal.SIGHUP)
        assert wait_until(lambda: "HUP: generation 1 started" in server.log, 5), server.log
        os.kill(position_of(server, 2), signal.SIGCONT)  # it takes its queue as it stops
        assert_all_answered(socks)
        assert wait_until(lambda: listening_sockets(port) == 1, 10)
        server.wait_workers(1)
        with server.connect() as sock:
            sock.sendall(b"ok")
            assert sock.recv(2) == b"ok"
    finally:
        for sock in socks:
            sock.close()


def test_reuse_port_ttou_closes_the_unused_slot(server_factory):
    import signal

    server = server_factory("-w", "3", "--reuse-port")
    server.wait_workers(3)
    port = server.tcp()[1]
    assert listening_sockets(port) == 3
    server.signal(signal.SIGTTOU)
    server.wait_workers(2)
    assert wait_until(lambda: listening_sockets(port) == 2, 5)
    server.signal(signal.SIGTTIN)
    server.wait_workers(3)
    assert wait_until(lambda: listening_sockets(port) == 3, 5)
    for _ in range(10):
        with server.connect() as sock:
            sock.sendall(b"ok")
            assert sock.recv(2) == b"ok"


def push_without_reading(sock: socket.socket, payload: bytes, seconds: float) -> int:
    """Send ``payload`` for ``seconds`` without reading; return how much went."""
    sock.setblocking(False)
    sent = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and sent < len(payload):
        try:
            sent += sock.send(payload[sent : sent + 65536])
        except BlockingIOError:
            time.sleep(0.01)
    sock.setblocking(True)
    return sent


def echo_while_reading(sock: socket.socket, payload: bytes) -> None:
    """Echo ``payload`` in 64 KiB pieces, each read back before the next: the
    same traffic as a non-reader's, with nothing left owed."""
    for offset in range(0, len(payload), 65536):
        piece = payload[offset : offset + 65536]
        sock.sendall(piece)
        got = bytearray()
        while len(got) < len(piece):
            chunk = sock.recv(len(piece) - len(got))
            assert chunk, "closed before the echo"
            got += chunk
        assert got == piece


@pytest.mark.parametrize("max_buffer", [16 << 10, 256 << 10])
def test_peer_that_never_reads_keeps_the_worker_small(server_factory, max_buffer):
    """One peer that never reads costs the worker at most what it is owed.

    Counted as anonymous resident memory: owed bytes live there, while the
    interpreter's file pages read in the first time some of its code runs
    are not backlog (with TCP_NODELAY, 64 KiB of libpython's read-only data
    came in during the push). The bound is owed_memory_bound(1 client,
    --max-buffer) plus a measured baseline: how far that memory moved while
    the same connection echoed the same amount of traffic with a reader
    (allocator churn, the tick's bookkeeping), nothing of which is backlog.
    """
    server = server_factory("-w", "1", "--max-buffer", str(max_buffer))
    (worker,) = server.wait_workers(1)
    payload = os.urandom(1 << 20) * 64  # 64 MiB
    with server.connect() as sock:
        sock.settimeout(30)
        echo_while_reading(sock, payload[: 8 << 20])  # warm: every buffer the loop needs
        before = anon_bytes(worker)
        echo_while_reading(sock, payload[: 8 << 20])
        baseline = max(0, anon_bytes(worker) - before)
        start = anon_bytes(worker)
        sent = push_without_reading(sock, payload, 2.0)
        assert sent < len(payload)  # the server stopped reading: backpressure
        growth = anon_bytes(worker) - start
        bound = owed_memory_bound(1, max_buffer) + baseline
        print(
            f"\nnon-reader: RSS +{growth >> 10} KiB, "
            f"bound {bound >> 10} KiB ({baseline >> 10} KiB measured)"
        )
        assert growth <= bound, f"worker RSS grew {growth} bytes, bound {bound}"
        rest = threading.Thread(
            target=lambda: (sock.sendall(payload[sent:]), sock.shutdown(socket.SHUT_WR))
        )
        rest.start()
        received = bytearray()
        while data := sock.recv(1 << 20):
            received += data
        rest.join(30)
    assert received == payload  # then everything comes back intact
