"""``prefork serve`` as a real process: echo, handlers, listeners, logs."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import stat
import threading
import time

import pytest

from prefork.server.handlers import chargen_pattern

from support import WORKER_CLASS_ARGS, connections_per_worker, exchange, wait_until

pytestmark = pytest.mark.timeout(120)

LOG_LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z \[(\d+)\] \[(DEBUG|INFO|WARNING|ERROR|CRITICAL)\] \S"
)


@pytest.fixture(scope="module", params=list(WORKER_CLASS_ARGS))
def echo4(request):
    """One ``prefork serve -w 4`` per worker class, shared by the echo tests."""
    from support import start_server

    server = start_server("-w", "4", *WORKER_CLASS_ARGS[request.param])
    request.addfinalizer(server.kill_all)
    server.wait_workers(4)
    return server


@pytest.mark.parametrize(
    "size", [1, 2, 1023, 1024, 65535, 65536, 65537, 1 << 20, 16 << 20, 64 << 20]
)
def test_echo_is_byte_exact_from_1_byte_to_64_mib(echo4, size):
    payload = os.urandom(size) if size <= (1 << 20) else os.urandom(1 << 20) * (size >> 20)
    with echo4.connect() as sock:
        received = exchange(sock, payload)
    assert len(received) == size
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


def test_fifty_concurrent_clients_queue_for_four_workers(echo4):
    results: dict[int, bool] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(50)

    def client(i: int) -> None:
        payload = os.urandom(4096 + i * 997)
        try:
            start.wait(10)
            with echo4.connect(timeout=60) as sock:
                results[i] = exchange(sock, payload) == payload
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert not errors
    assert len(results) == 50 and all(results.values())


def test_four_workers_serve_four_connections_at_once(echo4):
    """Four held-open connections are all served at once. A sync worker
    serves one connection at a time, so there each of the four workers holds
    exactly one of them (the kernel's socket table says which process owns
    each server-side socket); event and thread workers may take several."""
    socks = [echo4.connect() for _ in range(4)]
    try:
        for i, sock in enumerate(socks):
            sock.sendall(b"ping%d" % i)
        for i, sock in enumerate(socks):
            assert sock.recv(16) == b"ping%d" % i
        owners = connections_per_worker(echo4.tcp()[1])
        assert sum(owners.values()) == 4 and set(owners) <= set(echo4.workers()), owners
        if "sync" in echo4.proc.args:
            assert sorted(owners.values()) == [1, 1, 1, 1], owners
    finally:
        for sock in socks:
            sock.close()


def test_log_lines_have_time_pid_and_level(echo4):
    assert echo4.lines
    for line in echo4.lines:
        match = LOG_LINE.match(line)
        assert match, line
    assert any(f"[{echo4.pid}] [INFO] listening on 127.0.0.1:" in line for line in echo4.lines)


def test_worker_count_defaults_to_cpu_count(server_factory):
    server = server_factory()
    assert len(server.wait_workers(os.cpu_count() or 1)) == (os.cpu_count() or 1)


def test_ipv6_and_several_binds(server_factory):
    server = server_factory("-b", "127.0.0.1:0", "-b", "[::1]:0", "-w", "1")
    assert server.addresses[0].startswith("127.0.0.1:")
    assert server.addresses[1].startswith("[::1]:")
    for index in (0, 1):
        with server.connect(index) as sock:
            assert exchange(sock, b"hello v%d" % index) == b"hello v%d" % index


def test_default_bind_is_loopback_port_7007(server_factory):
    server = server_factory("-w", "1", any_port=False)
    assert server.addresses == ["127.0.0.1:7007"]
    with server.connect() as sock:
        assert exchange(sock, b"default") == b"default"


def test_unix_socket_is_not_world_writable_and_removed_on_exit(server_factory, tmp_path):
    path = tmp_path / "echo.sock"
    server = server_factory("-b", f"unix:{path}", "-w", "1")
    assert server.addresses == [f"unix:{path}"]
    mode = stat.S_IMODE(os.stat(path).st_mode)
    assert mode == 0o660
    with server.connect() as sock:
        assert exchange(sock, b"over unix") == b"over unix"
    server.signal(15)
    assert server.wait(30) == 0
    assert not path.exists()


def test_unix_mode_option(server_factory, tmp_path):
    path = tmp_path / "private.sock"
    server_factory("-b", f"unix:{path}", "-w", "1", "--unix-mode", "600")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_stale_unix_socket_is_replaced(server_factory, tmp_path):
    path = tmp_path / "stale.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    server = server_factory("-b", f"unix:{path}", "-w", "1")
    with server.connect() as sock:
        assert exchange(sock, b"x") == b"x"


def test_unix_socket_in_use_is_refused(server_factory, tmp_path):
    path = tmp_path / "busy.sock"
    server_factory("-b", f"unix:{path}", "-w", "1")
    from support import assert_one_line_error, run

    assert_one_line_error(run("serve", "-b", f"unix:{path}"), 1, "address already in use")


def test_discard_handler(server_factory):
    server = server_factory("--handler", "discard", "-w", "1")
    with server.connect() as sock:
        assert exchange(sock, os.urandom(200_000)) == b""


def test_daytime_handler(server_factory):
    server = server_factory("--handler", "daytime", "-w", "1")
    with server.connect() as sock:
        line = exchange(sock, b"")
    assert re.fullmatch(rb"[A-Z][a-z]+day, [A-Z][a-z]+ \d\d, \d{4} \d\d:\d\d:\d\d-UTC\r\n", line)
    year = time.gmtime().tm_year
    assert str(year).encode() in line


def test_chargen_handler(server_factory):
    server = server_factory("--handler", "chargen", "-w", "1")
    pattern = chargen_pattern(periods=1)
    with server.connect() as sock:
        received = bytearray()
        while len(received) < 100_000:
            received += sock.recv(65536)
    periods = len(received) // len(pattern) + 1
    assert bytes(received) == (pattern * periods)[: len(received)]
    # The worker survives the client leaving mid-stream and serves again.
    with server.connect() as sock:
        assert sock.recv(72) == pattern[:72]


def test_python_dash_m_and_console_script_agree():
    import subprocess
    import sys

    a = subprocess.run(
        [sys.executable, "-m", "prefork", "--version"], capture_output=True, text=True, timeout=30
    )
    b = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "prefork"), "--version"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert a.returncode == b.returncode == 0
    assert a.stdout == b.stdout


def test_worker_logs_connection_summary_on_stop(server_factory):
    server = server_factory("-w", "1")
    with server.connect() as sock:
        assert exchange(sock, b"x" * 1000) == b"x" * 1000
    server.signal(15)
    assert server.wait(30) == 0
    assert wait_until(lambda: "1 connection, 1000 bytes in, 1000 bytes out" in server.log, 5), (
        server.log
    )


def test_backlog_option_reaches_listen(server_factory):
    import subprocess

    server = server_factory("-w", "1", "--backlog", "17")
    port = server.tcp()[1]
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, timeout=10, check=True
    ).stdout.split()
    assert out[:3] == ["LISTEN", "0", "17"], out  # Send-Q of a listener is its backlog


def test_pid_file_is_written_and_removed(server_factory, tmp_path):
    pid_file = tmp_path / "prefork.pid"
    server = server_factory("-w", "1", "--pid", str(pid_file))
    assert pid_file.read_text() == f"{server.pid}\n"
    server.signal(15)
    assert server.wait(30) == 0
    assert not pid_file.exists()


def test_unwritable_pid_file_is_a_one_line_error(tmp_path):
    from support import assert_one_line_error, run

    target = tmp_path / "no-such-dir" / "prefork.pid"
    assert_one_line_error(run("serve", "--pid", str(target)), 1, str(target), "cannot write")


def test_pid_file_is_removed_when_binding_fails(tmp_path):
    from support import assert_one_line_error, run

    pid_file = tmp_path / "prefork.pid"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run("serve", "-b", f"127.0.0.1:{port}", "--pid", str(pid_file))
    assert_one_line_error(result, 1, "address already in use")
    assert not pid_file.exists()
