"""Descriptor exhaustion: a server under RLIMIT_NOFILE 64 with three times as
many clients as it has descriptors.

What a user is owed: running out of descriptors is a state to wait out, not a
loop to spin in or a reason to die. While saturated, every worker uses less
than 10% of a CPU (utime + stime from /proc over an interval), the master too;
no worker dies; the EMFILE message is rate-limited; and as clients leave, the
ones that waited in the backlog are served, then new ones.
"""

from __future__ import annotations

import resource
import socket
import time

import pytest

from harness import scaled, timeout
from support import cpu_seconds, wait_until

LIMIT = 64
CLIENTS = 3 * LIMIT
WORKERS = 2
INTERVAL = scaled(2.0, 20.0)  # seconds of saturation measured
MAX_CPU = 0.10  # of one CPU, per process
WORKER_ARGS = {
    "event": ["-k", "event"],
    # More threads than descriptors: the threads themselves run out.
    "thread": ["-k", "thread", "--threads", str(LIMIT + 16)],
}


def low_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))


def emfile_messages(server) -> int:
    # event: "accept: out of file descriptors (N times)"; sync and thread:
    # "accept: Too many open files; backing off"
    return sum(
        "accept: out of file descriptors" in line or "accept: Too many open files" in line
        for line in server.lines
    )


def echoes(sock: socket.socket, data: bytes, wait: float) -> bool:
    sock.settimeout(wait)
    try:
        sock.sendall(data)
        received = b""
        while len(received) < len(data):
            chunk = sock.recv(len(data) - len(received))
            if not chunk:
                return False
            received += chunk
        return received == data
    except TimeoutError:
        return False


@pytest.mark.parametrize("worker_class", list(WORKER_ARGS))
@timeout(90, 180)
def test_out_of_descriptors_waits_without_spinning_and_recovers(server_factory, worker_class):
    server = server_factory(
        "-w",
        str(WORKERS),
        "--backlog",
        str(4 * CLIENTS),
        *WORKER_ARGS[worker_class],
        preexec_fn=low_limit,
    )
    workers = server.wait_workers(WORKERS)
    socks = [server.connect(timeout=10) for _ in range(CLIENTS)]
    try:
        for i, sock in enumerate(socks):  # the accepted ones answer; the rest are queued
            sock.sendall(b"client %d\n" % i)
        assert wait_until(lambda: emfile_messages(server) > 0, 5), server.log
        time.sleep(0.5)  # the first burst of accepts is over: this is the steady state
        processes = [server.pid, *workers]
        before = {pid: cpu_seconds(pid) for pid in processes}
        started = time.monotonic()
        time.sleep(INTERVAL)
        elapsed = time.monotonic() - started
        used = {pid: (cpu_seconds(pid) - before[pid]) / elapsed for pid in processes}
        print(
            f"\n{worker_class}: CPU share while saturated "
            + ", ".join(f"{pid}: {share:.1%}" for pid, share in used.items())
        )
        assert all(share < MAX_CPU for share in used.values()), (
            f"CPU share while saturated: {used} (master {server.pid})"
        )
        assert server.workers() == workers, "a worker died out of descriptors"
        errors = emfile_messages(server)
        assert errors <= WORKERS * (INTERVAL + 2), f"{errors} EMFILE messages: not rate-limited"

        # Half the clients leave; the rest, most of them queued until now, are served.
        for sock in socks[: CLIENTS // 2]:
            sock.close()
        for i, sock in enumerate(socks[CLIENTS // 2 :], CLIENTS // 2):
            data = b"client %d\n" % i
            sock.settimeout(15)
            received = b""
            while len(received) < len(data):
                chunk = sock.recv(64)
                assert chunk, f"client {i} was closed, not served"
                received += chunk
            assert received == data, i
    finally:
        for sock in socks:
            sock.close()
    # Everyone left: a new client is served at once.
    with server.connect() as sock:
        assert echoes(sock, b"back to normal", 10)
    assert server.workers() == workers
    assert "Traceback" not in server.log, server.log
