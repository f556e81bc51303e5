"""``prefork client`` against real servers: -e, pipes, a terminal, closes and errors."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import select
import signal
import socket
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from prefork.server.handlers import chargen_pattern

from support import TESTS_DIR, assert_one_line_error, handler_env, prefork_command, run

pytestmark = pytest.mark.timeout(60)


def client(*args: str, input: bytes | None = None, stdin=None) -> subprocess.CompletedProcess:
    """Run ``prefork client ARGS`` to its end; stderr is decoded, stdout stays bytes."""
    if input is None and stdin is None:
        stdin = subprocess.DEVNULL
    result = subprocess.run(
        prefork_command("client", *args),
        input=input,
        stdin=stdin,
        capture_output=True,
        timeout=30,
        start_new_session=True,
    )
    result.stderr = result.stderr.decode(errors="replace")
    return result


def start_client(*args: str, **options) -> subprocess.Popen:
    options.setdefault("stdin", subprocess.PIPE)
    options.setdefault("stdout", subprocess.PIPE)
    options.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen(prefork_command("client", *args), start_new_session=True, **options)


def stop(proc: subprocess.Popen) -> None:
    """Kill a client if it is still running and close our ends of its pipes."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


@pytest.fixture
def echo_address(server_factory) -> str:
    host, port = server_factory("-w", "1").tcp()
    return f"{host}:{port}"


@contextlib.contextmanager
def unused_port() -> Iterator[int]:
    """A TCP port bound but not listening: connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@contextlib.contextmanager
def local_server(behaviour: Callable[[socket.socket], None]) -> Iterator[int]:
    """A one-connection TCP server in a thread that runs ``behaviour(conn)``."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(20)

        def serve() -> None:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                behaviour(conn)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            yield listener.getsockname()[1]
        finally:
            thread.join(20)


def reset(conn: socket.socket) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


# -- TCP ------------------------------------------------------------------------


def test_send_once_prints_the_echo(echo_address):
    result = client("-e", "hello", echo_address)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"hello\n", "")


def test_send_once_without_newline(echo_address):
    result = client("-n", "-e", "hello", echo_address)
    assert (result.returncode, result.stdout) == (0, b"hello")


def test_piped_lines_are_echoed(echo_address):
    result = client(echo_address, input=b"one\ntwo\nthree")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"one\ntwo\nthree", "")


def test_output_is_binary_safe_and_large_input_streams(echo_address):
    payload = bytes(range(256)) * 8192  # 2 MiB: many chunks each way
    result = client(echo_address, input=payload)
    assert result.returncode == 0, result.stderr
    assert result.stdout == payload


def test_send_once_to_discard_is_no_reply_exit_1(server_factory):
    host, port = server_factory("-w", "1", "--handler", "discard").tcp()
    result = client("-e", "into the void", f"{host}:{port}")
    assert result.stdout == b""
    assert_one_line_error(
        result, 1, f"{host}:{port}: the server closed the connection without replying"
    )


def test_piped_input_to_discard_prints_nothing_and_exits_0(server_factory):
    host, port = server_factory("-w", "1", "--handler", "discard").tcp()
    result = client(f"{host}:{port}", input=b"into the void\n")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", "")


def test_ipv6_and_unix_addresses(server_factory, tmp_path):
    path = tmp_path / "echo.sock"
    server = server_factory("-w", "1", "-b", "[::1]:0", "-b", f"unix:{path}")
    for address in server.addresses:
        result = client("-e", "hi", address)
        assert (result.returncode, result.stdout) == (0, b"hi\n"), (address, result.stderr)


def test_server_closing_first_is_reported_and_exits_0(server_factory):
    host, port = server_factory("-w", "1", "--handler", "daytime").tcp()
    proc = start_client(f"{host}:{port}")  # its stdin stays open: the server ends it
    try:
        proc.wait(20)
        out, err = proc.stdout.read(), proc.stderr.read()
    finally:
        stop(proc)
    assert proc.returncode == 0
    assert out.endswith(b"-UTC\r\n") and out.count(b"\n") == 1
    assert err.decode() == "prefork: connection closed by server\n"


def test_chargen_streams_until_interrupted_and_ctrl_c_exits_130(server_factory):
    host, port = server_factory("-w", "1", "--handler", "chargen").tcp()
    proc = start_client(f"{host}:{port}")
    try:
        received = b""
        while len(received) < 10000:
            chunk = proc.stdout.read1(65536)
            assert chunk, proc.stderr.read()
            received += chunk
        assert received.startswith(chargen_pattern(periods=1)[:7400])
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 130
        assert proc.stderr.read() == b""
    finally:
        stop(proc)


def test_reader_going_away_ends_the_client_quietly(server_factory):
    host, port = server_factory("-w", "1", "--handler", "chargen").tcp()
    proc = start_client(f"{host}:{port}")
    try:
        assert proc.stdout.read(1)
        proc.stdout.close()  # like `prefork client ... | head -c1`
        assert proc.wait(10) == 1
        assert proc.stderr.read() == b""
    finally:
        stop(proc)


def test_send_once_without_a_reply_in_time_is_exit_1():
    """A hung handler: the connection stays open and nothing comes back."""
    done = threading.Event()

    def hold(conn: socket.socket) -> None:
        while conn.recv(1024):
            pass
        done.wait(20)  # half-closed by the client; keep our side open

    with local_server(hold) as port:
        started = time.monotonic()
        result = client("-e", "anyone?", "--timeout", "0.5", f"127.0.0.1:{port}")
        done.set()
    assert time.monotonic() - started < 10
    assert result.stdout == b""
    assert_one_line_error(result, 1, f"127.0.0.1:{port}: no reply within 0.5 s")


def test_send_once_gives_up_when_the_server_replies_but_never_closes():
    done = threading.Event()

    def answer_and_hold(conn: socket.socket) -> None:
        conn.sendall(conn.recv(1024))
        while conn.recv(1024):
            pass
        done.wait(20)

    with local_server(answer_and_hold) as port:
        result = client("-e", "anyone?", "--timeout", "0.5", f"127.0.0.1:{port}")
        done.set()
    assert (result.returncode, result.stdout) == (0, b"anyone?\n")
    assert result.stderr == "prefork: the server did not close within 0.5 s of the end of input\n"


def test_refused_connection_is_one_line_exit_1():
    with unused_port() as port:
        result = client("-e", "hi", f"127.0.0.1:{port}")
        assert_one_line_error(result, 1, f"127.0.0.1:{port}: connection refused")


def test_reset_connection_is_one_line_exit_1():
    with local_server(reset) as port:
        proc = start_client(f"127.0.0.1:{port}")  # waits on its open stdin
        try:
            proc.wait(20)
            err = proc.stderr.read()
        finally:
            stop(proc)
    assert proc.returncode == 1
    assert err.decode() == f"prefork: error: 127.0.0.1:{port}: connection reset by peer\n"


def test_reset_after_sending_is_one_line_exit_1():
    def read_then_reset(conn: socket.socket) -> None:
        conn.recv(1024)
        reset(conn)

    with local_server(read_then_reset) as port:
        result = client("-e", "hi", f"127.0.0.1:{port}")
    assert_one_line_error(result, 1, f"127.0.0.1:{port}: connection reset by peer")


def test_missing_unix_socket_is_one_line_exit_1(tmp_path):
    path = tmp_path / "nobody.sock"
    assert_one_line_error(client("-e", "hi", f"unix:{path}"), 1, str(path), "no such socket")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["nope"], "'nope'"),
        (["127.0.0.1"], "'127.0.0.1'"),
        (["127.0.0.1:99999"], "127.0.0.1:99999"),
        (["127.0.0.1:0"], "127.0.0.1:0"),
        (["unix:"], "'unix:'"),
        (["udp://unix:/tmp/x"], "udp://unix:/tmp/x"),
        (["--udp", "unix:/tmp/x"], "--udp"),
        (["-n", "127.0.0.1:7"], "-n/--no-newline"),
        (["--timeout", "soon", "127.0.0.1:7"], "'soon'"),
        (["--expect", "ping", "127.0.0.1:7"], "--expect: only with -e TEXT"),
        ([], "ADDRESS"),
    ],
)
def test_bad_command_lines_exit_2(args, needle):
    assert_one_line_error(client(*args), 2, needle)


# -- a health check: -e needs a reply, --expect the right one --------------------


def faulty_server(server_factory, handler: str, *args: str) -> str:
    """A one-worker server running ``handlers.faulty:HANDLER``; its address."""
    server = server_factory(
        "-w", "1", *args, "--handler", f"handlers.faulty:{handler}", env=handler_env(TESTS_DIR)
    )
    server.wait_workers(1)
    host, port = server.tcp()
    return f"{host}:{port}"


@pytest.mark.parametrize("k", ["event", "sync"])
def test_a_hung_handler_is_no_reply_exit_1(server_factory, k):
    address = faulty_server(server_factory, "HangOnData", "-k", k)
    started = time.monotonic()
    result = client("-e", "ping", "--timeout", "0.5", address)
    assert time.monotonic() - started < 10
    assert result.stdout == b""
    assert_one_line_error(result, 1, f"{address}: no reply within 0.5 s")


@pytest.mark.parametrize("k", ["event", "sync"])
def test_a_handler_that_raised_is_exit_1(server_factory, k):
    address = faulty_server(server_factory, "RaiseOnBoom", "-k", k)
    result = client("-e", "boom", address)
    assert result.stdout == b""
    assert_one_line_error(
        result, 1, f"{address}: the server closed the connection without replying"
    )


def test_a_worker_killed_by_the_watchdog_is_exit_1(server_factory):
    """The client waits longer than the watchdog: the hung worker is killed
    and its connection closed with no reply, which ends the client at once."""
    address = faulty_server(server_factory, "HangOnData", "--timeout", "1")
    started = time.monotonic()
    result = client("-e", "ping", "--timeout", "20", address)
    assert time.monotonic() - started < 15  # the kill, not the client's timeout
    assert result.stdout == b""
    assert_one_line_error(result, 1, address)
    assert re.search(
        r"the server closed the connection without replying|connection reset by peer",
        result.stderr,
    ), result.stderr


def test_expect_the_echo_exits_0(echo_address):
    result = client("-e", "ping", "--expect", "ping", echo_address)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"ping\n", "")
    result = client("-n", "-e", "ping", "--expect", "ping", echo_address)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"ping", "")


@pytest.mark.parametrize(
    ("expect", "shown"),
    [
        ("pong", "'ping\\n'"),
        ("pin", "'ping\\n'"),
        ("ping pong", "'ping\\n'"),
        ("PING", "'ping\\n'"),
    ],
)
def test_expect_another_reply_says_what_came_and_exits_1(echo_address, expect, shown):
    result = client("-e", "ping", "--expect", expect, echo_address)
    assert result.stdout == b"ping\n"  # printed all the same
    assert_one_line_error(result, 1, f"{echo_address}: expected {expect!r}, the reply was {shown}")


def test_expect_quotes_a_long_or_binary_reply_on_one_line(server_factory):
    host, port = server_factory("-w", "1", "--handler", "chargen").tcp()
    result = client("-e", "x", "--expect", "hello", f"{host}:{port}")
    line = result.stderr.strip()
    assert_one_line_error(result, 1, "expected 'hello', the reply was '")
    assert re.search(r"\.\.\. \([\d,]+ bytes received\)$", line), line
    assert len(line) < 200, line


@pytest.mark.parametrize(
    ("reply", "code"),
    [(b"ping\r\n", 0), (b"ping\n", 0), (b"pong\n", 1), (b"ping\nmore\n", 1)],
)
def test_expect_stops_waiting_once_the_reply_is_settled(reply, code):
    """A server that answers and keeps the connection open: the client does
    not wait out its timeout once the reply is a whole line, right or wrong."""
    done = threading.Event()

    def answer_and_hold(conn: socket.socket) -> None:
        conn.recv(1024)
        conn.sendall(reply)
        done.wait(20)

    with local_server(answer_and_hold) as port:
        started = time.monotonic()
        result = client("-e", "ping", "--expect", "ping", "--timeout", "20", f"127.0.0.1:{port}")
        elapsed = time.monotonic() - started
        done.set()
    assert elapsed < 20, elapsed  # it did not wait out its timeout
    assert result.returncode == code, result.stderr
    assert result.stdout == reply


def test_expect_over_udp(udp_server):
    address = udp_server()
    result = client("-e", "datagram", "--expect", "datagram", address)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"datagram\n", "")
    result = client("-e", "datagram", "--expect", "something else", address)
    assert_one_line_error(result, 1, "expected 'something else', the reply was 'datagram\\n'")


def deployment_health_check() -> list[str]:
    """The ``prefork client`` command of docs/deployment.md's HEALTHCHECK."""
    path = os.path.join(TESTS_DIR, os.pardir, "docs", "deployment.md")
    with open(path) as f:
        text = f.read()
    match = re.search(r"HEALTHCHECK [^\n]*\\\n\s*CMD (prefork client [^>|\n]*)", text)
    assert match, "no HEALTHCHECK with a prefork client command in docs/deployment.md"
    words = match.group(1).split()
    assert words[-1] == "127.0.0.1:7007", words
    return words[2:-1]  # the options, without "prefork client" and the address


def test_the_documented_health_check_tells_healthy_from_hung(server_factory, echo_address):
    options = deployment_health_check()
    assert "--expect" in options
    assert client(*options, echo_address).returncode == 0
    hung = faulty_server(server_factory, "HangOnData")
    started = time.monotonic()
    result = client(*options, hung)
    assert result.returncode == 1, result.stderr
    assert time.monotonic() - started < 10
    discard = server_factory("-w", "1", "--handler", "discard").tcp()
    assert client(*options, f"{discard[0]}:{discard[1]}").returncode == 1
    daytime = server_factory("-w", "1", "--handler", "daytime").tcp()
    assert client(*options, f"{daytime[0]}:{daytime[1]}").returncode == 1


def test_help_says_what_the_exit_status_means():
    result = run("client", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "Exit status: 0 when the reply came (with --expect, the one expected)" in text
    assert "1 when no reply came within --timeout" in text
    assert "--expect TEXT" in text


# -- a terminal -----------------------------------------------------------------


def read_until(fd: int, done: Callable[[bytes], bool], timeout: float = 20.0) -> bytes:
    """Read the pseudo-terminal's master side until ``done(everything so far)``."""
    data = b""
    deadline = time.monotonic() + timeout
    while not done(data):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"timed out; the terminal shows {data!r}"
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError as exc:  # EIO: the client closed the terminal
                assert exc.errno == errno.EIO
                chunk = b""
            assert chunk, f"the terminal closed; it showed {data!r}"
            data += chunk
    return data


@contextlib.contextmanager
def terminal_client(address: str) -> Iterator[tuple[subprocess.Popen, int]]:
    """The client with a pseudo-terminal as its controlling terminal, stdin and
    stdout; yields the process and the terminal's master side (our keyboard)."""
    master, slave = os.openpty()

    def take_terminal() -> None:  # in the child, after setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    try:
        proc = start_client(address, stdin=slave, stdout=slave, preexec_fn=take_terminal)
    finally:
        os.close(slave)
    try:
        yield proc, master
    finally:
        stop(proc)
        os.close(master)


def test_terminal_session_echoes_lines_and_ctrl_d_ends_it(echo_address):
    with terminal_client(echo_address) as (proc, keyboard):
        os.write(keyboard, b"hello\n")
        # The terminal shows the typed line, then the server's echo of it.
        read_until(keyboard, lambda shown: shown.count(b"hello\r\n") >= 2)
        os.write(keyboard, b"second line\n")
        read_until(keyboard, lambda shown: shown.count(b"second line\r\n") >= 2)
        os.write(keyboard, b"\x04")  # Ctrl-D: end of input
        assert proc.wait(10) == 0
        err = proc.stderr.read().decode()
    assert err == f"prefork: connected to {echo_address} (Ctrl-D ends the input, Ctrl-C quits)\n"


def test_terminal_ctrl_c_exits_130_quietly(echo_address):
    with terminal_client(echo_address) as (proc, keyboard):
        os.write(keyboard, b"ping\n")
        read_until(keyboard, lambda shown: shown.count(b"ping\r\n") >= 2)
        os.write(keyboard, b"\x03")  # Ctrl-C: the terminal sends SIGINT
        assert proc.wait(10) == 130
        err = proc.stderr.read().decode()
    assert "Traceback" not in err and "error" not in err
    assert err.count("\n") == 1  # the "connected to" line only


# -- UDP ------------------------------------------------------------------------


@pytest.fixture
def udp_server(server_factory):
    def start(handler: str = "echo") -> str:
        return server_factory("-w", "1", "-b", "udp://127.0.0.1:0", "--handler", handler).addresses[
            0
        ]

    return start


def test_udp_send_once(udp_server):
    address = udp_server()
    assert address.startswith("udp://")
    result = client("-e", "datagram", address)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"datagram\n", "")
    result = client("--udp", "-n", "-e", "plain", address[len("udp://") :])
    assert (result.returncode, result.stdout, result.stderr) == (0, b"plain", "")


def test_udp_one_datagram_per_line(udp_server):
    result = client(udp_server(), input=b"one\ntwo\nthree\nlast without newline")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"one\ntwo\nthree\nlast without newline"


def test_udp_many_lines_are_paced_and_none_is_lost(udp_server):
    lines = b"".join(b"line %d\n" % i for i in range(3000))
    result = client(udp_server(), input=lines)
    assert result.returncode == 0, result.stderr
    assert result.stdout == lines


def test_udp_daytime_replies_to_each_line(udp_server):
    result = client(udp_server("daytime"), input=b"a\nb\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(b"-UTC\r\n") == 2


def test_udp_without_reply_is_an_error_after_the_timeout(udp_server):
    started = time.monotonic()
    result = client("-e", "hello?", "--timeout", "0.5", udp_server("discard"))
    assert time.monotonic() - started < 10
    assert_one_line_error(result, 1, "no reply to 1 of 1 datagram(s) within 0.5 s")


def test_udp_refused_is_one_line_exit_1():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens there now: the kernel answers with "port unreachable".
    result = client("-e", "hi", f"udp://127.0.0.1:{port}")
    assert_one_line_error(result, 1, f"udp://127.0.0.1:{port}: connection refused")
