"""Signal storms: SIGALRM and SIGCHLD at workers while they echo, and a timer
interrupting the hot loop itself.

What a user is owed: a stray signal is not a reason to die or to lose a
connection. Workers keep their pids, no client sees an error, every echo is
byte-exact, nothing is logged. In the hot loop, a signal that interrupts a
blocking call (EINTR) runs the Python handler and the call carries on, in
both implementations: no ``InterruptedError`` and no lost byte.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Iterator

import pytest

import stalls
from harness import EchoLoad, Stream, payload, scaled, timeout
from stalls import LaggingReader
from support import WORKER_CLASS_ARGS, exchange

STORM = scaled(2.0, 20.0)  # seconds
STORM_SIGNALS = (signal.SIGALRM, signal.SIGCHLD)


def storm(pids: list[int], stop: threading.Event, sent: list[int]) -> None:
    """Alternate SIGALRM and SIGCHLD at every pid, about 2000 a second."""
    while not stop.is_set():
        for sig in STORM_SIGNALS:
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    return  # a worker died: the test reports it
                sent[0] += 1
        time.sleep(0.001)


@pytest.mark.parametrize("worker_class", list(WORKER_CLASS_ARGS))
@timeout(60, 120)
def test_workers_ride_out_sigalrm_and_sigchld_storms(server_factory, worker_class):
    server = server_factory("-w", "2", *WORKER_CLASS_ARGS[worker_class])
    workers = server.wait_workers(2)
    load = EchoLoad(server.tcp(), threads=6, duration=STORM + 20)
    large_errors: list[BaseException] = []
    large_done = [0]
    stop = threading.Event()
    sent = [0]

    def large_echoes() -> None:
        """Big echoes, so signals land while a worker is inside the hot loop."""
        rng = random.Random(3)
        try:
            while not stop.is_set():
                data = payload(rng, rng.randint(1 << 20, 1 << 20 | 65536))
                with server.connect() as sock:
                    assert exchange(sock, data, timeout=20) == data
                large_done[0] += 1
        except BaseException as exc:
            large_errors.append(exc)

    stormer = threading.Thread(target=storm, args=(workers, stop, sent))
    large = threading.Thread(target=large_echoes)
    load.start()
    large.start()
    stormer.start()
    time.sleep(STORM)
    stop.set()
    stormer.join(10)
    large.join(30)
    load.stop()

    assert server.workers() == workers, f"a worker died in the storm\n{server.log}"
    assert "killed by" not in server.log, server.log
    assert not large_errors, large_errors
    assert large_done[0] >= 1
    assert not load.failures, load.failures[:5]
    assert load.corrupt == 0
    assert load.completed > 100
    assert sent[0] > 1000, f"only {sent[0]} signals sent"
    for word in ("Traceback", "InterruptedError", "[ERROR]"):
        assert word not in server.log, server.log


# -- the hot loop itself, interrupted by a timer ---------------------------------------


@contextlib.contextmanager
def itimer_storm(interval: float) -> Iterator[list[float]]:
    """SIGALRM every ``interval`` seconds to this process, with a Python handler
    that records when it ran. pytest-timeout's own alarm is put back after."""
    calls: list[float] = []
    started = time.monotonic()
    old_handler = signal.signal(signal.SIGALRM, lambda *_: calls.append(time.monotonic()))
    old_timer = signal.setitimer(signal.ITIMER_REAL, interval, interval)
    try:
        yield calls
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_timer[0] > 0:
            left = old_timer[0] - (time.monotonic() - started)
            signal.setitimer(signal.ITIMER_REAL, max(left, 0.001), old_timer[1])


def peer(target) -> threading.Thread:
    """A thread that cannot take SIGALRM: the signal interrupts the main thread,
    which is blocked inside the call under test."""

    def run() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        target()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def timed(call) -> tuple[object, float, float]:
    started = time.monotonic()
    result = call()
    return result, started, time.monotonic()


def handled_during(calls: list[float], started: float, ended: float) -> int:
    """Handlers that ran while the call was in progress. For the compiled
    loop that only happens on EINTR: it runs the handlers and retries."""
    return sum(started < t < ended for t in calls)


TOTAL = scaled(4 << 20, 64 << 20)
CHUNK = 64 * 1024
MIN_HANDLED = 20  # the calls last about half a second under a 1 ms timer


def trickle(sock: socket.socket, data: bytes, shut: bool = True) -> None:
    """Send ``data`` in chunks with pauses, so the receiver keeps blocking."""
    for start in range(0, len(data), CHUNK):
        sock.sendall(data[start : start + CHUNK])
        time.sleep(0.0005 if start % (8 * CHUNK) else 0.005)
    if shut:
        sock.shutdown(socket.SHUT_WR)


# The peers below read through small buffers and lag (stalls.LaggingReader):
# the writer blocks in send with part of its bytes queued, the timer's signal
# makes that send return short, and the call must send the rest. Each test
# counts such short sends and requires some: with a reader that keeps up, a
# send never blocks and the signals only ever interrupt receives.


@timeout(60, 300)
def test_echo_retries_eintr_and_stays_byte_exact(impl):
    data = Stream(11).at(0, TOTAL)
    client, server = stalls.unix_pair()
    # A large send buffer on the client's side only: echo reads up to 64 KiB
    # at once, and writing it back through the small buffer takes many bursts.
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 256 * 1024)
    client.settimeout(30)
    with client, server, itimer_storm(0.001) as calls:
        sender = peer(lambda: trickle(client, data))
        reader = LaggingReader(client, threading.get_native_id(), server.fileno())
        result, started, ended = timed(lambda: impl.echo(server, bytearray(65536)))
        reader.writer_returned()
        server.shutdown(socket.SHUT_WR)
        sender.join(30)
        received = reader.join(30)
    assert result == (TOTAL, TOTAL)
    assert received == data
    assert handled_during(calls, started, ended) >= MIN_HANDLED, len(calls)
    assert reader.interrupts.short > 0, reader.interrupts


@timeout(60, 300)
def test_discard_retries_eintr(impl):
    data = Stream(12).at(0, TOTAL)
    client, server = socket.socketpair()
    with client, server, itimer_storm(0.001) as calls:
        sender = peer(lambda: trickle(client, data))
        result, started, ended = timed(lambda: impl.discard(server, bytearray(4096)))
        sender.join(30)
    assert result == (TOTAL, 0)
    assert handled_during(calls, started, ended) >= MIN_HANDLED, len(calls)


@timeout(60, 300)
def test_sendall_retries_eintr_against_a_slow_reader(impl):
    data = Stream(13).at(0, TOTAL)
    client, server = stalls.unix_pair()
    client.settimeout(30)
    with client, server, itimer_storm(0.001) as calls:
        reader = LaggingReader(client, threading.get_native_id(), server.fileno())
        result, started, ended = timed(lambda: impl.sendall(server, data))
        reader.writer_returned()
        server.shutdown(socket.SHUT_WR)
        received = reader.join(30)
    assert result == TOTAL
    assert received == data
    assert handled_during(calls, started, ended) >= MIN_HANDLED, len(calls)
    assert reader.interrupts.short > 0, reader.interrupts


@timeout(60, 300)
def test_chargen_retries_eintr_and_the_stream_is_intact(impl):
    from prefork.server.handlers import chargen_pattern

    pattern = chargen_pattern(4)
    client, server = stalls.unix_pair()
    client.settimeout(30)
    with client, server, itimer_storm(0.001) as calls:
        reader = LaggingReader(client, threading.get_native_id(), server.fileno(), limit=TOTAL)
        (nin, nout), started, ended = timed(lambda: impl.chargen(server, pattern))
        reader.writer_returned()
        received = reader.join(30)
    assert nin == 0 and nout >= TOTAL
    whole = pattern * (len(received) // len(pattern) + 1)
    assert received == whole[: len(received)]
    assert handled_during(calls, started, ended) >= MIN_HANDLED, len(calls)
    assert reader.interrupts.short > 0, reader.interrupts


@timeout(30, 30)
def test_accept_retries_eintr_while_waiting(impl):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        def late_connect() -> None:
            time.sleep(0.3)
            socket.create_connection(listener.getsockname(), timeout=5).close()

        with itimer_storm(0.001) as calls:
            connector = peer(late_connect)
            fd, started, ended = timed(lambda: impl.accept(listener))
            connector.join(10)
        assert isinstance(fd, int)
        os.close(fd)
    assert handled_during(calls, started, ended) >= MIN_HANDLED, len(calls)


@timeout(60, 120)
def test_event_loop_runs_through_a_signal_storm(impl):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        listener.setblocking(False)
        loop = impl.EventLoop([listener], "echo")
        errors: list[BaseException] = []
        echoed = [0]

        def clients() -> None:
            rng = random.Random(5)
            try:
                deadline = time.monotonic() + scaled(1.5, 10.0)
                while time.monotonic() < deadline:
                    data = payload(rng, rng.randint(1, 200_000))
                    with socket.create_connection(listener.getsockname(), timeout=10) as sock:
                        assert exchange(sock, data, timeout=10) == data
                    echoed[0] += 1
            except BaseException as exc:
                errors.append(exc)

        try:
            with itimer_storm(0.001) as calls:
                client = peer(clients)
                runs = 0
                while client.is_alive() and runs < 1000:
                    _, started, ended = timed(lambda: loop.run(0.5))
                    runs += 1
                client.join(10)
        finally:
            loop.close()
    assert not errors, errors
    assert echoed[0] > 10
    assert len(calls) >= MIN_HANDLED


@timeout(30, 30)
def test_master_survives_a_stray_sigalrm(server_factory):
    server = server_factory("-w", "1")
    workers = server.wait_workers(1)
    server.signal(signal.SIGALRM)
    time.sleep(0.5)
    assert server.proc.poll() is None, f"master exited: {server.proc.returncode}"
    assert server.workers() == workers
    with server.connect() as sock:
        assert exchange(sock, b"still here") == b"still here"
