"""``prefork status ADDRESS``: the workers of a running server, as a table.

It reads the master's ``--metrics`` endpoint, so it needs nothing but the
address: no shared files, no privileges. ADDRESS is the ``--metrics``
``HOST:PORT`` (or ``[V6ADDR]:PORT``), or a URL (``http://HOST:PORT``, whose
path defaults to ``/metrics``). A bare host is refused: the endpoint has no
standard port (a URL without one means 80, as URLs do).

How it works: one ``GET``, with ``http.client`` so that every way a wrong
address can answer (refused, silence, a reply that is not HTTP, another
HTTP server) becomes one line saying which. The page is parsed as the
Prometheus text exposition format, whatever the series: a sample with a
``worker`` label belongs to that worker's row, the others are the server's.
The table shows the columns it knows (``COLUMNS``) that the page has, and a
totals row; ``--json`` gives every series. ``--watch`` redraws the table
with rich until Ctrl-C (or ``--count`` tables).

Exit status: 0; 1 when the endpoint cannot be read (``PreforkError``);
2 for a bad command line (``ConfigError``).
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import re
import socket
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prefork.errors import EXIT_FAILURE, EXIT_OK, ConfigError, PreforkError
from prefork.settings import parse_address, parse_int, parse_seconds
from prefork.tools.client import reason

if TYPE_CHECKING:
    from rich.console import RenderableType
    from rich.text import Text

__all__ = [
    "Endpoint",
    "Exposition",
    "add_parser",
    "fetch",
    "parse_endpoint",
    "parse_exposition",
    "read",
    "run",
    "snapshot",
    "table",
]

METRICS_PATH = "/metrics"
DEFAULT_TIMEOUT = 5.0
DEFAULT_WATCH = 2.0  # seconds between two tables of --watch
MAX_PAGE = 16 * 1024 * 1024  # bytes: a page is a few KiB; more is not a metrics page
HINT = "is it the server's --metrics address?"

# The labels that name a worker's row; any other label is part of a series' key.
ROW_LABELS = ("worker", "pid", "generation")

# The table's columns after worker, pid, gen and state: a series' key in a
# worker's row (its name less ``prefork_worker_``), and the column's title.
# A column the page lacks is left out; the rest of the series are in --json.
COLUMNS = (
    ("connections_active", "active"),
    ("connections_accepted_total", "accepted"),
    ("bytes_in_total", "bytes in"),
    ("bytes_out_total", "bytes out"),
    ("heartbeat_age_seconds", "heartbeat"),
)

# -- the address ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """Where the page is: ``scheme://host:port/path``."""

    host: str
    port: int
    path: str = METRICS_PATH
    scheme: str = "http"

    @property
    def where(self) -> str:
        """``HOST:PORT`` (``[V6ADDR]:PORT``), for messages."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.where}{self.path}"


def parse_endpoint(text: str, option: str = "ADDRESS") -> Endpoint:
    """``HOST:PORT``, ``[V6ADDR]:PORT`` or an ``http(s)://`` URL; ConfigError
    (exit 2) otherwise. A bare host is refused rather than taken as port 80:
    the metrics endpoint has no standard port."""
    if "://" in text:
        try:
            url = urllib.parse.urlsplit(text)
            port = url.port
        except ValueError as exc:  # a port that is not a number, or out of range
            raise ConfigError(f"{option}: invalid URL {text!r}: {exc}") from None
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ConfigError(f"{option}: expected http://HOST:PORT[/PATH], got {text!r}")
        if port is None:
            port = 443 if url.scheme == "https" else 80
        path = url.path if url.path not in ("", "/") else METRICS_PATH
        if url.query:
            path += f"?{url.query}"
        return Endpoint(url.hostname, port, path, url.scheme)
    if ":" not in text and not text.startswith(("[", "unix", "fd")):
        raise ConfigError(
            f"{option}: {text!r} has no port: give the server's --metrics HOST:PORT "
            "or an http:// URL"
        )
    address = parse_address(text, option)
    if address.kind != "tcp" or address.proxy:
        raise ConfigError(
            f"{option}: expected the --metrics HOST:PORT, [V6ADDR]:PORT or an http:// URL, "
            f"got {text!r}"
        )
    if address.port == 0:
        raise ConfigError(f"{option}: port must be a number from 1 to 65535, got {text!r}")
    return Endpoint(address.host, address.port)


# -- fetching ------------------------------------------------------------------------------


def _clip(data: bytes, limit: int = 40) -> str:
    text = repr(data[:limit].decode("utf-8", "backslashreplace"))
    return text[:-1] + "...'" if len(data) > limit else text


def fetch(endpoint: Endpoint, timeout: float = DEFAULT_TIMEOUT) -> str:
    """The page's text; PreforkError (one line, exit 1) naming what went
    wrong: no connection, no reply, a reply that is not HTTP, not 200."""
    where = endpoint.where
    kind = http.client.HTTPSConnection if endpoint.scheme == "https" else http.client.HTTPConnection
    connection = kind(endpoint.host, endpoint.port, timeout=timeout)
    try:
        try:
            connection.connect()
        except socket.gaierror as exc:
            raise PreforkError(f"cannot resolve {endpoint.host!r}: {exc.strerror}") from None
        except OSError as exc:
            why = (
                f"no answer within {timeout:g} s" if isinstance(exc, TimeoutError) else reason(exc)
            )
            raise PreforkError(f"cannot connect to {where} ({why})") from None
        try:
            connection.request("GET", endpoint.path, headers={"Accept": "text/plain"})
            response = connection.getresponse()
            if response.status != 200:
                raise PreforkError(
                    f"{endpoint.url}: HTTP {response.status} {response.reason}: {HINT}"
                )
            body = response.read(MAX_PAGE + 1)
        except http.client.BadStatusLine as exc:
            # RemoteDisconnected is one too: closed before any reply.
            if isinstance(exc, http.client.RemoteDisconnected):
                raise PreforkError(
                    f"{where} closed the connection without a reply: {HINT}"
                ) from None
            line = exc.args[0] if exc.args else ""
            line = line if isinstance(line, bytes) else str(line).encode("latin-1", "replace")
            raise PreforkError(
                f"{where} did not answer in HTTP (its reply began {_clip(line)}): {HINT}"
            ) from None
        except http.client.HTTPException as exc:
            name = type(exc).__name__
            raise PreforkError(f"{where}: the reply is not HTTP ({name}): {HINT}") from None
        except TimeoutError:
            raise PreforkError(f"{where}: no reply within {timeout:g} s: {HINT}") from None
        except OSError as exc:
            raise PreforkError(f"{where}: {reason(exc)} while reading the page") from None
    finally:
        connection.close()
    if len(body) > MAX_PAGE:
        raise PreforkError(f"{endpoint.url}: more than {MAX_PAGE:,} bytes: {HINT}")
    return body.decode("utf-8", "replace")


# -- the text exposition format ---------------------------------------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"^({_NAME})(?:\{{(.*)\}})?[ \t]+(\S+)(?:[ \t]+-?\d+)?[ \t]*$")
_LABEL = re.compile(r'[ \t]*([a-zA-Z_][a-zA-Z0-9_]*)[ \t]*=[ \t]*"((?:[^"\\]|\\.)*)"[ \t]*(,|$)')
_ESCAPES = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


@dataclass
class Exposition:
    """A page's samples, in order, and the ``# TYPE`` of each family."""

    samples: list[Sample] = field(default_factory=list)
    types: dict[str, str] = field(default_factory=dict)


def _labels(text: str) -> dict[str, str] | None:
    labels: dict[str, str] = {}
    position = 0
    while position < len(text.rstrip()):
        match = _LABEL.match(text, position)
        if match is None:
            return None
        value = re.sub(r"\\[\\\"n]", lambda m: _ESCAPES[m.group(0)], match.group(2))
        labels[match.group(1)] = value
        position = match.end()
    return labels


def _number(text: str) -> float | None:
    try:
        return float(text)  # also NaN, +Inf, -Inf
    except ValueError:
        return None


def parse_exposition(text: str) -> Exposition:
    """The samples of a Prometheus text exposition (version 0.0.4). Lines
    that are not samples, ``# TYPE`` or comments are skipped: the page may
    carry series this version does not know, never a reason to fail."""
    page = Exposition()
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("#"):
            words = line.split(None, 3)
            if len(words) >= 4 and words[1] == "TYPE":
                page.types[words[2]] = words[3].strip()
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, label_text, value_text = match.groups()
        labels = _labels(label_text) if label_text else {}
        value = _number(value_text)
        if labels is not None and value is not None:
            page.samples.append(Sample(name, labels, value))
    return page


# -- the snapshot: rows, totals and the server's series -----------------------------------------


def _key(name: str, labels: dict[str, str]) -> str:
    """A series' key in a row: the name less ``prefork_worker_`` or ``prefork_``,
    and the labels that are not the row's, as in the page."""
    for prefix in ("prefork_worker_", "prefork_"):
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    rest = [(k, v) for k, v in labels.items() if k not in ROW_LABELS]
    if rest:
        name += "{" + ",".join(f'{k}="{v}"' for k, v in rest) + "}"
    return name


def _value(key: str, value: float) -> int | float | None:
    """A whole number as an int, unless the series counts seconds (a float
    always, so that a reader sees one type per series); NaN and infinities,
    which JSON lacks, as None."""
    if math.isnan(value) or math.isinf(value):
        return None
    if value.is_integer() and "_seconds" not in key.split("{")[0]:
        return int(value)
    return value


def _family(name: str, types: dict[str, str]) -> str:
    """The ``# TYPE`` of the family ``name`` belongs to (a counter's samples
    may carry ``_total``)."""
    for family in (name, name.removesuffix("_total")):
        if family in types:
            return types[family]
    return "untyped"


def snapshot(text: str) -> dict[str, Any]:
    """The page as a document (``--json``):

    - ``workers``: one object per worker (oldest first): ``worker``, ``pid``,
      ``generation``, ``state``, and every series with that worker's labels;
    - ``totals``: ``workers`` (how many) and, over those rows, the sum of each
      series that adds up: counters, and gauges other than times (``_seconds``)
      and states;
    - ``server``: the series without a ``worker`` label (for prefork's own
      counters, every worker that ever ran, exited ones included).

    PreforkError if the page has no ``prefork_`` series at all.
    """
    page = parse_exposition(text)
    if not any(sample.name.startswith("prefork_") for sample in page.samples):
        raise PreforkError(f"the page has no prefork_ series: {HINT}")
    rows: dict[str, dict[str, Any]] = {}
    server: dict[str, Any] = {}
    summable: set[str] = set()
    for sample in page.samples:
        worker = sample.labels.get("worker")
        if worker is None:
            server[_key(sample.name, sample.labels)] = _value(sample.name, sample.value)
            continue
        row = rows.setdefault(worker, {"worker": _number_or_text(worker)})
        for label in ROW_LABELS[1:]:
            if label in sample.labels:
                row[label] = _number_or_text(sample.labels[label])
        key = _key(sample.name, sample.labels)
        enum = key.split("{")[0]
        if enum in sample.labels:  # a state set: state="serving" 1
            if sample.value == 1:
                row[enum] = sample.labels[enum]
            continue
        row[key] = _value(key, sample.value)
        if _family(sample.name, page.types) == "counter" or not enum.endswith("_seconds"):
            summable.add(key)  # a time (an age, a start) does not add up
    workers = sorted(rows.values(), key=lambda r: (isinstance(r["worker"], str), r["worker"]))
    totals: dict[str, Any] = {"workers": len(workers)}
    for key in sorted(summable, key=_order):
        figures = [row[key] for row in workers if isinstance(row.get(key), int | float)]
        totals[key] = sum(figures)
    return {"workers": workers, "totals": totals, "server": server}


def _order(key: str) -> tuple[int, str]:
    known = [name for name, _ in COLUMNS]
    return (known.index(key) if key in known else len(known), key)


def _number_or_text(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def read(endpoint: Endpoint, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """``snapshot`` of the page at ``endpoint``, with its ``url``."""
    document = snapshot(fetch(endpoint, timeout))
    return {"url": endpoint.url, **document}


# -- the table -----------------------------------------------------------------------------


def _cell(key: str, value: Any) -> str:
    if value is None:
        return ""
    if key.endswith("age_seconds"):
        return "waiting" if value < 0 else f"{value:.1f}s ago"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def rows(document: dict[str, Any]) -> tuple[list[str], list[list[str]], list[str]]:
    """The table's header, one row per worker, and the totals row."""
    workers = document["workers"]
    present = [(k, t) for k, t in COLUMNS if any(k in w for w in workers)] or list(COLUMNS[:4])
    header = ["worker", "pid", "gen", "state", *(title for _, title in present)]
    body = []
    for row in workers:
        cells = [_cell("", row.get(label)) for label in ("worker", "pid", "generation", "state")]
        body.append(cells + [_cell(key, row.get(key)) for key, _ in present])
    totals = document["totals"]
    count = totals["workers"]
    total = ["total", "", "", f"{count} worker{'s' if count != 1 else ''}"]
    total += [_cell(key, totals.get(key)) for key, _ in present]
    return header, body, total


def table(document: dict[str, Any]) -> str:
    """The document as an aligned text table, a totals row last."""
    return "\n".join(table_lines(document))


def table_lines(document: dict[str, Any]) -> list[str]:
    header, body, total = rows(document)
    lines = [header, *body, total]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return [
        "  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    ]


def styled_table(document: dict[str, Any], title: str) -> Text:
    """The same table for ``--watch``, as rich text: the header and totals in
    bold, a worker that is not serving (booting, stopping) in yellow."""
    from rich.text import Text

    header, body, _ = rows(document)
    lines = table_lines(document)
    drawn = Text(no_wrap=True, overflow="crop")  # a narrow terminal cuts lines, not rows
    drawn.append(title + "\n\n", style="dim")
    drawn.append(lines[0] + "\n", style="bold")
    for cells, line in zip(body, lines[1:-1], strict=True):
        drawn.append(line + "\n", style="" if cells[3] in ("serving", "") else "yellow")
    drawn.append(lines[-1], style="bold")
    return drawn


# -- the command ---------------------------------------------------------------------------


def add_parser(commands: Any) -> None:
    """The ``status`` subcommand, on ``commands`` (argparse's subparsers action)."""
    status = commands.add_parser(
        "status",
        help="show a running server's workers",
        description="Show a running server's workers, read from its --metrics endpoint: "
        "one row per worker and a totals row. Exit status: 0; 1 if the endpoint cannot be "
        "read (nothing listens, no reply, not HTTP, not prefork's metrics); 2 for a bad "
        "command line.",
    )
    status.add_argument(
        "address",
        metavar="ADDRESS",
        nargs="?",  # so that "--watch ADDRESS" works: see run()
        help="the server's --metrics HOST:PORT or [V6ADDR]:PORT, or a URL "
        f"(http://HOST:PORT; the path defaults to {METRICS_PATH})",
    )
    status.add_argument(
        "--json",
        action="store_true",
        help="print every series as JSON: the workers' rows, their totals and the server's "
        "own series",
    )
    status.add_argument(
        "--watch",
        metavar="SECONDS",
        nargs="?",
        const=str(DEFAULT_WATCH),
        help=f"redraw the table every SECONDS (default {DEFAULT_WATCH:g}) until Ctrl-C; "
        "needs rich (the bench extra)",
    )
    status.add_argument("--count", metavar="N", help="with --watch: stop after N tables")
    status.add_argument(
        "--timeout",
        metavar="SECONDS",
        default=str(DEFAULT_TIMEOUT),
        help=f"to connect and to read the page (default {DEFAULT_TIMEOUT:g})",
    )


def run(args: argparse.Namespace) -> int:
    """The ``prefork status`` command: its exit status, or raise PreforkError."""
    address, every = args.address, args.watch
    if address is None and every is not None and not _is_number(every):
        address, every = every, str(DEFAULT_WATCH)  # "--watch ADDRESS": SECONDS left out
    if address is None:
        raise ConfigError("the following arguments are required: ADDRESS")
    endpoint = parse_endpoint(address)
    timeout = parse_seconds(args.timeout, "--timeout")
    if timeout == 0:
        raise ConfigError(f"--timeout: expected a number of seconds > 0, got {args.timeout!r}")
    if args.count is not None and every is None:
        raise ConfigError("--count: only with --watch")
    if every is None:
        document = read(endpoint, timeout)
        try:
            print(json.dumps(document, indent=2) if args.json else table(document), flush=True)
        except BrokenPipeError:  # the reader went away (| head)
            return _output_closed()
        return EXIT_OK
    if args.json:
        raise ConfigError("--json: not with --watch")
    interval = parse_seconds(every, "--watch")
    if interval == 0:
        raise ConfigError(f"--watch: expected a number of seconds > 0, got {every!r}")
    count = None if args.count is None else parse_int(args.count, "--count", minimum=1)
    return watch(endpoint, interval, count, timeout)


def _output_closed() -> int:
    """Whoever read standard output went away: point it at /dev/null, so that
    the flush at exit does not fail again, and stop quietly with status 1."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_FAILURE


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def watch(endpoint: Endpoint, interval: float, count: int | None, timeout: float) -> int:
    """Draw the table every ``interval`` seconds, in place on a terminal (one
    after another otherwise), until Ctrl-C or ``count`` tables. The first
    read must succeed; a later failure is shown in place of the table until
    the endpoint answers again. Exit status 1 if the last read failed."""
    try:
        from rich.console import Console, Group
        from rich.live import Live
        from rich.text import Text
    except ImportError:
        raise ConfigError(
            "--watch needs rich: install the bench extra (pip install -e '.[bench]' in a "
            "checkout) or pip install rich"
        ) from None
    document = read(endpoint, timeout)  # a wrong address fails here, in one line
    error: str | None = None
    console = Console(file=sys.stdout)
    live = Live(console=console, auto_refresh=False, redirect_stdout=False, redirect_stderr=False)

    def title() -> str:
        return f"prefork status {endpoint.url}  every {interval:g} s  {time.strftime('%H:%M:%S')}"

    def frame() -> RenderableType:
        drawn = styled_table(document, title())
        if error is None:
            return drawn
        return Group(drawn, Text(f"error: {error} (retrying)", style="bold red"))

    shown = 0
    try:
        if console.is_terminal:
            live.start()
        while True:
            drawn_at = time.monotonic()
            if console.is_terminal:
                live.update(frame(), refresh=True)
            else:  # a file or a pipe: one plain table after another
                if shown:
                    print()
                print(title())
                print()
                print(table(document))
                if error is not None:
                    print(f"error: {error} (retrying)")
                sys.stdout.flush()
            shown += 1
            if count is not None and shown >= count:
                break
            time.sleep(max(0.0, drawn_at + interval - time.monotonic()))
            try:
                document, error = read(endpoint, timeout), None
            except PreforkError as exc:
                error = str(exc)
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # the reader went away (| head): stop quietly
        return _output_closed()
    finally:
        live.stop()
    if error is not None:
        print(f"prefork: error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK
