"""``prefork bench ADDRESS``: a closed-loop load generator for echo servers.

How it works: the loop itself is ``prefork.loadgen.LoadGen`` (compiled, or
its pure-Python twin), which keeps ``-c`` connections with ``-d`` messages
in flight each, checks every echoed byte and records every latency in a
histogram. This module turns options into one, runs it in slices of
``SLICE`` seconds (between slices it draws the progress line; Ctrl-C raises
``KeyboardInterrupt`` out of a slice at once), then reports. The warm-up's
figures are dropped when it ends, but not its errors: every error of the run
counts.

Exit status: 0; 1 if no message was echoed in the measured window, or any
error was counted (a one-line summary on stderr after the report), or the
address cannot be resolved or scraped; 2 for bad options. Ctrl-C ends the
run early like the end of ``-t``: what was measured is reported and the
status is as above. A run shorter than ``--timeout`` against a server that
never answers counts no error (no wait has timed out yet), but it echoed
nothing: that alone fails it.

What the figures cover: messages, rates and latencies the measured window
(after the warm-up); bytes, connections opened and errors the whole run,
warm-up included, so that what was sent and what came back are counted over
the same span (a window alone receives the echoes of messages the warm-up
sent). The JSON's ``warmup`` object holds the warm-up's own share. With no
message echoed, the latencies and MB/s are ``n/a`` (``null`` in JSON).

With ``--tls`` (or a ``tls:`` ADDRESS) every connection makes a TLS
handshake first, verified as ``prefork client --tls`` verifies it
(``--ca-certs``, ``--insecure``, ``--sni``); it counts as opened once the
handshake is done, so with ``--connect-per-request`` the connections per
second are full handshakes per second (no session is resumed). Bytes are
the messages' (TLS's own records are not counted); a failed handshake is
the ``tls`` error.

With ``--request FILE --reply FILE`` the server is one that answers rather
than echoes (a line protocol, a key-value store): every message is the
request file's bytes, answered once the reply file's bytes came back, every
byte checked against them; MB/s counts the replies' bytes.

With ``--metrics HOST:PORT`` (the server's metrics endpoint) it scrapes the
per-worker counters before and after the run and reports how the
connections and bytes spread over the server's workers.
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import ssl
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

from prefork.errors import EXIT_FAILURE, EXIT_OK, ConfigError, PreforkError
from prefork.settings import Address, parse_int, parse_seconds, parse_size

if TYPE_CHECKING:
    from rich.live import Live

    from prefork.tools.status import Endpoint

__all__ = ["Options", "Result", "add_parser", "options_from_args", "run"]

SLICE = 0.1  # seconds per run() call: the progress line's and Ctrl-C's granularity
PROGRESS_INTERVAL = 0.5  # seconds between progress lines
MAX_IN_FLIGHT = 1_000_000  # connections x depth
QUANTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999))
DEFAULTS = {"connections": "50", "size": "1024", "depth": "1", "duration": "5"}
DEFAULTS |= {"warmup": "0.5", "timeout": "2"}
# The counters the warm-up's reset drops, kept in ``Result.warmup``.
WARMUP_COUNTERS = ("messages", "failed", "bytes_sent", "bytes_received", "connections_opened")


# What --marks writes to standard error at the edges of the measured window.
WINDOW_OPENS = "prefork bench: window opens"
WINDOW_CLOSES = "prefork bench: window closes"


def add_parser(commands: Any) -> None:
    """The ``bench`` subcommand and its options, on ``commands`` (argparse's
    subparsers action)."""
    bench = commands.add_parser(
        "bench",
        help="load an echo server (or one that answers --request with --reply) and report "
        "its throughput and latency",
        description="Keep connections busy with messages against an echo server, check "
        "every byte that comes back, and report messages/s, MB/s and latency percentiles. "
        "Exit status 1 if no message was echoed, any echo was wrong, short or lost, or a "
        "connection failed; 2 for bad options.",
    )
    bench.add_argument(
        "address",
        metavar="ADDRESS",
        help="HOST:PORT, [V6ADDR]:PORT, unix:PATH or udp://HOST:PORT (tls:ADDRESS: as --tls)",
    )
    bench.add_argument(
        "-c",
        "--connections",
        metavar="N",
        default=DEFAULTS["connections"],
        help=f"connections (UDP sockets) kept busy at once (default {DEFAULTS['connections']})",
    )
    bench.add_argument(
        "-s",
        "--size",
        metavar="SIZE",
        default=None,
        help=f"bytes per message, e.g. 64 or 16K (default {DEFAULTS['size']})",
    )
    bench.add_argument(
        "--request",
        metavar="FILE",
        help="send this file's bytes as every message, to a server that answers with "
        "--reply's instead of an echo (TCP and unix: only)",
    )
    bench.add_argument(
        "--reply",
        metavar="FILE",
        help="the bytes a server answers every --request with; each reply is checked",
    )
    bench.add_argument(
        "-d",
        "--depth",
        metavar="D",
        default=DEFAULTS["depth"],
        help="messages in flight per connection: pipelining depth (default 1)",
    )
    bench.add_argument(
        "-t",
        "--duration",
        metavar="SECONDS",
        default=None,
        help=f"measure this long (default {DEFAULTS['duration']}, or no limit with -n)",
    )
    bench.add_argument(
        "-n", "--count", metavar="COUNT", default=None, help="measure this many messages, then stop"
    )
    bench.add_argument(
        "--warmup",
        metavar="SECONDS",
        default=DEFAULTS["warmup"],
        help=f"run this long first, left out of the figures (default {DEFAULTS['warmup']})",
    )
    bench.add_argument(
        "--udp",
        action="store_true",
        help="datagrams: one message per datagram, one reply each (the same as udp://)",
    )
    bench.add_argument(
        "--connect-per-request",
        action="store_true",
        help="each message on a new connection: connect, send, read the echo, close",
    )
    from prefork.tools.client import add_tls_arguments

    add_tls_arguments(bench)
    bench.add_argument(
        "--timeout",
        metavar="SECONDS",
        default=DEFAULTS["timeout"],
        help="a connect or an echo taking longer is an error; a UDP reply is then lost "
        f"(default {DEFAULTS['timeout']})",
    )
    bench.add_argument(
        "--json",
        action="store_true",
        help="print the result as JSON on standard output (messages, rates and latencies "
        "cover the measured window; bytes, connections and errors the whole run, whose "
        "warm-up share is in 'warmup')",
    )
    bench.add_argument(
        "--metrics",
        metavar="ADDRESS",
        help="the server's --metrics HOST:PORT (or http:// URL): report how the load spread "
        "over its workers",
    )
    bench.add_argument(
        "--marks",
        action="store_true",
        help=f"write '{WINDOW_OPENS}' and '{WINDOW_CLOSES}' lines to standard error at the "
        "edges of the measured window, so a tool can sample the server's CPU over exactly "
        "that window",
    )


@dataclass(frozen=True)
class Options:
    address: Address
    mode: str  # stream, connect or datagram (the LoadGen modes)
    connections: int
    size: int  # bytes sent per message
    depth: int
    duration: float | None  # None: until -n messages
    count: int  # 0: until -t seconds
    warmup: float
    timeout: float
    json: bool = False
    metrics: Endpoint | None = None
    marks: bool = False  # mark the measured window's edges on stderr
    tls: ssl.SSLContext | None = None  # the client's context: every connection over TLS
    server_hostname: str | None = None  # with tls: the name to send and verify
    request: bytes | None = None  # each message (--request); None: the echo pattern
    reply: bytes | None = None  # what answers it (--reply); None: the echo

    @property
    def reply_size(self) -> int:
        return self.size if self.reply is None else len(self.reply)


def options_from_args(args: argparse.Namespace) -> Options:
    """Validate the text of every option (raises ConfigError)."""
    from prefork.tools.client import target_address

    address = target_address(args.address, args.udp)
    if address.kind not in ("tcp", "udp", "unix") or address.proxy:
        raise ConfigError(
            f"ADDRESS: expected HOST:PORT, [V6ADDR]:PORT, unix:PATH or udp://HOST:PORT, "
            f"got {args.address!r}"
        )
    tls, server_hostname = tls_options(args, address)
    mode = "datagram" if address.kind == "udp" else "stream"
    if args.connect_per_request:
        if mode == "datagram":
            raise ConfigError("--connect-per-request: UDP has no connections")
        mode = "connect"
    connections = parse_int(args.connections, "-c/--connections", minimum=1)
    request, reply = read_exchange(args, mode)
    if request is not None and args.size is not None:
        raise ConfigError("-s/--size: with --request a message is the request file's bytes")
    if request is not None:
        size = len(request)
    else:
        size = parse_size(DEFAULTS["size"] if args.size is None else args.size, "-s/--size")
    depth = parse_int(args.depth, "-d/--depth", minimum=1)
    if mode == "connect" and depth != 1:
        raise ConfigError("-d/--depth: --connect-per-request sends one message per connection")
    if connections * depth > MAX_IN_FLIGHT:
        raise ConfigError(
            f"-c/--connections x -d/--depth: at most {MAX_IN_FLIGHT:,} messages in flight, "
            f"got {connections * depth:,}"
        )
    from prefork.loadgen import HEADER, MAX_DATAGRAM

    if mode == "datagram" and not HEADER.size <= size <= MAX_DATAGRAM:
        raise ConfigError(
            f"-s/--size: a datagram carries {HEADER.size} to {MAX_DATAGRAM} bytes "
            f"(its first {HEADER.size} number it), got {args.size!r}"
        )
    count = 0 if args.count is None else parse_int(args.count, "-n/--count", minimum=1)
    duration: float | None = None
    if args.duration is not None or not count:
        text = DEFAULTS["duration"] if args.duration is None else args.duration
        duration = parse_seconds(text, "-t/--duration")
        if duration == 0:
            raise ConfigError(f"-t/--duration: expected a number of seconds > 0, got {text!r}")
    timeout = parse_seconds(args.timeout, "--timeout")
    if timeout == 0:
        raise ConfigError(f"--timeout: expected a number of seconds > 0, got {args.timeout!r}")
    metrics = None
    if args.metrics is not None:
        from prefork.tools.status import parse_endpoint

        metrics = parse_endpoint(args.metrics, "--metrics")
    return Options(
        address=address,
        mode=mode,
        connections=connections,
        size=size,
        depth=depth,
        duration=duration,
        count=count,
        warmup=parse_seconds(args.warmup, "--warmup"),
        timeout=timeout,
        json=args.json,
        metrics=metrics,
        marks=args.marks,
        tls=tls,
        server_hostname=server_hostname,
        request=request,
        reply=reply,
    )


def read_exchange(args: argparse.Namespace, mode: str) -> tuple[bytes | None, bytes | None]:
    """The bytes of --request and --reply (None, None for an echo run);
    ConfigError for files that cannot be read or used."""
    if args.request is None and args.reply is None:
        return None, None
    if args.request is None or args.reply is None:
        given, missing = (
            ("--request", "--reply") if args.reply is None else ("--reply", "--request")
        )
        raise ConfigError(f"{given}: needs {missing} (what the server answers, and to what)")
    if mode == "datagram":
        raise ConfigError("--request: for TCP and unix: servers; datagrams are echoed")
    from prefork.loadgen import MAX_EXCHANGE

    pair = []
    for option, path in (("--request", args.request), ("--reply", args.reply)):
        try:
            with open(path, "rb") as file:
                data = file.read(MAX_EXCHANGE + 1)
        except OSError as exc:
            raise ConfigError(f"{option}: cannot read {path}: {exc.strerror}") from None
        if not 0 < len(data) <= MAX_EXCHANGE:
            raise ConfigError(
                f"{option}: {path} must hold 1 to {MAX_EXCHANGE:,} bytes, "
                + ("it is empty" if not data else "it holds more")
            )
        pair.append(data)
    return pair[0], pair[1]


def tls_options(
    args: argparse.Namespace, address: Address
) -> tuple[ssl.SSLContext | None, str | None]:
    """The client's TLS context and the server name to verify (None, None
    without TLS); ConfigError for TLS options that cannot apply."""
    from prefork.tools.client import client_tls

    on = args.tls or address.tls
    if on and address.kind == "udp":
        raise ConfigError("--tls: TLS is for streams (no DTLS)")
    tls = client_tls(on, args.ca_certs, args.insecure, args.sni)
    if tls is None:
        return None, None
    context, name = tls
    if name is None and address.kind == "tcp":
        name = address.host
    if name is None and context.check_hostname:
        raise ConfigError(
            "--tls: a UNIX socket has no host name to verify: give --sni NAME or --insecure"
        )
    return context, name


def resolve(address: Address) -> tuple[int, Any]:
    """The (family, socket address) to connect to; PreforkError if unresolvable."""
    if address.kind == "unix":
        return socket.AF_UNIX, address.path
    kind = socket.SOCK_DGRAM if address.kind == "udp" else socket.SOCK_STREAM
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(address.host, address.port, 0, kind)[0]
    except socket.gaierror as exc:
        raise PreforkError(f"{address}: cannot resolve host: {exc.strerror}") from None
    return family, sockaddr


def raise_fd_limit(needed: int) -> None:
    """Lift the soft limit on open files towards ``needed`` (up to the hard
    limit): each connection is a descriptor. Past it, connects fail and count."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


# -- running ----------------------------------------------------------------------------


@dataclass
class Result:
    """What a run measured (after the warm-up) and every error it saw."""

    seconds: float = 0.0
    messages: int = 0
    failed: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    connections_opened: int = 0
    histogram: list[int] = field(default_factory=list)
    latency_min: int = 0  # ns
    latency_max: int = 0
    latency_total: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    interrupted: bool = False
    warmed_up: bool = False  # the warm-up ended before the run did
    all_failed: str = ""  # when every connection had failed: "warm-up", "window", or ""
    cpu_seconds: float = 0.0  # this process's user + system time while measuring
    in_flight: int = 0  # messages sent and not yet answered when the run ended
    # The warm-up's own counters (dropped from the figures above by the reset).
    warmup: dict[str, float] = field(default_factory=dict)

    def whole_run(self, name: str) -> int:
        """A counter over the whole run, warm-up included."""
        return int(getattr(self, name) + self.warmup.get(name, 0))

    @property
    def error_total(self) -> int:
        return sum(self.errors.values())

    @property
    def cpu_per_message(self) -> float | None:
        """This process's CPU microseconds per answered message (None: none answered)."""
        return self.cpu_seconds / self.messages * 1e6 if self.messages else None

    def rate(self, amount: int) -> float:
        return amount / self.seconds if self.seconds > 0 else 0.0

    def echoed_per_second(self, size: int) -> float | None:
        """Bytes of right echoes per second of the window (None: none came)."""
        return self.rate(self.messages * size) if self.messages else None

    def latency(self, fraction: float) -> int:
        from prefork.loadgen import percentile

        return percentile(self.histogram, fraction, self.latency_max)


class Progress:
    """A live line on a terminal: drawn with rich when it is installed, else
    rewritten in place with a carriage return; nothing when ``stream`` is not a
    terminal. ``clear()`` must be called at the end (it restores the cursor)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.enabled = stream.isatty()
        self.live = rich_live(stream) if self.enabled else None
        self.last = time.monotonic()
        self.last_messages = self.last_bytes = 0
        self.shown = False

    def update(self, generator: Any, phase: str, elapsed: float) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last < PROGRESS_INTERVAL:
            return
        span = max(now - self.last, 1e-9)
        messages, received = generator.messages, generator.bytes_received
        if messages < self.last_messages:  # the warm-up's counters were dropped
            self.last_messages = self.last_bytes = 0
        from prefork.loadgen import percentile

        p99 = percentile(generator.histogram(), 0.99, generator.latency_max)
        errors = sum(generator.errors.values())
        line = (
            f"{phase} {elapsed:6.1f} s  {(messages - self.last_messages) / span:12,.0f} msg/s  "
            f"{(received - self.last_bytes) / span / 1e6:9,.1f} MB/s  "
            f"p99 {format_ns(p99):>9}  errors {errors:,}"
        )
        if self.live is not None:
            from rich.text import Text

            self.live.start()  # once: a started display ignores it
            self.live.update(Text(line, style="bold red" if errors else ""), refresh=True)
        else:
            self.stream.write(f"\r{line}\x1b[K")
            self.stream.flush()
        self.shown = True
        self.last, self.last_messages, self.last_bytes = now, messages, received

    def clear(self) -> None:
        if self.live is not None:
            self.live.stop()  # erases the line, shows the cursor again
        elif self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def rich_live(stream: TextIO) -> Live | None:
    """A transient rich display on ``stream``, refreshed only by ``update()``
    (no thread of its own: the load generator keeps the GIL to itself)."""
    try:
        from rich.console import Console
        from rich.live import Live
    except ImportError:  # rich is optional (pip install 'prefork[bench]'): draw the line by hand
        return None
    return Live(
        console=Console(file=stream),
        transient=True,
        auto_refresh=False,
        redirect_stdout=False,
        redirect_stderr=False,
    )


def process_cpu() -> float:
    """User + system CPU seconds of this process (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(generator: Any, options: Options, progress: Progress) -> Result:
    """Warm up, reset, then run until ``-t`` or ``-n`` or Ctrl-C."""
    result = Result()
    warm_errors: dict[str, int] = {}
    warm: dict[str, float] = {}
    started = time.monotonic()
    measuring_since: float | None = None
    finished = False
    try:
        end = started + options.warmup
        while not finished and (now := time.monotonic()) < end:
            finished = generator.run(min(SLICE, end - now))
            progress.update(generator, "warm-up", now - started)
        if finished:  # the warm-up has no message limit: only failures end it
            result.all_failed = "warm-up"
        warm_errors = generator.errors
        warm = {name: getattr(generator, name) for name in WARMUP_COUNTERS}
        warm["seconds"] = time.monotonic() - started
        generator.reset()
        result.warmed_up = True
        if options.marks:
            print(WINDOW_OPENS, file=sys.stderr, flush=True)
        cpu_since = process_cpu()
        measuring_since = time.monotonic()
        deadline = None if options.duration is None else measuring_since + options.duration
        while not finished:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            wait = SLICE if deadline is None else min(SLICE, deadline - now)
            finished = generator.run(wait, options.count)
            progress.update(generator, "running", time.monotonic() - measuring_since)
        counted = generator.messages + generator.failed
        if finished and not (options.count and counted >= options.count):
            result.all_failed = result.all_failed or "window"
    except KeyboardInterrupt:
        result.interrupted = True
    if measuring_since is not None:
        result.seconds = time.monotonic() - measuring_since
        result.cpu_seconds = process_cpu() - cpu_since
        if options.marks:
            print(WINDOW_CLOSES, file=sys.stderr, flush=True)
        result.messages = generator.messages
        result.failed = generator.failed
        result.bytes_sent = generator.bytes_sent
        result.bytes_received = generator.bytes_received
        result.connections_opened = generator.connections_opened
        result.histogram = generator.histogram()
        result.latency_min = generator.latency_min
        result.latency_max = generator.latency_max
        result.latency_total = generator.latency_total
    else:  # interrupted in the warm-up: what it counted is the whole run
        warm = {name: getattr(generator, name) for name in WARMUP_COUNTERS}
        warm["seconds"] = time.monotonic() - started
    result.warmup = warm
    result.in_flight = generator.in_flight
    errors = generator.errors
    result.errors = {kind: errors[kind] + warm_errors.get(kind, 0) for kind in errors}
    return result


# -- worker balance ----------------------------------------------------------------------

BALANCE_METRICS = (  # (key here, the series' key in prefork status's rows)
    ("connections", "connections_accepted_total"),
    ("bytes_in", "bytes_in_total"),
)


def scrape(endpoint: Endpoint) -> dict[tuple[int, int], dict[str, int]]:
    """Per worker (worker, pid): the counters ``BALANCE_METRICS`` names."""
    from prefork.tools.status import read

    workers: dict[tuple[int, int], dict[str, int]] = {}
    for row in read(endpoint)["workers"]:
        workers[(row["worker"], row.get("pid", 0))] = {
            key: int(row.get(name) or 0) for key, name in BALANCE_METRICS
        }
    return workers


def scrape_settled(
    endpoint: Endpoint, settle: float = 1.5
) -> dict[tuple[int, int], dict[str, int]]:
    """Scrape until two scrapes agree (a worker publishes its counters when it
    wakes), at most ``settle`` seconds."""
    deadline = time.monotonic() + settle
    time.sleep(0.05)
    previous = scrape(endpoint)
    while time.monotonic() < deadline:
        time.sleep(0.1)
        current = scrape(endpoint)
        if current == previous:
            break
        previous = current
    return previous


def balance(
    before: dict[tuple[int, int], dict[str, int]], after: dict[tuple[int, int], dict[str, int]]
) -> dict[str, Any]:
    """How the run's connections and bytes spread over the workers alive at
    the end (a worker started during the run counts from zero)."""
    rows = []
    for (worker, pid), values in sorted(after.items()):
        old = before.get((worker, pid), {})
        row: dict[str, Any] = {"worker": worker, "pid": pid}
        for key, _ in BALANCE_METRICS:
            row[key] = values[key] - old.get(key, 0)
        rows.append(row)
    spread: dict[str, Any] = {"per_worker": rows}
    for key, _ in BALANCE_METRICS:
        figures = [row[key] for row in rows]
        low, high = (min(figures), max(figures)) if figures else (0, 0)
        ratio = high / low if low else None
        spread[key] = {"min": low, "max": high, "ratio": ratio}
    return spread


# -- reporting ---------------------------------------------------------------------------


def format_ns(ns: float) -> str:
    if ns < 1e6:
        return f"{ns / 1e3:.1f} us"
    if ns < 1e9:
        return f"{ns / 1e6:.2f} ms"
    return f"{ns / 1e9:.2f} s"


def describe(options: Options) -> str:
    kinds = {"stream": "", "connect": ", a new connection per message", "datagram": ""}
    sockets = "UDP sockets" if options.mode == "datagram" else "connections"
    over = " over TLS" if options.tls is not None else ""
    messages = f"{options.size}-byte messages"
    if options.request is not None:
        messages = f"{options.size}-byte requests, {options.reply_size}-byte replies"
    return (
        f"{options.connections} {sockets}{over} x {options.depth} in flight, "
        f"{messages}{kinds[options.mode]}"
    )


def as_dict(result: Result, options: Options, implementation: str) -> dict[str, Any]:
    """The JSON document: see the module's docstring for what each figure covers."""
    latency: dict[str, float | None] = dict.fromkeys(
        ["min", "mean", *(name for name, _ in QUANTILES), "max"]
    )
    if result.messages:
        latency["min"] = result.latency_min / 1e3
        latency["mean"] = result.latency_total / result.messages / 1e3
        for name, fraction in QUANTILES:
            latency[name] = result.latency(fraction) / 1e3
        latency["max"] = result.latency_max / 1e3
    echoed = result.echoed_per_second(options.reply_size)
    warmup = {"seconds": result.warmup.get("seconds", 0.0)}
    warmup |= {name: int(result.warmup.get(name, 0)) for name in WARMUP_COUNTERS}
    return {
        "address": str(options.address),
        "mode": options.mode,
        "tls": options.tls is not None,
        "implementation": implementation,
        "connections": options.connections,
        "depth": options.depth,
        "size": options.size,
        "reply_size": options.reply_size,
        "exchange": "echo" if options.request is None else "request-reply",
        "warmup_seconds": options.warmup,
        "seconds": result.seconds,
        "interrupted": result.interrupted,
        "messages": result.messages,
        "failed": result.failed,
        "in_flight": result.in_flight,
        "messages_per_second": result.rate(result.messages),
        "mb_per_second": None if echoed is None else echoed / 1e6,
        "bytes_sent": result.whole_run("bytes_sent"),
        "bytes_received": result.whole_run("bytes_received"),
        "connections_opened": result.whole_run("connections_opened"),
        "warmup": warmup,
        "cpu_seconds": result.cpu_seconds,
        "cpu_us_per_message": result.cpu_per_message,
        "latency_us": latency,
        "errors": result.errors,
        "error_total": result.error_total,
    }


def report(
    result: Result, options: Options, implementation: str, spread: dict[str, Any] | None
) -> str:
    """The human-readable table."""
    rows: list[tuple[str, str]] = []
    seconds = f"{result.seconds:.2f} s"
    if result.interrupted:
        seconds += " (interrupted" + ("" if result.warmed_up else " in the warm-up") + ")"
    if options.warmup:
        seconds += f", after a {options.warmup:g} s warm-up"
    rows.append(("duration", seconds))
    answered = f"{result.messages:,}"
    if result.failed:
        answered += f" (and {result.failed:,} failed)"
    rows.append(("messages", answered))
    rows.append(("messages/s", f"{result.rate(result.messages):,.0f}"))
    echoed = result.echoed_per_second(options.reply_size)
    what = "echoed" if options.request is None else "in replies"
    rows.append(("MB/s", "n/a" if echoed is None else f"{echoed / 1e6:,.2f} {what}"))
    if result.cpu_per_message is not None:
        per_message = f"{result.cpu_per_message:.2f} us/message"
        rows.append(("client CPU", f"{result.cpu_seconds:.2f} s, {per_message}"))
    for name, fraction in QUANTILES:
        figure = format_ns(result.latency(fraction)) if result.messages else "n/a"
        rows.append((f"latency {name}", figure))
    rows.append(("latency max", format_ns(result.latency_max) if result.messages else "n/a"))
    if options.mode == "connect":
        opened = f"{result.connections_opened:,} ({result.rate(result.connections_opened):,.0f}/s)"
        rows.append(("TLS handshakes" if options.tls is not None else "connections", opened))
    found = [f"{kind} {count:,}" for kind, count in result.errors.items() if count]
    rows.append(("errors", ", ".join(found) if found else "none"))
    if spread is not None:
        for row in spread["per_worker"]:
            rows.append(
                (
                    f"worker {row['worker']} (pid {row['pid']})",
                    f"{row['connections']:,} connections, {row['bytes_in']:,} bytes in",
                )
            )
        for key, title in (("connections", "connections"), ("bytes_in", "bytes in")):
            figures = spread[key]
            ratio = "-" if figures["ratio"] is None else f"{figures['ratio']:.2f}"
            rows.append(
                (
                    f"{title} per worker",
                    f"min {figures['min']:,}, max {figures['max']:,}, max/min {ratio}",
                )
            )
    width = max(len(label) for label, _ in rows)
    head = f"prefork bench {options.address} ({implementation}): {describe(options)}"
    return "\n".join([head, *(f"  {label:<{width}}  {value}" for label, value in rows)])


def run(args: argparse.Namespace) -> int:
    """The ``prefork bench`` command: its exit status, or raise PreforkError."""
    options = options_from_args(args)
    family, sockaddr = resolve(options.address)
    from prefork import loadgen

    before = scrape(options.metrics) if options.metrics else None
    raise_fd_limit(options.connections + 64)
    generator = loadgen.LoadGen(
        family,
        sockaddr,
        options.mode,
        connections=options.connections,
        size=options.size,
        depth=options.depth,
        timeout=options.timeout,
        tls=options.tls,
        server_hostname=options.server_hostname,
        request=options.request,
        reply=options.reply,
    )
    progress = Progress(sys.stderr)
    try:
        result = measure(generator, options, progress)
    finally:
        generator.close()
        progress.clear()
    spread = None
    if options.metrics and before is not None:
        spread = balance(before, scrape_settled(options.metrics))
    if options.json:
        document = as_dict(result, options, loadgen.IMPLEMENTATION)
        document["workers"] = spread
        print(json.dumps(document, indent=2))
    else:
        print(report(result, options, loadgen.IMPLEMENTATION, spread))
    sys.stdout.flush()
    problems = []
    if result.error_total:
        found = ", ".join(f"{kind} {count:,}" for kind, count in result.errors.items() if count)
        plural = "s" if result.error_total != 1 else ""
        problems.append(f"{result.error_total:,} error{plural}: {found}")
        if result.errors.get("tls"):
            why = tls_probe(options)
            if why is not None:
                problems.append(f"a handshake made to see why: {why}")
    if not result.messages:
        problems.append(nothing_echoed(result, options))
    if problems:
        print(f"prefork: error: {'; '.join(problems)}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def tls_probe(options: Options) -> str | None:
    """Why a TLS handshake with the server fails, in ``prefork client``'s
    words (the load generator only counts failures); None if this one works."""
    from prefork.tools.client import connect, handshake

    assert options.tls is not None
    try:
        with connect(options.address, options.timeout) as plain:
            handshake(
                plain, options.address, (options.tls, options.server_hostname), options.timeout
            )
    except PreforkError as exc:
        return str(exc).removeprefix(f"{options.address}: ")
    return None


def nothing_echoed(result: Result, options: Options) -> str:
    """Why a run that echoed (answered) no message fails, in a few words."""
    done, awaited = ("echoed", "echo") if options.request is None else ("answered", "reply")
    if not result.warmed_up:
        return f"no message was {done} (interrupted in the warm-up)"
    if result.all_failed:
        where = " in the warm-up" if result.all_failed == "warm-up" else ""
        return f"no message was {done}: every connection failed{where}"
    text = f"no message was {done} in {result.seconds:.2f} s"
    if result.failed:
        text += f" ({result.failed:,} failed)"
    elif result.in_flight and not result.error_total:
        text += (
            f" ({result.in_flight:,} still awaited their {awaited} at the end; "
            f"--timeout is {options.timeout:g} s)"
        )
    return text
