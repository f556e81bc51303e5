"""The master's metrics endpoint: the scoreboard in Prometheus text format.

``--metrics HOST:PORT`` makes the master answer ``GET /metrics`` (anything
else is a 404). The master serves it from its own loop, without threads (a
master with threads would fork workers with their locks held): sockets are
non-blocking, a request must arrive whole within ``REQUEST_TIMEOUT`` and fit
in ``MAX_REQUEST`` bytes, and at most ``MAX_CLIENTS`` are served at once, so
a slow or hostile client can never stall supervision. ``metrics_page``
builds the page from the master's worker records and the scoreboard.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from prefork.server.listeners import Listener, create_listener
from prefork.server.scoreboard import Scoreboard
from prefork.settings import Address

MAX_REQUEST = 8192  # bytes of request head we read before giving up
MAX_CLIENTS = 16
REQUEST_TIMEOUT = 2.0  # seconds a client has to send its request
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class _Client:
    sock: socket.socket
    deadline: float
    request: bytearray = field(default_factory=bytearray)


@dataclass(frozen=True)
class Sample:
    """One worker's line in the table."""

    age: int
    pid: int
    generation: int
    active: int
    accepted: int
    bytes_in: int
    bytes_out: int
    heartbeat_age: float  # seconds; -1 while it waits on a client
    state: str = "serving"  # booting, serving, stopping (told to finish and exit)


class Supervised(Protocol):
    """What the page needs of the master's record of a worker."""

    age: int
    generation: int
    slot: int
    stopping: bool


def sample_workers(workers: Mapping[int, Supervised], scoreboard: Scoreboard) -> list[Sample]:
    """What every live worker (by pid) has done, from the scoreboard, oldest first."""
    now = time.monotonic()
    samples = []
    for pid, record in sorted(workers.items(), key=lambda item: item[1].age):
        stats = scoreboard.read(record.slot)
        beat_age = now - stats.heartbeat if stats.heartbeat > 0 else -1.0
        samples.append(
            Sample(
                record.age,
                pid,
                record.generation,
                stats.active,
                stats.accepted,
                stats.bytes_in,
                stats.bytes_out,
                beat_age,
                "stopping" if record.stopping else "serving" if stats.pid else "booting",
            )
        )
    return samples


def metrics_page(
    workers: Mapping[int, Supervised],
    scoreboard: Scoreboard,
    generation: int,
    exited_totals: dict[str, int],
) -> bytes:
    """The page: the live workers, and the totals with what exited ones served."""
    samples = sample_workers(workers, scoreboard)
    totals = dict(exited_totals)
    for s in samples:
        totals["connections_accepted"] += s.accepted
        totals["bytes_in"] += s.bytes_in
        totals["bytes_out"] += s.bytes_out
    return render(samples, generation, totals)


def render(samples: list[Sample], generation: int, totals: dict[str, int]) -> bytes:
    """The Prometheus text exposition of the scoreboard."""
    lines = [
        "# HELP prefork_workers Worker processes running.",
        "# TYPE prefork_workers gauge",
        f"prefork_workers {len(samples)}",
        "# HELP prefork_generation Reload generation (bumped by every HUP).",
        "# TYPE prefork_generation gauge",
        f"prefork_generation {generation}",
    ]
    for name, help_text in (
        ("connections_accepted", "Connections accepted, all workers ever."),
        ("bytes_in", "Bytes received, all workers ever."),
        ("bytes_out", "Bytes sent, all workers ever."),
    ):
        lines += [
            f"# HELP prefork_{name}_total {help_text}",
            f"# TYPE prefork_{name}_total counter",
            f"prefork_{name}_total {totals[name]}",
        ]
    per_worker = (
        ("worker_connections_active", "gauge", "Open connections of a worker.", "active"),
        ("worker_connections_accepted_total", "counter", "Accepted by a worker.", "accepted"),
        ("worker_bytes_in_total", "counter", "Bytes a worker received.", "bytes_in"),
        ("worker_bytes_out_total", "counter", "Bytes a worker sent.", "bytes_out"),
        (
            "worker_heartbeat_age_seconds",
            "gauge",
            "Since a worker's last heartbeat; -1 while it waits on a client.",
            "heartbeat_age",
        ),
    )
    for name, kind, help_text, attr in per_worker:
        lines += [f"# HELP prefork_{name} {help_text}", f"# TYPE prefork_{name} {kind}"]
        for s in samples:
            labels = f'worker="{s.age}",pid="{s.pid}",generation="{s.generation}"'
            value = getattr(s, attr)
            text = f"{value:.3f}" if isinstance(value, float) else str(value)
            lines.append(f"prefork_{name}{{{labels}}} {text}")
    lines += [
        "# HELP prefork_worker_state A worker's state: booting, serving or stopping.",
        "# TYPE prefork_worker_state gauge",
    ]
    for s in samples:
        labels = f'worker="{s.age}",pid="{s.pid}",generation="{s.generation}",state="{s.state}"'
        lines.append(f"prefork_worker_state{{{labels}}} 1")
    return ("\n".join(lines) + "\n").encode()


class MetricsServer:
    """A tiny HTTP/1.0 server run from the master's loop."""

    def __init__(self, address: Address) -> None:
        self.listener: Listener = create_listener(address, backlog=MAX_CLIENTS)
        self.clients: dict[int, _Client] = {}

    @property
    def name(self) -> str:
        return self.listener.name

    def fds(self) -> list[int]:
        """Descriptors the master's select must watch for reading."""
        return [self.listener.fileno(), *self.clients]

    def timeout(self, now: float) -> float | None:
        """Seconds until the next client deadline, if any."""
        if not self.clients:
            return None
        return max(0.0, min(c.deadline for c in self.clients.values()) - now)

    def handle(self, readable: list[int], page: Callable[[], bytes]) -> None:
        now = time.monotonic()
        if self.listener.fileno() in readable:
            self._accept(now)
        for fd in [fd for fd in readable if fd in self.clients]:
            self._read(self.clients[fd], page)
        for fd, client in list(self.clients.items()):
            if now >= client.deadline:
                self._drop(fd)

    def close(self) -> None:
        for fd in list(self.clients):
            self._drop(fd)
        self.listener.close()

    def _accept(self, now: float) -> None:
        while len(self.clients) < MAX_CLIENTS:
            try:
                sock, _ = self.listener.sock.accept()
            except (BlockingIOError, ConnectionAbortedError):
                return
            except OSError:  # EMFILE and kin: the client waits in the backlog
                return
            sock.setblocking(False)
            self.clients[sock.fileno()] = _Client(sock, now + REQUEST_TIMEOUT)

    def _read(self, client: _Client, page: Callable[[], bytes]) -> None:
        fd = client.sock.fileno()
        try:
            data = client.sock.recv(MAX_REQUEST)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        client.request += data
        if data and b"\r\n\r\n" not in client.request and len(client.request) < MAX_REQUEST:
            return  # not whole yet
        if b"\r\n\r\n" in client.request:
            request_line = bytes(client.request).split(b"\r\n", 1)[0].split()
            if request_line[:2] == [b"GET", b"/metrics"]:
                self._respond(client.sock, "200 OK", page())
            else:
                self._respond(client.sock, "404 Not Found", b"try /metrics\n")
        self._drop(fd)

    def _respond(self, sock: socket.socket, status: str, body: bytes) -> None:
        head = (
            f"HTTP/1.0 {status}\r\nContent-Type: {CONTENT_TYPE}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        try:
            sock.settimeout(1.0)  # a page is a few KiB: the kernel takes it at once
            sock.sendall(head + body)
        except OSError:
            pass

    def _drop(self, fd: int) -> None:
        client = self.clients.pop(fd)
        client.sock.close()
