"""Helpers the tests share: starting real ``prefork`` processes, /proc
readers, socket helpers and the one-line-error assertion.

Tests import helpers from here and fixtures come from conftest.py; no test
module imports another test module.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import pytest

from prefork import fastio

STARTUP_TIMEOUT = 15.0

# The options that select each worker class, for tests run once per class.
WORKER_CLASS_ARGS = {
    "event": ["-k", "event"],
    "sync": ["-k", "sync"],
    "thread": ["-k", "thread", "--threads", "4"],
    "asyncio": ["-k", "asyncio"],
}


def require_compiled(name: str) -> ModuleType:
    """The compiled module ``prefork.NAME``, built beside its pure-Python twin
    ``prefork/NAME_py.py``. Not built: skip under PREFORK_NO_EXTENSIONS=1
    (nothing was compiled), fail otherwise. Built somewhere else (an old
    editable install, another checkout on ``sys.path``): fail, since the
    tests would compare the twin with a different program."""
    compiled = fastio.import_compiled(name)
    if compiled is None:
        if fastio.extensions_disabled():
            pytest.skip("PREFORK_NO_EXTENSIONS=1: the compiled module is not built")
        pytest.fail(f"prefork.{name} is not built (and PREFORK_NO_EXTENSIONS is not set)")
    twin = importlib.import_module(f"prefork.{name}_py")
    here = os.path.dirname(os.path.realpath(twin.__file__ or ""))
    there = os.path.dirname(os.path.realpath(compiled.__file__ or ""))
    if there != here:
        pytest.fail(f"prefork.{name} was loaded from {there}, not beside its twin in {here}")
    return compiled


def compiled_unless_disabled(name: str) -> ModuleType | None:
    """None under PREFORK_NO_EXTENSIONS=1, else ``require_compiled(name)``: for
    a test of the twin that also compares the compiled module when it should
    be there."""
    return None if fastio.extensions_disabled() else require_compiled(name)


def handler_env(path) -> dict[str, str]:
    """The environment for a server that imports handler modules from ``path``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(path) + os.pathsep + env.get("PYTHONPATH", "")
    return env


TESTS_DIR = os.path.dirname(os.path.abspath(__file__))  # holds handlers/faulty.py


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected (client, server) pair of TCP sockets over loopback."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return client, server


# -- real servers ---------------------------------------------------------------


def children_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def connections_per_worker(port: int) -> dict[int, int]:
    """Established server-side sockets on ``port`` by owning pid (from ss)."""
    out = subprocess.run(
        ["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    counts: collections.Counter[int] = collections.Counter()
    for match in re.finditer(r"pid=(\d+),", out):
        counts[int(match.group(1))] += 1
    return dict(counts)


def process_state(pid: int | str) -> str | None:
    """The state letter in ``/proc/PID/stat`` (R, S, Z...), None once ``pid`` is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie. A process whose first
    thread has exited shows as a zombie while its other threads still exit,
    holding its descriptors (a listening socket among them): it is alive
    until none of its threads is left."""
    state = process_state(pid)
    if state != "Z":
        return state is not None
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return False
    return any(process_state(f"{pid}/task/{tid}") not in (None, "Z", "X") for tid in threads)


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """Resident bytes of ``pid``."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def anon_bytes(pid: int) -> int:
    """Resident anonymous bytes of ``pid`` (RssAnon): what buffers and heaps
    cost, without the pages of its files (the interpreter's own code and
    data, read in the first time a path of it runs)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no RssAnon in /proc/{pid}/status")


def owed_memory_bound(clients: int, max_buffer: int) -> int:
    """The most resident memory ``clients`` peers that never read may cost a
    worker: each is owed at most ``max_buffer`` bytes (--max-buffer), kept in
    one allocation per connection. The compiled loop reallocs to exactly what
    is owed; the twin's bytearray may grow an eighth past it (CPython's
    over-allocation, plus a few bytes); an allocation touches at most one
    page more than its size, and its allocator header may take one more."""
    page = os.sysconf("SC_PAGE_SIZE")
    return clients * (max_buffer + max_buffer // 8 + 2 * page)


def wait_until(predicate, timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# -- timing bounds -----------------------------------------------------------------

# The loops wait in epoll_wait, which takes whole milliseconds: both round a
# wait up (the compiled loop by hand, select.epoll.poll by CPython's rule), so
# a timer in the loop fires up to this much after it is due.
EPOLL_RESOLUTION = 0.001


class WakeupProbe:
    """How late this machine wakes a sleeping thread, measured while a test runs.

    A timing bound is the behaviour's own figure (a timeout, a sweep
    interval, a ping interval) plus the delays of the wake-ups on the path
    the test times: a loop woken by its timer, a client woken by the close
    it waits for. Those delays follow the machine's load (two busy cores
    make them milliseconds), so they are measured in the same window instead
    of guessed: a thread sleeps PERIOD again and again and keeps its largest
    overshoot, ``worst``. ``allowance(n)`` is what n wake-ups may add: TAIL
    times the worst seen for each, because the probe samples its own
    wake-ups, not the ones the bound is about, and one of those may land
    further out in the same tail.

    Use it as a context manager around what the bound covers.
    """

    PERIOD = 0.005
    TAIL = 3.0

    def __init__(self) -> None:
        self.worst = 0.0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> WakeupProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            asked = time.monotonic() + self.PERIOD
            time.sleep(self.PERIOD)
            self.worst = max(self.worst, time.monotonic() - asked)
            self.samples += 1

    def allowance(self, wakeups: int, round_trip: float = 0.0) -> float:
        """Seconds that ``wakeups`` scheduler wake-ups may add to a timed path;
        or, if more, TAIL times a ``round_trip`` measured meanwhile on a path
        of the same shape (the work between the wake-ups included)."""
        assert self.samples > 0, "the probe has not run"
        return self.TAIL * max(wakeups * self.worst, round_trip)

    def __str__(self) -> str:
        return f"worst wake-up {self.worst * 1e3:.2f} ms over {self.samples} samples"


class KeepTalking:
    """A thread that echoes PING on ``sock`` every ``period`` seconds until
    the block ends: a connection that is never idle, beside one that is.
    ``failure`` is what went wrong on it, if anything (the caller asserts).

    ``worst_rtt`` is the longest round trip: a server's wake-up on input,
    its work, and ours on the answer, the same shape as a close the server
    decides on its own and we wait for, so a bound on such a close may
    allow for it (``WakeupProbe.allowance(2, talking.worst_rtt)``)."""

    PING = b"ping"

    def __init__(self, sock: socket.socket, period: float) -> None:
        self.sock = sock
        self.period = period
        self.pings = 0
        self.worst_rtt = 0.0
        self.failure: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> KeepTalking:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        self.sock.settimeout(10)
        try:
            while not self._stop.wait(self.period):
                sent_at = time.monotonic()
                self.sock.sendall(self.PING)
                got = b""
                while len(got) < len(self.PING):
                    chunk = self.sock.recv(len(self.PING) - len(got))
                    if not chunk:
                        raise ConnectionError("the busy connection was closed")
                    got += chunk
                assert got == self.PING, got
                self.worst_rtt = max(self.worst_rtt, time.monotonic() - sent_at)
                self.pings += 1
        except BaseException as exc:  # reported by the caller
            self.failure = exc


_LISTENING = re.compile(r"listening on (\S+)")


@dataclass
class Server:
    proc: subprocess.Popen
    lines: list[str] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def workers(self) -> list[int]:
        return [p for p in children_of(self.pid) if pid_alive(p)]

    def wait_workers(self, count: int, timeout: float = 10.0) -> list[int]:
        assert wait_until(lambda: len(self.workers()) == count, timeout), (
            f"expected {count} workers, have {self.workers()}\n{self.log}"
        )
        return self.workers()

    def tcp(self, index: int = 0) -> tuple[str, int]:
        text = self.addresses[index]
        host, _, port = text.rpartition(":")
        return host.strip("[]"), int(port)

    def connect(self, index: int = 0, timeout: float = 10.0) -> socket.socket:
        text = self.addresses[index]
        if text.startswith("unix:"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(text[5:])
            return sock
        return socket.create_connection(self.tcp(index), timeout=timeout)

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def kill_all(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        if self._reader is not None:
            self._reader.join(5)


def _read_lines(server: Server, ready: threading.Event) -> None:
    assert server.proc.stderr is not None
    for raw in server.proc.stderr:
        line = raw.decode(errors="replace").rstrip("\n")
        server.lines.append(line)
        match = _LISTENING.search(line)
        if match:
            server.addresses.append(match.group(1))
        if "master started" in line:
            ready.set()
    ready.set()


def prefork_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefork", *args]


def start_server(
    *args: str,
    env: dict[str, str] | None = None,
    any_port: bool = True,
    preexec_fn=None,
    pass_fds: tuple[int, ...] = (),
) -> Server:
    """Start ``prefork serve ARGS``, on 127.0.0.1:0 unless ``-b`` is given or
    ``any_port`` is false (then the server's own default applies)."""
    argv = list(args)
    if any_port and "-b" not in argv:
        argv = ["-b", "127.0.0.1:0", *argv]
    return launch(prefork_command("serve", *argv), env, preexec_fn, pass_fds)


def launch(
    command: list[str],
    env: dict[str, str] | None = None,
    preexec_fn=None,
    pass_fds: tuple[int, ...] = (),
) -> Server:
    """Run ``command`` (a server, or a wrapper that execs one) in its own
    session and wait for its "master started" log line."""
    proc = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env=env,
        preexec_fn=preexec_fn,
        pass_fds=pass_fds,
    )
    server = Server(proc)
    ready = threading.Event()
    server._reader = threading.Thread(target=_read_lines, args=(server, ready), daemon=True)
    server._reader.start()
    if not ready.wait(STARTUP_TIMEOUT) or proc.poll() is not None:
        server.kill_all()
        raise AssertionError(f"server did not start:\n{server.log}")
    return server


def exchange(sock: socket.socket, payload: bytes, timeout: float = 60.0) -> bytes:
    """Send ``payload`` from a thread while reading the echo; half-close after.

    Reads until end of file, so the result is everything the server sent.
    """
    sock.settimeout(timeout)
    errors: list[BaseException] = []

    def send() -> None:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    chunks = []
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    sender.join(timeout)
    if errors:
        raise errors[0]
    return b"".join(chunks)


def run(
    *args: str, preexec_fn=None, timeout: float = 30, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``prefork ARGS`` to its end, in its own session, output captured."""
    return subprocess.run(
        prefork_command(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        preexec_fn=preexec_fn,
        start_new_session=True,
        env=env,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("prefork: error: "), lines[0]
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0]


# -- the --metrics endpoint ----------------------------------------------------------

_SAMPLE_LINE = re.compile(r"^(\w+)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metrics_address(server: Server) -> str:
    """HOST:PORT of a server's --metrics endpoint, from its log."""
    match = re.search(r"metrics on http://(\S+)/metrics", server.log)
    assert match, server.log
    return match.group(1)


def scrape_text(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return str(response.read().decode())


def scrape(address: str) -> dict[str, float]:
    """Every sample of /metrics: its name with its labels, as written -> value."""
    values = {}
    for line in scrape_text(address).splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def samples_of(values: dict[str, float], metric: str) -> list[tuple[dict[str, str], float]]:
    """The samples of ``metric`` in ``scrape``'s result, each with its labels."""
    found = []
    for key, value in values.items():
        match = _SAMPLE_LINE.match(f"{key} 0")
        assert match, key
        if match.group(1) == metric:
            found.append((dict(_LABEL.findall(match.group(2) or "")), value))
    return found


class ConnectEchoLoad:
    """Clients in threads, each connecting, echoing a payload of up to 200 KB
    and closing, over and over until stopped: the load under which reloads
    and upgrades must lose nothing. ``failures`` says what went wrong."""

    def __init__(self, server: Server, clients: int = 6) -> None:
        self.server = server
        self.failures: list[str] = []
        self.done = [0] * clients
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(n,)) for n in range(clients)]

    def __enter__(self) -> ConnectEchoLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _client(self, n: int) -> None:
        i = 0
        while not self._stop.is_set():
            payload = os.urandom(1 + (i * 7919 + n * 104729) % 200_000)
            try:
                with self.server.connect(timeout=20) as sock:
                    if exchange(sock, payload, timeout=20) != payload:
                        self.failures.append(f"client {n}: echo differs")
            except OSError as exc:
                self.failures.append(f"client {n}: {exc!r}")
            self.done[n] += 1
            i += 1


@contextlib.contextmanager
def running_haproxy(config: Path, front: int) -> Iterator[subprocess.Popen]:
    """HAProxy with ``config`` in its own session, until its frontend port
    ``front`` takes connections; killed (its whole group) on the way out."""
    haproxy = subprocess.Popen(
        ["haproxy", "-db", "-f", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:

        def up() -> bool:
            try:
                socket.create_connection(("127.0.0.1", front), timeout=1).close()
                return True
            except OSError:
                return haproxy.poll() is not None  # died: stop waiting, report below

        assert wait_until(up, 10) and haproxy.poll() is None, haproxy.stderr
        yield haproxy
    finally:
        os.killpg(haproxy.pid, signal.SIGKILL)
        haproxy.wait(10)
