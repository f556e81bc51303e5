"""What the master logs about HUP, USR1 and the workers it reaps: what
changed, what was done, and figures that were really counted."""

from __future__ import annotations

import re
import signal
import socket

import pytest

from support import exchange, handler_env, wait_until

pytestmark = pytest.mark.timeout(90)


def test_hup_logs_what_changed(server_factory, tmp_path):
    config = tmp_path / "prefork.toml"
    config.write_text('workers = 2\nhandler = "echo"\n')
    server = server_factory("-c", str(config))
    old = server.wait_workers(2)
    config.write_text('workers = 3\nhandler = "daytime"\ngraceful-timeout = 12.5\n')
    server.signal(signal.SIGHUP)
    assert wait_until(lambda: "generation 1 started" in server.log, 15), server.log
    expected = "HUP: workers 2 -> 3, graceful-timeout 30 -> 12.5, handler echo -> daytime"
    assert expected in server.log, server.log
    assert wait_until(lambda: not set(server.workers()) & set(old), 15), server.log
    # Nothing changed: said so, and the reload still happens.
    server.signal(signal.SIGHUP)
    assert wait_until(lambda: "generation 2 started" in server.log, 15), server.log
    assert "HUP: nothing changed" in server.log, server.log


def test_usr1_without_a_log_file_does_not_claim_a_reopen(server_factory):
    server = server_factory("-w", "1")
    server.wait_workers(1)
    server.signal(signal.SIGUSR1)
    assert wait_until(lambda: "USR1:" in server.log, 10), server.log
    assert "USR1: no --log-file to reopen" in server.log
    assert "log file reopened" not in server.log


HANDLE = """
import socket

def handle(sock, address):
    # Reads what the client sends, then answers with twice as much.
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    sock.sendall(data * 2)
"""

EXITED = re.compile(r"exited: (\d+) connections?, (\d+) bytes in, (\d+) bytes out")


@pytest.mark.parametrize("k", ["sync", "thread"])
def test_blocking_handle_functions_bytes_are_counted(server_factory, tmp_path, k):
    (tmp_path / "twice.py").write_text(HANDLE)
    server = server_factory(
        "-w", "1", "-k", k, "--handler", "twice:handle", env=handler_env(tmp_path)
    )
    payload = b"x" * 100_000
    with server.connect() as sock:
        assert exchange(sock, payload, timeout=30) == payload * 2
    server.signal(signal.SIGTERM)
    assert server.wait(30) == 0
    assert wait_until(lambda: EXITED.search(server.log) is not None, 5), server.log
    match = EXITED.search(server.log)
    assert match is not None
    assert match.group(0) == "exited: 1 connection, 100000 bytes in, 200000 bytes out"


def test_a_handle_functions_proxy_header_is_not_counted(server_factory, tmp_path):
    (tmp_path / "twice2.py").write_text(HANDLE)
    server = server_factory(
        "-b",
        "proxy:127.0.0.1:0",
        "-w",
        "1",
        "-k",
        "sync",
        "--handler",
        "twice2:handle",
        env=handler_env(tmp_path),
    )
    header = b"PROXY TCP4 203.0.113.7 127.0.0.1 51000 7101\r\n"
    with socket.create_connection(server.tcp(), timeout=10) as sock:
        assert exchange(sock, header + b"abc", timeout=30) == b"abcabc"
    server.signal(signal.SIGTERM)
    assert server.wait(30) == 0
    assert wait_until(lambda: EXITED.search(server.log) is not None, 5), server.log
    assert "exited: 1 connection, 3 bytes in, 6 bytes out" in server.log


def test_one_connection_is_said_in_the_singular(server_factory):
    server = server_factory("-w", "1", "-k", "sync", "--max-requests", "1")
    with server.connect() as sock:
        assert exchange(sock, b"one", timeout=10) == b"one"
    assert wait_until(lambda: "exited: " in server.log, 10), server.log
    assert "recycled after 1 connection" in server.log, server.log
    assert "exited: 1 connection, 3 bytes in, 3 bytes out" in server.log, server.log
    assert "1 connections" not in server.log
