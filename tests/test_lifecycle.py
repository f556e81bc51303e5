"""Lifecycle: reloads, recycling, and not one connection lost through them."""

from __future__ import annotations

import os
import re
import signal
import socket
import time

import pytest

from support import (
    TESTS_DIR,
    WORKER_CLASS_ARGS,
    ConnectEchoLoad,
    exchange,
    handler_env,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)


def reload_env(path) -> dict[str, str]:
    env = handler_env(path)
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # a rewritten module is read again, not a stale .pyc
    return env


PROTOCOL = """
class Case:
    def connection_made(self, transport):
        self.transport = transport
    def data_received(self, data):
        self.transport.write(data.{method}())
    def eof_received(self):
        return False
    def connection_lost(self, exc):
        pass
"""


@pytest.mark.parametrize("k", list(WORKER_CLASS_ARGS))
def test_hup_reimports_the_handler(server_factory, tmp_path, k):
    module = tmp_path / "casing.py"
    module.write_text(PROTOCOL.format(method="upper"))
    server = server_factory(
        "-w", "2", *WORKER_CLASS_ARGS[k], "--handler", "casing:Case", env=reload_env(tmp_path)
    )
    old = server.wait_workers(2)
    with server.connect() as sock:
        assert exchange(sock, b"MiXeD") == b"MIXED"
    module.write_text(PROTOCOL.format(method="lower"))
    server.signal(signal.SIGHUP)
    assert wait_until(lambda: not set(server.workers()) & set(old), 10), server.log
    with server.connect() as sock:
        assert exchange(sock, b"MiXeD") == b"mixed"


def test_hup_with_a_broken_handler_keeps_the_running_workers(server_factory, tmp_path):
    module = tmp_path / "casing2.py"
    module.write_text(PROTOCOL.format(method="upper"))
    server = server_factory("-w", "2", "--handler", "casing2:Case", env=reload_env(tmp_path))
    old = server.wait_workers(2)
    module.write_text("this is not python (\n")
    server.signal(signal.SIGHUP)
    assert wait_until(lambda: "HUP: reload failed" in server.log, 5), server.log
    assert "SyntaxError" in server.log
    time.sleep(0.3)
    assert sorted(server.workers()) == sorted(old)
    with server.connect() as sock:
        assert exchange(sock, b"still") == b"STILL"


@pytest.mark.parametrize("k", list(WORKER_CLASS_ARGS))
def test_max_requests_recycles_workers(server_factory, k):
    server = server_factory("-w", "1", *WORKER_CLASS_ARGS[k], "--max-requests", "5")
    seen = set()
    # A leaving worker also serves what is already queued when it stops
    # accepting, so a worker may serve a few more than 5: give it room.
    for i in range(30):
        with server.connect() as sock:
            assert exchange(sock, b"%d" % i) == b"%d" % i
        seen.update(server.workers())
    assert wait_until(lambda: server.log.count("recycled after 5 connections") >= 3, 10), server.log
    assert len(seen) >= 3


def test_max_requests_jitter(server_factory):
    server = server_factory(
        "-w", "1", "-k", "sync", "--max-requests", "3", "--max-requests-jitter", "4"
    )
    for _ in range(40):
        with server.connect() as sock:
            assert exchange(sock, b"x") == b"x"
    counts = [int(n) for n in re.findall(r"recycled after (\d+) connections?\b", server.log)]
    assert counts and all(3 <= n <= 7 for n in counts), counts
    assert len(set(counts)) > 1  # jitter: not all the same


ALL_ACTIONS = [
    signal.SIGHUP,
    signal.SIGTTIN,
    signal.SIGHUP,
    signal.SIGTTOU,
    signal.SIGTTOU,
    signal.SIGHUP,
    signal.SIGTTIN,
]
# With --reuse-port, TTOU retires a worker position: its socket stops taking
# new connections (they land on the others), its worker takes what is queued,
# and only then is the socket closed.
ZERO_DROP_CASES = {
    "event": (["-k", "event"], ALL_ACTIONS),
    "sync": (["-k", "sync"], ALL_ACTIONS),
    "thread": (["-k", "thread", "--threads", "2"], ALL_ACTIONS),
    "event-reuse-port": (["-k", "event", "--reuse-port"], ALL_ACTIONS),
    "sync-reuse-port": (["-k", "sync", "--reuse-port"], ALL_ACTIONS),
    "asyncio": (["-k", "asyncio", "--loop", "asyncio"], ALL_ACTIONS),
    # auto: uvloop when it is installed, asyncio otherwise
    "asyncio-auto": (["-k", "asyncio", "--loop", "auto"], ALL_ACTIONS),
    "asyncio-auto-reuse-port": (["-k", "asyncio", "--loop", "auto", "--reuse-port"], ALL_ACTIONS),
}


@pytest.mark.parametrize("case", list(ZERO_DROP_CASES))
def test_no_connection_is_lost_through_reloads_scaling_and_recycling(server_factory, case):
    options, actions = ZERO_DROP_CASES[case]
    server = server_factory(
        "-w", "3", *options, "--max-requests", "60", "--max-requests-jitter", "20"
    )
    server.wait_workers(3)
    with ConnectEchoLoad(server) as load:
        for sig in actions:
            time.sleep(0.6)
            server.signal(sig)
        time.sleep(1.0)
    failures, done = load.failures, load.done
    assert not failures, (failures[:5], server.log[-3000:])
    assert sum(done) > 100, done
    assert server.log.count("generation") >= 3
    assert "recycled after" in server.log, "no worker was recycled under this load"


@pytest.mark.parametrize("k", ["event", "sync", "thread", "asyncio"])
def test_graceful_term_serves_the_connections_already_queued(server_factory, k):
    """Connections waiting in the listen queue when TERM comes are served,
    not reset: the master stops new ones from queueing, the workers take
    what is queued before they let go of the listeners."""
    server = server_factory("-w", "1", "-k", k, "--max-connections", "1")
    server.wait_workers(1)
    busy = server.connect()
    assert exchange_part(busy, b"busy") == b"busy"  # the worker is now full
    queued = [server.connect() for _ in range(5)]  # accepted by the kernel only
    for i, sock in enumerate(queued):
        sock.sendall(b"queued %d" % i)
        sock.shutdown(socket.SHUT_WR)
    server.signal(signal.SIGTERM)
    time.sleep(0.3)
    busy.close()  # frees the worker: it serves the queue, then exits
    for i, sock in enumerate(queued):
        with sock:
            sock.settimeout(20)
            received = b""
            while chunk := sock.recv(100):
                received += chunk
            assert received == b"queued %d" % i
    assert server.wait(20) == 0


def exchange_part(sock, data: bytes) -> bytes:
    sock.sendall(data)
    return sock.recv(len(data))


def test_crashing_workers_are_respawned_with_a_growing_delay(server_factory):
    env = handler_env(TESTS_DIR)
    server = server_factory("-w", "1", "--handler", "handlers.faulty:CrashOnConnect", env=env)
    server.wait_workers(1)
    socks = [server.connect() for _ in range(6)]  # each one takes a worker down
    try:
        assert wait_until(lambda: "crashed 5 times in a row" in server.log, 20), server.log
        delays = [float(d) for d in re.findall(r"next respawn in ([\d.]+)s", server.log)]
        assert delays[:5] == [0.1, 0.2, 0.4, 0.8, 1.6]
        assert "exited with code 70" in server.log
        assert server.proc.poll() is None  # the master itself carries on
    finally:
        for sock in socks:
            sock.close()


def test_a_worker_killed_from_outside_is_replaced_at_once(server_factory):
    server = server_factory("-w", "2")
    workers = server.wait_workers(2)
    for pid in workers:  # SIGKILL is an operator's act, not a crash loop
        os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not set(server.workers()) & set(workers), 5)
    new = server.wait_workers(2, timeout=5)
    assert not set(new) & set(workers)
    assert "crashed" not in server.log


def faulty_env() -> dict[str, str]:
    return handler_env(TESTS_DIR)


@pytest.mark.parametrize(
    ("k", "handler", "frame"),
    [
        (["-k", "event"], "handlers.faulty:HangOnData", "data_received"),
        (["-k", "sync"], "handlers.faulty:HangOnData", "data_received"),
        (["-k", "sync"], "handlers.faulty:hang_handle", "hang_handle"),
    ],
)
def test_a_stuck_worker_is_dumped_and_replaced_within_timeout(server_factory, k, handler, frame):
    timeout = 2.0
    server = server_factory(
        "-w", "1", *k, "--timeout", str(timeout), "--handler", handler, env=faulty_env()
    )
    (stuck,) = server.wait_workers(1)
    with server.connect() as sock:
        sock.sendall(b"x")
        started = time.monotonic()
        assert wait_until(lambda: stuck not in server.workers() and server.workers(), 10)
        replaced_after = time.monotonic() - started
    assert replaced_after <= timeout + 1.0, replaced_after
    assert wait_until(lambda: f"in {frame}" in server.log, 5), server.log  # the stack dump
    assert re.search(r"silent for \d+\.\ds with 1 active connection", server.log), server.log
    assert "crashed" not in server.log  # killed by the watchdog, not a crash loop


@pytest.mark.parametrize("k", [["-k", "event"], ["-k", "sync"], ["-k", "thread"]])
def test_idle_connections_are_not_silence(server_factory, k):
    server = server_factory("-w", "1", *k, "--timeout", "1")
    (worker,) = server.wait_workers(1)
    with server.connect() as sock:
        sock.sendall(b"a")
        assert sock.recv(1) == b"a"
        time.sleep(2.5)  # the client says nothing for longer than --timeout
        sock.sendall(b"b")
        assert sock.recv(1) == b"b"
    assert server.workers() == [worker]
    assert "silent for" not in server.log
