"""The master's metrics endpoint: Prometheus text at /metrics, a status page at /.

``--metrics HOST:PORT`` makes the master answer ``GET /metrics`` (the
Prometheus text format) and ``GET /`` (an HTML page for people,
``status_page.py``); anything else is a 404. The master serves them from its
own loop, without threads (a master with threads would fork workers with
their locks held): sockets are non-blocking, a request must arrive whole
within ``REQUEST_TIMEOUT`` and fit in ``MAX_REQUEST`` bytes, and at most
``MAX_CLIENTS`` are served at once, so a slow or hostile client can never
stall supervision.

Each request reads a ``Snapshot`` (``snapshot.py``) from the master; this
module only formats it. Every scoreboard field is a per-worker series
(``prefork_worker_FIELD_total`` for a counter) and every counter a total
(``prefork_FIELD_total``, every worker ever), named in ``_SERIES_NAMES``
where the series' name is not the field's; fields that count one thing by
reason share a series with a ``reason`` label (``_LABELED``).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prefork._fastio_common import LIMIT_REFUSALS, UDP_REFUSALS
from prefork.server.listeners import Listener, create_listener
from prefork.server.snapshot import (
    SLOT_COUNTERS,
    SLOT_GAUGES,
    SLOT_VALUES,
    ListenerSample,
    Sample,
    Snapshot,
)
from prefork.server.status_page import render_page
from prefork.settings import Address

MAX_REQUEST = 8192  # bytes of request head we read before giving up
MAX_CLIENTS = 16
REQUEST_TIMEOUT = 2.0  # seconds a client has to send its request
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
HTML_CONTENT_TYPE = "text/html; charset=utf-8"

# A field's name in the series where it is not the field's own, and its help.
_SERIES_NAMES = {"accepted": "connections_accepted", "active": "connections_active"}
_SLOT_HELP = {
    "accepted": "Connections accepted",
    "active": "Open connections",
    "bytes_in": "Bytes received",
    "bytes_out": "Bytes sent",
    "idle_closed": "Connections closed by --idle-timeout",
    "max_buffer_closed": "Connections closed for owing a peer more than --max-buffer",
    "handler_errors": "User handler exceptions",
    "proxy_rejected": "Connections refused at the PROXY header (untrusted peer or bad header)",
    "udp_refused": "Datagrams left unanswered, by reason: loop (from a port below 1024 or"
    " one this server serves UDP on), source (from a broadcast, multicast or unspecified"
    " address), rate (over --udp-rate for the source prefix)",
    "udp_rate_evictions": "Source prefixes still limited pushed out of the full --udp-rate"
    " table (raise --udp-rate-table)",
    "limit_refused": "Connections closed unserved by a per-client limit, by reason: conns"
    " (over --max-conns-per-ip), rate (over --conn-rate-per-ip)",
    "limit_evictions": "Clients still counted or limited pushed out of a full per-client"
    " table (raise --per-ip-table)",
}
# Slot fields shown as one series with a label: field -> (series, label, value).
_LABELED = {f"udp_refused_{reason}": ("udp_refused", "reason", reason) for reason in UDP_REFUSALS}
_LABELED.update(
    {f"limit_refused_{reason}": ("limit_refused", "reason", reason) for reason in LIMIT_REFUSALS}
)


def series_name(slot_field: str) -> str:
    """``prefork_worker_<this>_total`` and ``prefork_<this>_total`` for a slot field."""
    if slot_field in _LABELED:
        return _LABELED[slot_field][0]
    return _SERIES_NAMES.get(slot_field, slot_field)


def series_label(slot_field: str) -> str:
    """The label that tells a field from the others of its series, or ""."""
    if slot_field not in _LABELED:
        return ""
    _, label, value = _LABELED[slot_field]
    return f"{label}={_label(value)}"


def _series_groups(fields: tuple[str, ...]) -> dict[str, list[str]]:
    """The fields by the series they are shown in, in slot order."""
    groups: dict[str, list[str]] = {}
    for name in fields:
        groups.setdefault(series_name(name), []).append(name)
    return groups


def slot_help(slot_field: str) -> str:
    return _SLOT_HELP.get(slot_field, f"Scoreboard field {slot_field}")


@dataclass
class _Client:
    sock: socket.socket
    deadline: float
    request: bytearray = field(default_factory=bytearray)


def _label(value: object) -> str:
    """A label value as the text format quotes it."""
    text = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{text}"'


def _number(value: float | int) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def render(snapshot: Snapshot) -> bytes:
    """The Prometheus text exposition of ``snapshot``."""
    samples, totals = snapshot.workers, snapshot.totals
    lines = [
        "# HELP prefork_workers Worker processes running.",
        "# TYPE prefork_workers gauge",
        f"prefork_workers {len(samples)}",
        "# HELP prefork_generation Reload generation (bumped by every HUP).",
        "# TYPE prefork_generation gauge",
        f"prefork_generation {snapshot.master.generation}",
    ]
    for base, names in _series_groups(SLOT_COUNTERS).items():
        series = f"prefork_{base}_total"
        lines += [
            f"# HELP {series} {slot_help(base)}, all workers ever.",
            f"# TYPE {series} counter",
        ]
        for name in names:
            label = series_label(name)
            lines.append(
                f"{series}{{{label}}} {totals.get(name, 0)}"
                if label
                else f"{series} {totals.get(name, 0)}"
            )

    def worker_labels(s: Sample) -> str:
        return f"worker={_label(s.age)},pid={_label(s.pid)},generation={_label(s.generation)}"

    for base, names in _series_groups(SLOT_VALUES).items():
        gauge = names[0] in SLOT_GAUGES
        series = f"prefork_worker_{base}" + ("" if gauge else "_total")
        lines += [
            f"# HELP {series} {slot_help(base)}, by one worker.",
            f"# TYPE {series} {'gauge' if gauge else 'counter'}",
        ]
        for name in names:
            label = "".join(f",{text}" for text in [series_label(name)] if text)
            lines += [f"{series}{{{worker_labels(s)}{label}}} {s.value(name)}" for s in samples]
    lines += [
        "# HELP prefork_worker_heartbeat_age_seconds"
        " Since a worker's last heartbeat; -1 while it waits on a client.",
        "# TYPE prefork_worker_heartbeat_age_seconds gauge",
    ]
    lines += [
        f"prefork_worker_heartbeat_age_seconds{{{worker_labels(s)}}} {s.heartbeat_age:.3f}"
        for s in samples
    ]
    lines += [
        "# HELP prefork_worker_state A worker's state: booting, serving or stopping.",
        "# TYPE prefork_worker_state gauge",
    ]
    lines += [
        f"prefork_worker_state{{{worker_labels(s)},state={_label(s.state)}}} 1" for s in samples
    ]
    lines += _process_lines(snapshot, worker_labels)
    lines += _master_event_lines(snapshot)
    lines += _listener_lines(snapshot.listeners)
    return ("\n".join(lines) + "\n").encode()


# The process collector's series, from procfs.ProcessStats.
_PROCESS_SERIES = (
    (
        "process_cpu_seconds_total",
        "counter",
        "User and system CPU time, in seconds.",
        "cpu_seconds",
    ),
    ("process_resident_memory_bytes", "gauge", "Resident memory, in bytes.", "resident_bytes"),
    ("process_open_fds", "gauge", "Open file descriptors.", "open_fds"),
    (
        "process_start_time_seconds",
        "gauge",
        "Start time of the process, in seconds since the epoch.",
        "start_time",
    ),
)


def _process_lines(snapshot: Snapshot, worker_labels: Callable[[Sample], str]) -> list[str]:
    """The master's and every worker's process_* series (label role)."""
    master = snapshot.master
    processes = [(f"role={_label('master')},pid={_label(master.pid)}", master.process)]
    processes += [
        (f"role={_label('worker')},{worker_labels(s)}", s.process) for s in snapshot.workers
    ]
    lines = []
    for series, kind, help_text, attr in _PROCESS_SERIES:
        lines += [f"# HELP {series} {help_text}", f"# TYPE {series} {kind}"]
        for labels, stats in processes:
            value = None if stats is None else getattr(stats, attr)
            if value is not None:
                lines.append(f"{series}{{{labels}}} {_number(value)}")
    return lines


def _master_event_lines(snapshot: Snapshot) -> list[str]:
    lines = [
        "# HELP prefork_watchdog_kills_total Workers the watchdog killed, by reason:"
        " silent for longer than --timeout, or still finishing after --graceful-timeout.",
        "# TYPE prefork_watchdog_kills_total counter",
    ]
    lines += [
        f"prefork_watchdog_kills_total{{reason={_label(reason)}}} {count}"
        for reason, count in snapshot.watchdog_kills.items()
    ]
    return lines + [
        "# HELP prefork_respawns_total Workers forked to replace one that exited or was"
        " killed without being told to stop (not at start, HUP or TTIN).",
        "# TYPE prefork_respawns_total counter",
        f"prefork_respawns_total {snapshot.respawns}",
        "# HELP prefork_crash_backoffs_total Times the master put the next fork off"
        " because a worker crashed soon after it started.",
        "# TYPE prefork_crash_backoffs_total counter",
        f"prefork_crash_backoffs_total {snapshot.crash_backoffs}",
    ]


def _listener_lines(listeners: list[ListenerSample]) -> list[str]:
    def labels(sample: ListenerSample) -> str:
        text = f"listener={_label(sample.name)}"
        return text if sample.position < 0 else f"{text},position={_label(sample.position)}"

    lines = [
        "# HELP prefork_listen_queue_length Connections in a TCP listener's accept queue,"
        " not yet taken by a worker.",
        "# TYPE prefork_listen_queue_length gauge",
    ]
    lines += [f"prefork_listen_queue_length{{{labels(s)}}} {s.queue.length}" for s in listeners]
    lines += [
        "# HELP prefork_listen_queue_limit The most a TCP listener's accept queue holds"
        " (--backlog, capped at net.core.somaxconn).",
        "# TYPE prefork_listen_queue_limit gauge",
    ]
    lines += [f"prefork_listen_queue_limit{{{labels(s)}}} {s.queue.limit}" for s in listeners]
    return lines


class MetricsServer:
    """A tiny HTTP/1.0 server run from the master's loop."""

    def __init__(self, address: Address, handed_over: int | None = None) -> None:
        """Bind ``address``, or adopt ``handed_over``: the socket of the master
        this one upgrades (USR2), whose clients keep their port."""
        self.listener: Listener = create_listener(
            address, backlog=MAX_CLIENTS, handed_over=handed_over
        )
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

    def handle(self, readable: list[int], snapshot: Callable[[], Snapshot]) -> None:
        """Serve the clients in ``readable``; ``snapshot`` reads what a page shows."""
        now = time.monotonic()
        if self.listener.fileno() in readable:
            self._accept(now)
        for fd in [fd for fd in readable if fd in self.clients]:
            self._read(self.clients[fd], snapshot)
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

    def _read(self, client: _Client, snapshot: Callable[[], Snapshot]) -> None:
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
            request_line = bytes(client.request).split(b"\r\n", 1)[0].split() + [b""]
            page = PAGES.get(request_line[1]) if request_line[:1] == [b"GET"] else None
            if page is not None:
                content_type, render_it = page
                self._respond(client.sock, "200 OK", content_type, render_it(snapshot()))
            else:
                self._respond(client.sock, "404 Not Found", CONTENT_TYPE, b"try / or /metrics\n")
        self._drop(fd)

    def _respond(self, sock: socket.socket, status: str, content_type: str, body: bytes) -> None:
        head = (
            f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        try:
            sock.settimeout(1.0)  # a page is a few KiB: the kernel takes it at once
            sock.sendall(head + body)
        except OSError:
            pass

    def _drop(self, fd: int) -> None:
        client = self.clients.pop(fd)
        client.sock.close()


# What each path serves: its content type and how the snapshot is written.
PAGES: dict[bytes, tuple[str, Callable[[Snapshot], bytes]]] = {
    b"/metrics": (CONTENT_TYPE, render),
    b"/": (HTML_CONTENT_TYPE, render_page),
}
