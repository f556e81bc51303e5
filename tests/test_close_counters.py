"""Why workers close or turn away connections, counted per worker in the
scoreboard and shown on the --metrics page: the idle timeout, --max-buffer,
a user handler that raised, a refused PROXY header. Each is caused over real
sockets against a real server, in both hot-loop implementations."""

from __future__ import annotations

import os
import socket
import textwrap
import time
import urllib.request

import pytest

from support import WORKER_CLASS_ARGS, handler_env, wait_until

pytestmark = pytest.mark.timeout(90)

COUNTERS = ("idle_closed", "max_buffer_closed", "handler_errors", "proxy_rejected")

HANDLERS = textwrap.dedent(
    '''
    import socket

    class Misbehave:
        """b"boom" raises; b"flood" writes until the loop cuts the connection off."""

        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):
            if b"boom" in data:
                raise RuntimeError("boom requested")
            if b"flood" in data:
                chunk = b"f" * 65536
                for _ in range(4096):  # 256 MiB at most: more than any socket buffers
                    if self.transport.is_closing():
                        break
                    self.transport.write(chunk)
                return
            self.transport.write(data)

        def eof_received(self):
            return False

        def connection_lost(self, exc):
            pass
    '''
)


def scrape(address: str) -> dict[str, float]:
    """The per-worker counters summed over the workers, by counter name."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        text = response.read().decode()
    totals = dict.fromkeys(COUNTERS, 0.0)
    for line in text.splitlines():
        for name in COUNTERS:
            if line.startswith(f"prefork_worker_{name}_total{{"):
                totals[name] += float(line.rsplit(" ", 1)[1])
    return totals


def metrics_address(server) -> str:
    for line in server.lines:
        if "metrics on http://" in line:
            return line.split("metrics on http://", 1)[1].split("/", 1)[0]
    raise AssertionError(server.log)


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """Read (and drop) until the server closes or resets; False on timeout."""
    sock.settimeout(timeout)
    try:
        while sock.recv(1 << 16):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


@pytest.fixture(params=["cython", "python"])
def implementation_env(request, tmp_path) -> dict[str, str]:
    (tmp_path / "misbehave.py").write_text(HANDLERS)
    env = handler_env(tmp_path)
    env.pop("PREFORK_NO_EXTENSIONS", None)
    if request.param == "python":
        env["PREFORK_NO_EXTENSIONS"] = "1"
    elif os.environ.get("PREFORK_NO_EXTENSIONS", "") not in ("", "0"):
        pytest.skip("PREFORK_NO_EXTENSIONS=1: the compiled module is not built")
    return env


def test_event_workers_count_each_reason_for_closing(server_factory, implementation_env):
    idle_timeout = 2.0
    server = server_factory(
        "-w", "1", "-k", "event", "--handler", "misbehave:Misbehave",
        "--idle-timeout", str(idle_timeout), "--max-buffer", "64K",
        "-b", "127.0.0.1:0", "-b", "proxy:127.0.0.1:0", "--metrics", "127.0.0.1:0",
        env=implementation_env,
    )  # fmt: skip
    address = metrics_address(server)
    assert scrape(address) == dict.fromkeys(COUNTERS, 0)

    with server.connect(0) as sock:  # a handler that raises
        sock.sendall(b"boom")
        assert closed_by_server(sock, 30)
    assert wait_until(lambda: scrape(address)["handler_errors"] == 1, 10), scrape(address)

    with socket.socket() as sock:  # a client that never reads, a protocol that writes
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(10)
        sock.connect(server.tcp(0))
        sock.sendall(b"flood")
        assert wait_until(lambda: scrape(address)["max_buffer_closed"] == 1, 30), scrape(address)

    with server.connect(1) as sock:  # not a PROXY header
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert closed_by_server(sock, 30)
    assert wait_until(lambda: scrape(address)["proxy_rejected"] == 1, 10), scrape(address)
    with server.connect(1):  # leaves before any header: a health check, not refused
        pass

    with server.connect(0) as sock:  # says nothing
        started = time.monotonic()
        assert closed_by_server(sock, 30 + idle_timeout)
        assert time.monotonic() - started >= idle_timeout * 0.9  # not closed for another reason
    assert wait_until(lambda: scrape(address)["idle_closed"] == 1, 10), scrape(address)
    assert scrape(address) == dict.fromkeys(COUNTERS, 1)


@pytest.mark.parametrize("k", ["sync", "thread"])
def test_blocking_workers_count_handler_errors_and_proxy_rejections(
    server_factory, implementation_env, k
):
    server = server_factory(
        "-w", "1", *WORKER_CLASS_ARGS[k], "--handler", "misbehave:Misbehave",
        "-b", "127.0.0.1:0", "-b", "proxy:127.0.0.1:0", "--metrics", "127.0.0.1:0",
        env=implementation_env,
    )  # fmt: skip
    address = metrics_address(server)
    with server.connect(0) as sock:
        sock.sendall(b"boom")
        assert closed_by_server(sock, 30)
    with server.connect(1) as sock:
        sock.sendall(b"PROXY TCP4 not an address\r\n")
        assert closed_by_server(sock, 30)
    with server.connect(1):  # leaves before any header: not refused
        pass
    with server.connect(0) as sock:  # a plain echo closes normally: nothing counted
        sock.sendall(b"hi")
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(10) == b"hi"
    expected = {"idle_closed": 0, "max_buffer_closed": 0, "handler_errors": 1, "proxy_rejected": 1}
    assert wait_until(lambda: scrape(address) == expected, 10), scrape(address)
