"""--access-log: one line per connection when it ends, over real sockets.

The loops (both implementations) write into a pipe the test reads; a script
of connections that end each in a known way (end of file, reset, the idle
timeout, --max-buffer, a refused PROXY header, a handler that raised, the
server closing, shutdown) must give lines with the bytes, the reason and
the client (the PROXY source when there is one) that happened, and the
compiled loop the same fields as its twin. A log that cannot take lines
makes the loop drop and count them, never wait. Then real servers: every
worker class writes the same format to a file, and USR1 reopens it.
"""

from __future__ import annotations

import datetime
import fcntl
import os
import signal
import socket
import struct
import threading
from types import ModuleType
from typing import Any

import pytest

from prefork import _fastio_py
from prefork._fastio_common import ACCESS_LOG_BUFFER, END_REASONS

from support import (
    WORKER_CLASS_ARGS,
    assert_one_line_error,
    compiled_unless_disabled,
    run,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)

IDLE = 3.0  # the loops' idle timeout in the script
PROXY_V1 = b"PROXY TCP4 192.0.2.7 198.51.100.1 40001 7007\r\n"


def parse(line: str) -> dict[str, Any]:
    """The documented fields of one line (docs/deployment.md)."""
    stamp, client, pid, duration, nin, nout, end = line.split(" ")
    when = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ")
    assert len(stamp) == len("2026-12-01T18:27:48.123Z")
    assert end in END_REASONS
    return {
        "time": when.replace(tzinfo=datetime.timezone.utc),
        "client": client,
        "pid": int(pid),
        "duration": float(duration),
        "in": int(nin),
        "out": int(nout),
        "end": end,
    }


class Misbehave:
    """b"boom" raises; b"flood" writes until cut off; b"bye" answers and closes."""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if b"boom" in data:
            raise RuntimeError("boom requested")
        if b"flood" in data:
            chunk = b"f" * 65536
            for _ in range(4096):  # more than any socket buffers: cut off long before
                if self.transport.is_closing():
                    break
                self.transport.write(chunk)
        elif b"bye" in data:
            self.transport.write(b"ok")
            self.transport.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        pass


class LoopThread:
    """An EventLoop of ``impl`` logging into a pipe, run in a thread until
    ``stop`` (which closes it there: the shutdown lines)."""

    def __init__(self, impl: ModuleType, service: str, *, proxied: bool = False, **options):
        self.listeners = []
        for _ in range(2 if proxied else 1):
            listener = socket.socket()
            listener.bind(("127.0.0.1", 0))
            listener.listen(16)
            listener.setblocking(False)
            self.listeners.append(listener)
        self.log_r, self.log_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.received = bytearray()
        self.loop = impl.EventLoop(
            self.listeners,
            service,
            protocol_factory=Misbehave if service == "protocol" else None,
            proxy_listeners=self.listeners[1:],
            access_log=self.log_w,
            **options,
        )
        self._stop = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.loop.run(0.05)
            self.loop.close()
        except BaseException as exc:  # reported by stop()
            self.errors.append(exc)

    def address(self, index: int = 0) -> tuple[str, int]:
        return self.listeners[index].getsockname()

    def lines(self) -> list[str]:
        try:
            while chunk := os.read(self.log_r, 1 << 16):
                self.received += chunk
        except BlockingIOError:
            pass
        text = self.received.decode()
        assert text == "" or text.endswith("\n") or "\n" in text
        return text.split("\n")[:-1]  # whole lines only

    def wait_lines(self, count: int, timeout: float = 30) -> list[str]:
        assert wait_until(lambda: len(self.lines()) >= count, timeout), self.lines()
        return self.lines()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive()
        for listener in self.listeners:
            listener.close()
        if self.errors:
            raise self.errors[0]

    def close_pipe(self) -> None:
        os.close(self.log_r)
        os.close(self.log_w)


def read_to_end(sock: socket.socket) -> bytes:
    sock.settimeout(30)
    data = bytearray()
    try:
        while chunk := sock.recv(1 << 16):
            data += chunk
    except ConnectionResetError:
        pass
    return bytes(data)


def reset(sock: socket.socket) -> None:
    """Close with a RST (SO_LINGER 0)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def script(impl: ModuleType) -> list[tuple[dict[str, Any], str]]:
    """Connections ending in every way; each line with the client it
    should name (HOST:PORT). Sequential: each waits for its line."""
    out: list[tuple[dict[str, Any], str]] = []

    me = host_port
    echo = LoopThread(impl, "echo", proxied=True, idle_timeout=IDLE)
    try:
        with socket.create_connection(echo.address(0)) as sock:  # eof
            sock.sendall(b"hello")
            sock.shutdown(socket.SHUT_WR)
            assert read_to_end(sock) == b"hello"
            out.append((parse(echo.wait_lines(1)[-1]), me(sock)))
        with socket.create_connection(echo.address(1)) as sock:  # through a balancer
            sock.sendall(PROXY_V1 + b"abc")
            sock.shutdown(socket.SHUT_WR)
            assert read_to_end(sock) == b"abc"
            out.append((parse(echo.wait_lines(2)[-1]), "192.0.2.7:40001"))
        with socket.create_connection(echo.address(1)) as sock:  # no header
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert read_to_end(sock) == b""
            out.append((parse(echo.wait_lines(3)[-1]), me(sock)))
        sock = socket.create_connection(echo.address(0))  # reset
        client = me(sock)
        sock.sendall(b"12345678")
        sock.settimeout(30)
        assert sock.recv(100) == b"12345678"
        reset(sock)
        out.append((parse(echo.wait_lines(4)[-1]), client))
        with socket.create_connection(echo.address(0)) as sock:  # says nothing
            assert read_to_end(sock) == b""
            out.append((parse(echo.wait_lines(5)[-1]), me(sock)))
        sock = socket.create_connection(echo.address(0))  # open when the worker leaves
        sock.sendall(b"x")
        sock.settimeout(30)
        assert sock.recv(10) == b"x"
        echo.stop()
        out.append((parse(echo.wait_lines(6)[-1]), me(sock)))
        sock.close()
    finally:
        echo.stop()
        echo.close_pipe()

    proto = LoopThread(impl, "protocol", idle_timeout=0, max_buffer=64 * 1024)
    try:
        with socket.create_connection(proto.address()) as sock:
            sock.sendall(b"boom")
            assert read_to_end(sock) == b""
            out.append((parse(proto.wait_lines(1)[-1]), me(sock)))
        with socket.socket() as sock:  # never reads: the protocol owes it too much
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(proto.address())
            sock.sendall(b"flood")
            out.append((parse(proto.wait_lines(2)[-1]), me(sock)))
        with socket.create_connection(proto.address()) as sock:
            sock.sendall(b"bye")
            assert read_to_end(sock) == b"ok"
            out.append((parse(proto.wait_lines(3)[-1]), me(sock)))
    finally:
        proto.stop()
        proto.close_pipe()
    return out


# (end, bytes in, bytes out or None when the kernel decides) in script order
EXPECTED = [
    ("eof", 5, 5),
    ("eof", 3, 3),
    ("proxy-rejected", 0, 0),
    ("reset", 8, 8),
    ("idle-timeout", 0, 0),
    ("shutdown", 1, 1),
    ("handler-error", 4, 0),
    ("max-buffer", 5, None),
    ("closed", 3, 2),
]


def implementations() -> list[ModuleType]:
    compiled = compiled_unless_disabled("_fastio")
    return [_fastio_py] + ([compiled] if compiled is not None else [])


def test_lines_say_what_happened_to_each_connection(impl):
    started = datetime.datetime.now(datetime.timezone.utc)
    lines = script(impl)
    assert [line["end"] for line, _ in lines] == [end for end, _, _ in EXPECTED]
    for (line, client), (end, nin, nout) in zip(lines, EXPECTED, strict=True):
        assert line["client"] == client, (end, line)
        assert line["pid"] == os.getpid()
        assert line["in"] == nin, (end, line)
        if nout is not None:
            assert line["out"] == nout, (end, line)
        skew = datetime.timedelta(seconds=1)
        assert started - skew <= line["time"] <= datetime.datetime.now(datetime.timezone.utc)
        assert line["duration"] >= 0
    flood = lines[7][0]
    assert flood["out"] > 64 * 1024  # what the kernel took before the cut: more than the cap
    idle = lines[4][0]
    assert idle["duration"] >= IDLE * 0.99  # not closed early, for another reason


def test_compiled_and_twin_write_the_same_fields():
    """The differential check: the same script, field by field (the time,
    duration and client ports differ by nature; so does what the kernel took
    of a flood)."""
    impls = implementations()
    if len(impls) < 2:
        pytest.skip("PREFORK_NO_EXTENSIONS=1: the compiled module is not built")

    def comparable(lines: list[tuple[dict[str, Any], str]]) -> list[tuple[Any, ...]]:
        return [
            (
                line["client"].rsplit(":", 1)[0],
                line["client"] == client,
                line["in"],
                line["out"] if line["end"] != "max-buffer" else None,
                line["end"],
            )
            for line, client in lines
        ]

    assert comparable(script(impls[0])) == comparable(script(impls[1]))


def test_a_log_that_takes_nothing_costs_lines_not_service(impl):
    """The pipe is full and nobody reads it: the loop keeps serving, drops
    what does not fit its buffer and counts it; once the pipe is read, the
    buffered lines come out whole, and lines + dropped = connections."""
    loop = LoopThread(impl, "echo", idle_timeout=0)
    try:
        fcntl.fcntl(loop.log_w, fcntl.F_SETPIPE_SZ, 4096)
        filler = b"#" * 4096
        while True:  # fill the pipe: the loop's writes get EAGAIN
            try:
                os.write(loop.log_w, filler)
            except BlockingIOError:
                break
        line_size = len("2026-12-01T18:27:48.123Z 127.0.0.1:65535 4242 0.000123 2 2 eof\n")
        connections = ACCESS_LOG_BUFFER // line_size + 200  # more than the buffer holds
        for i in range(connections):
            with socket.create_connection(loop.address()) as sock:
                sock.sendall(b"hi")
                sock.shutdown(socket.SHUT_WR)
                assert read_to_end(sock) == b"hi", i  # served while the log is stuck
        assert wait_until(lambda: loop.loop.accepted == connections and not loop.loop.active, 30)
        assert loop.loop.access_log_dropped > 0
        drained = bytearray()

        def all_written() -> bool:  # read the pipe; the loop flushes at every tick
            try:
                while chunk := os.read(loop.log_r, 1 << 16):
                    drained.extend(chunk)
            except BlockingIOError:
                pass
            text = drained.replace(b"#", b"").decode()
            written = text.count("\n")
            return written + loop.loop.access_log_dropped == connections

        assert wait_until(all_written, 30), (len(drained), loop.loop.access_log_dropped)
        lines = drained.replace(b"#", b"").decode().splitlines()
        assert all(parse(line)["end"] == "eof" for line in lines)  # whole lines only
    finally:
        loop.stop()
        loop.close_pipe()


# -- real servers -----------------------------------------------------------------------


@pytest.fixture(params=["cython", "python"])
def implementation_env(request) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PREFORK_NO_EXTENSIONS", None)
    if request.param == "python":
        env["PREFORK_NO_EXTENSIONS"] = "1"
    elif os.environ.get("PREFORK_NO_EXTENSIONS", "") not in ("", "0"):
        pytest.skip("PREFORK_NO_EXTENSIONS=1: the compiled module is not built")
    return env


def host_port(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def file_lines(path) -> list[str]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return text.split("\n")[:-1]


@pytest.mark.parametrize("k", ["event", "sync", "thread", "asyncio"])
def test_every_worker_class_logs_and_usr1_reopens(server_factory, implementation_env, k, tmp_path):
    path = tmp_path / "access.log"
    server = server_factory(
        "-w", "1", *WORKER_CLASS_ARGS[k], "--access-log", str(path),
        "-b", "127.0.0.1:0", "-b", "proxy:127.0.0.1:0",
        env=implementation_env,
    )  # fmt: skip
    (worker,) = server.wait_workers(1)
    with server.connect(0) as sock:
        me = host_port(sock)
        sock.sendall(b"hello")
        sock.shutdown(socket.SHUT_WR)
        assert read_to_end(sock) == b"hello"
    with server.connect(1) as sock:
        sock.sendall(PROXY_V1 + b"abc")
        sock.shutdown(socket.SHUT_WR)
        assert read_to_end(sock) == b"abc"
    with server.connect(1) as sock:
        rejected = host_port(sock)
        sock.sendall(b"PROXY TCP4 not an address\r\n")
        assert read_to_end(sock) == b""
    assert wait_until(lambda: len(file_lines(path)) == 3, 10), (file_lines(path), server.log)
    lines = [parse(line) for line in file_lines(path)]
    assert [(ln["client"], ln["in"], ln["out"], ln["end"]) for ln in lines] == [
        (me, 5, 5, "eof"),
        ("192.0.2.7:40001", 3, 3, "eof"),
        (rejected, 0, 0, "proxy-rejected"),
    ]
    assert {ln["pid"] for ln in lines} == {worker}

    rotated = tmp_path / "access.log.1"
    path.rename(rotated)
    server.signal(signal.SIGUSR1)

    def logged_to_new_file() -> bool:
        with server.connect(0) as sock:
            sock.sendall(b"x")
            sock.shutdown(socket.SHUT_WR)
            assert read_to_end(sock) == b"x"
        return wait_until(lambda: len(file_lines(path)) > 0, 2)

    assert wait_until(logged_to_new_file, 30), server.log
    assert parse(file_lines(path)[0])["end"] == "eof"
    assert len(file_lines(rotated)) >= 3


def test_an_access_log_that_cannot_be_opened_is_a_one_line_error(tmp_path):
    result = run("serve", "-b", "127.0.0.1:0", "--access-log", str(tmp_path / "no" / "such"))
    assert_one_line_error(result, 1, "--access-log", "cannot open")


def test_a_reload_to_a_path_that_cannot_be_opened_keeps_serving(server_factory, tmp_path):
    """Checked at start only: after a HUP the new workers say why and serve
    without a log rather than failing to boot."""
    config = tmp_path / "prefork.toml"
    good = tmp_path / "access.log"
    config.write_text(f'access-log = "{good}"\nworkers = 1\n')
    server = server_factory("-c", str(config))
    (first,) = server.wait_workers(1)
    bad = tmp_path / "no" / "such" / "access.log"
    config.write_text(f'access-log = "{bad}"\nworkers = 1\n')
    server.signal(signal.SIGHUP)
    assert wait_until(lambda: f"--access-log {bad}: cannot open" in server.log, 15), server.log
    assert wait_until(lambda: first not in server.workers() and len(server.workers()) == 1, 15)
    with server.connect() as sock:
        sock.sendall(b"still here")
        sock.shutdown(socket.SHUT_WR)
        assert read_to_end(sock) == b"still here"
