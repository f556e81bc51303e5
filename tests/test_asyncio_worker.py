"""-k asyncio: a stock asyncio or uvloop loop per worker, under the master's rules.

Real servers, real sockets, real signals. Every test runs with --loop
asyncio and --loop uvloop; only the uvloop cases are skipped when uvloop is
not installed.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import socket
import struct
import subprocess
import time
import urllib.request

import pytest

from support import (
    TESTS_DIR,
    assert_one_line_error,
    children_of,
    connections_per_worker,
    exchange,
    handler_env,
    pid_alive,
    prefork_command,
    run,
    wait_until,
)

pytestmark = pytest.mark.timeout(90)

UVLOOP_MISSING = importlib.util.find_spec("uvloop") is None
LOOPS = [
    "asyncio",
    pytest.param(
        "uvloop",
        marks=pytest.mark.skipif(UVLOOP_MISSING, reason="uvloop is not installed"),
    ),
]
KINDS = "handlers.asyncio_kinds"


@pytest.fixture(params=LOOPS)
def serve(request, server_factory):
    """A server with -k asyncio on each loop, the test handlers importable."""

    def start(*args: str, **kw):
        kw.setdefault("env", handler_env(TESTS_DIR))
        return server_factory("-k", "asyncio", "--loop", request.param, *args, **kw)

    start.loop = request.param  # type: ignore[attr-defined]
    return start


def read_until_closed(sock: socket.socket, timeout: float = 20) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_echo_is_byte_exact_and_counted(serve):
    server = serve("-w", "2", "--log-level", "debug")
    payload = os.urandom(3 << 20)
    with server.connect() as sock:
        assert exchange(sock, payload) == payload
    with server.connect() as sock:
        assert exchange(sock, b"hello\n") == b"hello\n"
    assert wait_until(lambda: f"{serve.loop}" in server.log and " loop" in server.log, 5)
    server.signal(signal.SIGTERM)
    assert server.wait(20) == 0
    pattern = r"exited: (\d+) connections?, (\d+) bytes in, (\d+) bytes out"
    served = [tuple(map(int, m)) for m in re.findall(pattern, server.log)]
    assert sum(n for n, _, _ in served) == 2, server.log
    assert sum(b for _, b, _ in served) == len(payload) + 6
    assert sum(b for _, _, b in served) == len(payload) + 6


@pytest.mark.parametrize("service", ["discard", "daytime", "chargen"])
def test_the_other_built_in_services(serve, service):
    server = serve("-w", "1", "--handler", service)
    with server.connect() as sock:
        if service == "discard":
            sock.sendall(b"x" * 100_000)
            sock.shutdown(socket.SHUT_WR)
            assert read_until_closed(sock) == b""
        elif service == "daytime":
            assert re.fullmatch(
                rb"\w+, \w+ \d\d, \d{4} \d\d:\d\d:\d\d-UTC\r\n", read_until_closed(sock)
            )
        else:
            sock.settimeout(10)
            got = b""
            while len(got) < 200_000:
                got += sock.recv(65536)
            lines = got.split(b"\r\n")
            assert len(lines[1]) == 72 and lines[2][:-1] == lines[1][1:]


def test_stream_handler(serve):
    server = serve("-w", "1", "--handler", f"{KINDS}:upper_stream")
    with server.connect() as sock:
        assert exchange(sock, b"one\ntwo\n" * 10_000) == b"ONE\nTWO\n" * 10_000


@pytest.mark.parametrize(
    ("attr", "greeting"),
    [("make_greeter", b"hello from a factory\n"), ("partial_greeter", b"hello from a partial\n")],
)
def test_protocol_factory(serve, attr, greeting):
    server = serve("-w", "1", "--handler", f"{KINDS}:{attr}")
    with server.connect() as sock:
        assert exchange(sock, b"abc") == greeting + b"abc"


def test_buffered_protocol_with_and_without_a_proxy_header(serve):
    server = serve(
        "-w",
        "1",
        "-b",
        "127.0.0.1:0",
        "-b",
        "proxy:127.0.0.1:0",
        "--handler",
        f"{KINDS}:BufferedEcho",
    )
    payload = os.urandom(1 << 20)
    with server.connect(0) as sock:
        assert exchange(sock, payload) == payload
    header = b"PROXY TCP4 203.0.113.7 127.0.0.1 51000 7007\r\n"
    with server.connect(1) as sock:  # what follows the header in its packet reaches it too
        assert exchange(sock, header + payload) == payload


def test_a_docs_style_echo_protocol_runs_unchanged(serve):
    server = serve("-w", "1", "--handler", f"{KINDS}:DocsEcho")
    with server.connect() as sock:
        sock.sendall(b"Hello World!")
        assert read_until_closed(sock) == b"Hello World!"
    assert wait_until(lambda: "Data received: 'Hello World!'" in server.log, 5), server.log


def test_protocols_use_the_running_loop_timers_and_tasks(serve):
    server = serve("-w", "1", "--handler", f"{KINDS}:LaterEcho")
    with server.connect() as sock:
        assert exchange(sock, b"later " * 1000) == b"later " * 1000


def test_datagram_protocol_and_built_in_udp(serve):
    for handler, expect in ((f"{KINDS}:UdpUpper", b"PING"), ("echo", b"ping")):
        server = serve("-w", "2", "-b", "udp://127.0.0.1:0", "--handler", handler)
        host, _, port = server.addresses[0].removeprefix("udp://").rpartition(":")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            sock.sendto(b"ping", (host, int(port)))
            assert sock.recv(100) == expect
        server.kill_all()


def test_an_empty_reply_datagram_is_sent(serve):
    """UDP has empty datagrams, and a protocol may answer with one (chargen's
    reply holds 0 to 512 characters); asyncio's and uvloop's transports
    would drop it silently."""
    server = serve("-w", "1", "-b", "udp://127.0.0.1:0", "--handler", f"{KINDS}:UdpUpper")
    host, _, port = server.addresses[0].removeprefix("udp://").rpartition(":")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        for data in (b"", b"ping", b""):
            sock.sendto(data, (host, int(port)))
            assert sock.recv(100) == data.upper()


def test_term_during_a_slow_request_completes_it(serve):
    server = serve("-w", "1", "--handler", f"{KINDS}:slow_stream", "--graceful-timeout", "20")
    server.wait_workers(1)
    with server.connect() as sock:
        sock.sendall(b"job\n")
        time.sleep(0.2)  # the handler is now awaiting its second of work
        server.signal(signal.SIGTERM)
        assert read_until_closed(sock) == b"done job\n"
    assert server.wait(20) == 0
    assert "--graceful-timeout" not in server.log


def test_graceful_timeout_cancels_tasks_before_the_master_kills(serve):
    """A handler that never finishes is cancelled (its except/finally runs)
    just before --graceful-timeout, and the worker leaves by itself; the
    drain, longer than --timeout, keeps the heartbeat going."""
    graceful = 3.0
    server = serve(
        "-w",
        "1",
        "--handler",
        f"{KINDS}:stubborn_stream",
        "--graceful-timeout",
        str(graceful),
        "--timeout",
        "1",
    )
    (worker,) = server.wait_workers(1)
    with server.connect() as sock:
        sock.sendall(b"go\n")
        sock.settimeout(10)
        assert sock.recv(100) == b"waiting\n"
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        assert read_until_closed(sock) == b""
        took = time.monotonic() - started
    assert server.wait(20) == 0
    assert not pid_alive(worker)
    assert took >= graceful - 1.0, took  # not before its time
    assert "stubborn_stream cancelled" in server.log
    assert "silent for" not in server.log
    assert "--graceful-timeout: aborting 1 connection, cancelling 1 task" in server.log
    assert "killing" not in server.log


def test_a_blocked_loop_is_dumped_and_replaced(serve):
    timeout = 2.0
    server = serve("-w", "1", "--timeout", str(timeout), "--handler", f"{KINDS}:Sleeper")
    (stuck,) = server.wait_workers(1)
    with server.connect() as sock:
        sock.sendall(b"x")
        started = time.monotonic()
        assert wait_until(lambda: stuck not in server.workers() and server.workers(), 15)
        replaced_after = time.monotonic() - started
    # Its last beat came at most a tick (a quarter of --timeout) before the data.
    assert replaced_after >= timeout * 3 / 4, replaced_after
    assert wait_until(lambda: "in data_received" in server.log, 5), server.log
    assert re.search(r"silent for \d+\.\ds with 1 active connection", server.log), server.log


def test_idle_connections_are_not_silence_and_idle_timeout_closes(serve):
    server = serve("-w", "1", "--timeout", "1", "--idle-timeout", "2")
    (worker,) = server.wait_workers(1)
    with server.connect() as sock:
        sock.sendall(b"a")
        assert sock.recv(1) == b"a"
        time.sleep(1.5)  # quiet for longer than --timeout, less than --idle-timeout
        sock.sendall(b"b")
        assert sock.recv(1) == b"b"
        started = time.monotonic()
        assert read_until_closed(sock) == b""  # then closed for being idle
        assert time.monotonic() - started >= 1.5
    assert server.workers() == [worker]
    assert "silent for" not in server.log


def test_proxy_protocol_gives_the_client_address(serve):
    server = serve("-w", "1", "-b", "proxy:127.0.0.1:0", "--handler", "handlers.faulty:Peer")
    with server.connect() as sock:
        sock.sendall(b"PROXY TCP4 203.0.113.7 127.0.0.1 51000 7007\r\n")
        assert read_until_closed(sock) == repr(("203.0.113.7", 51000)).encode()
    v2 = (
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x11"
        + struct.pack("!H", 12)
        + socket.inet_aton("198.51.100.1")
        + socket.inet_aton("127.0.0.1")
        + struct.pack("!HH", 4242, 7007)
    )
    with server.connect() as sock:
        sock.sendall(v2)
        assert read_until_closed(sock) == repr(("198.51.100.1", 4242)).encode()
    with server.connect() as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert read_until_closed(sock) == b""
    assert wait_until(lambda: "no PROXY protocol header; closing" in server.log, 5), server.log


def test_proxy_header_from_an_untrusted_peer_is_refused(serve):
    server = serve("-w", "1", "-b", "proxy:127.0.0.1:0", "--forwarded-allow-ips", "192.0.2.1")
    with server.connect() as sock:
        sock.sendall(b"PROXY TCP4 203.0.113.7 127.0.0.1 51000 7007\r\nhello")
        try:
            assert read_until_closed(sock) == b""
        except ConnectionResetError:  # closed with our bytes unread
            pass
    assert wait_until(lambda: "is not in --forwarded-allow-ips; closing" in server.log, 5)


def test_proxy_header_then_echo_of_what_came_with_it(serve):
    server = serve("-w", "1", "-b", "proxy:127.0.0.1:0")
    with server.connect() as sock:
        reply = exchange(sock, b"PROXY TCP4 203.0.113.7 127.0.0.1 51000 7007\r\nsame packet")
    assert reply == b"same packet"


def test_max_connections_spills_over_to_other_workers(serve):
    server = serve("-w", "2", "--max-connections", "1")
    server.wait_workers(2)
    first = server.connect()
    second = server.connect()
    with first, second:
        for sock in (first, second):
            sock.sendall(b"x")
            assert sock.recv(1) == b"x"
        # Each worker holds one: at its cap, a worker leaves the next one queued.
        assert sorted(connections_per_worker(server.tcp()[1]).values()) == [1, 1]


def test_a_peer_that_never_reads_pauses_reading_not_the_worker(serve):
    """--max-buffer is the high-water mark: past it the worker stops
    reading the client, so its memory stays bounded, and other clients are
    served meanwhile."""
    server = serve("-w", "1", "--max-buffer", "64K")
    (worker,) = server.wait_workers(1)
    hog = server.connect()
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    hog.setblocking(False)
    sent = 0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            sent += hog.send(b"z" * 65536)
        except BlockingIOError:
            time.sleep(0.2)
            try:
                sent += hog.send(b"z" * 65536)
            except BlockingIOError:
                break
    assert sent < 64 << 20, "the worker kept reading from a client that does not read"
    with server.connect() as other:
        assert exchange(other, b"still served") == b"still served"
    hog.close()
    assert server.workers() == [worker]


def test_max_requests_recycles(serve):
    server = serve("-w", "1", "--max-requests", "5")
    for i in range(20):
        with server.connect() as sock:
            assert exchange(sock, b"%d" % i) == b"%d" % i
    assert wait_until(lambda: server.log.count("recycled after 5 connections") >= 2, 10), server.log


def test_fast_stop(serve):
    server = serve("-w", "2", "--graceful-timeout", "60")
    workers = server.wait_workers(2)
    with server.connect() as sock:
        sock.sendall(b"busy")
        assert sock.recv(4) == b"busy"
        started = time.monotonic()
        server.signal(signal.SIGQUIT)
        assert server.wait(10) == 0
        assert time.monotonic() - started < 4
    assert wait_until(lambda: not any(pid_alive(p) for p in workers), 5)
    assert "killing" not in server.log


# -- refused at start: one line, exit 2 -----------------------------------------------


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["-k", "asyncio", "--handler", f"{KINDS}:blocking_handle"], ["blocking", "-k sync"]),
        (["-k", "asyncio", "--handler", f"{KINDS}:RequestHandler"], ["socketserver", "-k sync"]),
        (["-k", "sync", "--handler", f"{KINDS}:upper_stream"], ["stream handler", "-k event"]),
        (["-k", "thread", "--handler", f"{KINDS}:upper_stream"], ["stream handler", "-k event"]),
        (["-k", "sync", "--handler", f"{KINDS}:UdpUpper"], ["DatagramProtocol", "-k asyncio"]),
        (["-k", "asyncio", "--handler", f"{KINDS}:UdpUpper"], ["DatagramProtocol", "udp://"]),
        (
            ["-k", "asyncio", "-b", "udp://127.0.0.1:0", "--handler", f"{KINDS}:Greeter"],
            ["datagram listeners"],
        ),
        (["-k", "asyncio", "--loop", "trio"], ["--loop", "'trio'"]),
    ],
)
def test_kinds_it_cannot_run_are_refused(args, needles):
    result = run("serve", "-b", "127.0.0.1:0", *args, env=handler_env(TESTS_DIR))
    assert_one_line_error(result, 2, *needles)


def test_loop_uvloop_without_uvloop_names_what_to_install(tmp_path):
    (tmp_path / "uvloop.py").write_text("raise ImportError('hidden by the test')\n")
    result = run(
        "serve", "-b", "127.0.0.1:0", "-k", "asyncio", "--loop", "uvloop", env=handler_env(tmp_path)
    )
    assert_one_line_error(result, 2, "--loop", "prefork[uvloop]")


def test_loop_auto_without_uvloop_runs_asyncio(server_factory, tmp_path):
    (tmp_path / "uvloop.py").write_text("raise ImportError('hidden by the test')\n")
    server = server_factory(
        "-w", "1", "-k", "asyncio", "--log-level", "debug", env=handler_env(tmp_path)
    )
    with server.connect() as sock:
        assert exchange(sock, b"auto") == b"auto"
    assert wait_until(lambda: "asyncio loop" in server.log, 5), server.log


# -- the log file and the metrics ------------------------------------------------------


def test_usr1_reopens_the_log_file_in_the_workers(tmp_path):
    log = tmp_path / "prefork.log"
    proc = subprocess.Popen(
        prefork_command(
            "serve",
            "-b",
            "127.0.0.1:0",
            "-w",
            "1",
            "-k",
            "asyncio",
            "--max-requests",
            "1",
            "--log-file",
            str(log),
        ),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        text = lambda path=log: path.read_text() if path.exists() else ""  # noqa: E731
        assert wait_until(lambda: "master started" in text(), 15), text()
        port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", text()).group(1))
        rotated = tmp_path / "prefork.log.1"
        os.rename(log, rotated)  # what logrotate does
        proc.send_signal(signal.SIGUSR1)
        assert wait_until(lambda: "USR1: log file reopened" in text(), 10), text(rotated)
        assert wait_until(lambda: len(children_of(proc.pid)) == 1, 10)
        (worker,) = children_of(proc.pid)
        time.sleep(0.5)  # the master passes USR1 on to the worker
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            assert exchange(sock, b"rotate me", timeout=10) == b"rotate me"
        # The worker recycles after one connection and says so, in the new file.
        assert wait_until(lambda: f"[{worker}] [INFO] worker" in text(), 10), text()
        assert f"[{worker}] [INFO] worker" not in text(rotated)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def test_metrics_count_the_workers_connections_and_bytes(serve):
    server = serve("-w", "2", "--metrics", "127.0.0.1:0")
    assert wait_until(lambda: "metrics on http://" in server.log, 10), server.log
    address = re.search(r"metrics on http://(\S+)/metrics", server.log).group(1)
    for size in (10, 1000, 100_000):
        with server.connect() as sock:
            assert exchange(sock, b"m" * size) == b"m" * size

    def value(name: str) -> float:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
            page = response.read().decode()
        return sum(
            float(m) for m in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", page, re.MULTILINE)
        )

    assert wait_until(lambda: value("prefork_connections_accepted_total") == 3, 10)
    assert value("prefork_bytes_in_total") == 101_010
    assert value("prefork_bytes_out_total") == 101_010
