"""Signals that reach the master while it stops: only INT and QUIT still count."""

from __future__ import annotations

import signal
import socket
import time

import pytest

from support import WORKER_CLASS_ARGS, pid_alive, wait_until

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("k", ["event", "sync", "asyncio"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGQUIT])
def test_int_or_quit_during_a_graceful_stop_makes_it_fast(server_factory, k, sig):
    server = server_factory("-w", "1", "--graceful-timeout", "60", *WORKER_CLASS_ARGS[k])
    (worker,) = server.wait_workers(1)
    with server.connect() as sock:
        sock.sendall(b"hold")
        assert sock.recv(4) == b"hold"  # the worker now waits for this connection
        server.signal(signal.SIGTERM)
        assert wait_until(lambda: "graceful stop" in server.log, 5), server.log
        time.sleep(0.3)
        assert server.proc.poll() is None  # waiting for our connection, up to 60 s
        started = time.monotonic()
        server.signal(sig)
        assert server.wait(10) == 0
        assert time.monotonic() - started < 4  # QUIT, not the KILL after 5 s
        sock.settimeout(5)
        try:
            assert sock.recv(10) == b""
        except ConnectionResetError:
            pass
    assert not pid_alive(worker)
    assert server.log.index("graceful stop") < server.log.index("fast stop")
    assert "killing" not in server.log


def test_other_signals_are_ignored_while_stopping(server_factory):
    server = server_factory("-w", "1", "--graceful-timeout", "60")
    server.wait_workers(1)
    with server.connect() as sock:
        sock.sendall(b"hold")
        assert sock.recv(4) == b"hold"
        server.signal(signal.SIGTERM)
        assert wait_until(lambda: "graceful stop" in server.log, 5), server.log
        for sig in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1, signal.SIGTERM):
            server.signal(sig)
        time.sleep(0.5)
        assert server.proc.poll() is None
        assert len(server.workers()) == 1  # no new generation, no extra worker
        sock.sendall(b"done")
        assert sock.recv(4) == b"done"  # the connection is still served
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(10) == b""
    assert server.wait(15) == 0
    after = server.log[server.log.index("graceful stop") :]
    for line in ("HUP:", "TTIN:", "TTOU:", "USR1:", "fast stop"):
        assert line not in after, server.log
