"""The status page: ``GET /`` on the --metrics address, for people.

In the spirit of HAProxy's stats page: the master (pid, uptime, generation,
what it counted), the listeners' accept queues, then one row per worker and
a totals row. The page is one self-contained document (inline style, no
script, nothing fetched from elsewhere) that reloads itself every
REFRESH_SECONDS with a meta refresh. Everything taken from the server is
escaped, although a handler's name is the only text an operator chose.

Every cell of a figure carries its exact value in ``data-value`` (the text
shows it rounded for people: 1.2 MiB, 3m 12s), and every row its worker's
pid in ``data-pid``, so that scripts and tests need not parse the text.
"""

from __future__ import annotations

import html
import time

from prefork.server.procfs import ProcessStats
from prefork.server.snapshot import SLOT_GAUGES, SLOT_VALUES, Sample, Snapshot

REFRESH_SECONDS = 2
HEARTBEAT_LATE = 2.0  # seconds: a loop beats at least every second; older is worth a colour

# The scoreboard's columns: these first, the other fields after them in slot
# order, titled from their names.
_FIRST = ("active", "accepted", "bytes_in", "bytes_out")
_TITLES = {"accepted": "accepted", "active": "active", "bytes_in": "bytes in"}
_BYTES = ("bytes_in", "bytes_out")

_STYLE = """
body { font: 13px/1.4 sans-serif; margin: 1em 2em; color: #222; background: #fff; }
h1 { font-size: 18px; margin: 0 0 .5em; }
h2 { font-size: 14px; margin: 1.2em 0 .3em; }
table { border-collapse: collapse; }
th, td { border: 1px solid #999; padding: 2px 8px; text-align: right; white-space: nowrap; }
th { background: #d6dce8; }
td.text, th.text { text-align: left; }
tr.serving td { background: #c8f0c8; }
tr.booting td { background: #fff3b0; }
tr.stopping td { background: #ffd8a8; }
td.late { background: #ff9c9c !important; font-weight: bold; }
tr.totals th, tr.totals td { background: #b8c4dc; font-weight: bold; }
table.master th { text-align: left; }
p.note { color: #555; font-size: 12px; }
div.side { display: flex; gap: 3em; align-items: flex-start; }
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def human_seconds(seconds: float) -> str:
    whole = int(seconds)
    if whole < 60:
        return f"{seconds:.1f}s"
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s"


def _cell(field: str, value: int | float | str | None, shown: str, css: str = "") -> str:
    css_attr = f' class="{css}"' if css else ""
    if value is None:
        return f'<td data-field="{_e(field)}"{css_attr}>-</td>'
    return f'<td data-field="{_e(field)}" data-value="{_e(value)}"{css_attr}>{_e(shown)}</td>'


def _slot_columns() -> list[str]:
    return [*_FIRST, *(name for name in SLOT_VALUES if name not in _FIRST)]


def _slot_cell(name: str, value: int) -> str:
    return _cell(name, value, human_bytes(value) if name in _BYTES else str(value))


def _process_cells(process: ProcessStats | None) -> list[str]:
    if process is None:
        return [_cell(name, None, "") for name in ("cpu_seconds", "resident_bytes", "open_fds")]
    return [
        _cell("cpu_seconds", process.cpu_seconds, f"{process.cpu_seconds:.2f}s"),
        _cell("resident_bytes", process.resident_bytes, human_bytes(process.resident_bytes)),
        _cell("open_fds", process.open_fds, str(process.open_fds)),
    ]


def _worker_row(sample: Sample) -> str:
    if sample.heartbeat_age < 0:
        beat = _cell("heartbeat_age", sample.heartbeat_age, "waiting on a client")
    else:
        late = "late" if sample.heartbeat_age > HEARTBEAT_LATE else ""
        beat = _cell(
            "heartbeat_age", sample.heartbeat_age, f"{sample.heartbeat_age:.1f}s ago", late
        )
    cells = [
        _cell("worker", sample.age, str(sample.age)),
        _cell("pid", sample.pid, str(sample.pid)),
        _cell("generation", sample.generation, str(sample.generation)),
        f'<td class="text" data-field="state">{_e(sample.state)}</td>',
        _cell("uptime", round(sample.uptime, 3), human_seconds(sample.uptime)),
        *(_slot_cell(name, sample.value(name)) for name in _slot_columns()),
        beat,
        *_process_cells(sample.process),
    ]
    return (
        f'<tr class="worker {_e(sample.state)}" data-pid="{_e(sample.pid)}">{"".join(cells)}</tr>'
    )


def _totals_row(snapshot: Snapshot) -> str:
    cells = ['<th class="text" colspan="5">total</th>']
    for name in _slot_columns():
        if name in SLOT_GAUGES:  # a level: what the live workers hold now
            cells.append(_slot_cell(name, sum(s.value(name) for s in snapshot.workers)))
        else:
            cells.append(_slot_cell(name, snapshot.totals.get(name, 0)))
    live = [s.process for s in snapshot.workers if s.process is not None]
    cpu = sum(p.cpu_seconds for p in live)
    rss = sum(p.resident_bytes for p in live)
    cells += [
        "<td></td>",
        _cell("cpu_seconds", round(cpu, 2), f"{cpu:.2f}s"),
        _cell("resident_bytes", rss, human_bytes(rss)),
        "<td></td>",
    ]
    return f'<tr class="totals" id="totals">{"".join(cells)}</tr>'


def _master_table(snapshot: Snapshot) -> str:
    master = snapshot.master
    kills = ", ".join(
        f"{count} {reason.replace('_', ' ')}" for reason, count in snapshot.watchdog_kills.items()
    )
    rows: list[tuple[str, str, int | float | str | None, str]] = [
        ("pid", "pid", master.pid, str(master.pid)),
        ("uptime", "uptime", round(master.uptime, 3), human_seconds(master.uptime)),
        ("generation", "generation", master.generation, str(master.generation)),
        (
            "workers",
            "workers",
            len(snapshot.workers),
            f"{len(snapshot.workers)} of {master.workers_wanted}",
        ),
        ("worker_class", "worker class", master.worker_class, master.worker_class),
        ("handler", "handler", master.handler, master.handler),
        ("respawns", "respawns", snapshot.respawns, str(snapshot.respawns)),
        ("watchdog_kills", "watchdog kills", sum(snapshot.watchdog_kills.values()), kills),
        (
            "crash_backoffs",
            "crash back-offs",
            snapshot.crash_backoffs,
            str(snapshot.crash_backoffs),
        ),
    ]
    if master.process is not None:
        process = master.process
        rows += [
            ("cpu_seconds", "CPU", process.cpu_seconds, f"{process.cpu_seconds:.2f}s"),
            ("resident_bytes", "RSS", process.resident_bytes, human_bytes(process.resident_bytes)),
            ("open_fds", "open fds", process.open_fds, str(process.open_fds)),
        ]
    body = "".join(
        f"<tr><th>{_e(title)}</th>{_cell(name, value, shown)}</tr>"
        for name, title, value, shown in rows
    )
    return f'<table class="master" id="master">{body}</table>'


def _listener_table(snapshot: Snapshot) -> str:
    if not snapshot.listeners:
        return '<p class="note">No TCP listener (UNIX and UDP sockets show no queue).</p>'
    rows = "".join(
        f'<tr data-listener="{_e(s.name)}"><td class="text">{_e(s.name)}</td>'
        f"{_cell('position', s.position, '' if s.position < 0 else str(s.position))}"
        f"{_cell('queue', s.queue.length, str(s.queue.length))}"
        f"{_cell('limit', s.queue.limit, str(s.queue.limit))}</tr>"
        for s in snapshot.listeners
    )
    head = '<tr><th class="text">address</th><th>position</th><th>queued</th><th>limit</th></tr>'
    return f'<table id="listeners"><thead>{head}</thead><tbody>{rows}</tbody></table>'


def _workers_table(snapshot: Snapshot) -> str:
    titles = ["worker", "pid", "gen", "state", "age"]
    titles += [_TITLES.get(name, name.replace("_", " ")) for name in _slot_columns()]
    titles += ["heartbeat", "CPU", "RSS", "fds"]
    head = "".join(
        f'<th class="text">{_e(t)}</th>' if t == "state" else f"<th>{_e(t)}</th>" for t in titles
    )
    rows = "".join(_worker_row(sample) for sample in snapshot.workers)
    return (
        f'<table id="workers"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody>'
        f"<tfoot>{_totals_row(snapshot)}</tfoot></table>"
    )


def render_page(snapshot: Snapshot) -> bytes:
    """The HTML status page of ``snapshot``."""
    master = snapshot.master
    generated = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<title>prefork {_e(master.pid)}: status</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>prefork master {_e(master.pid)}, generation {_e(master.generation)}</h1>
<h2>Workers</h2>
{_workers_table(snapshot)}
<div class="side">
<div><h2>Master</h2>
{_master_table(snapshot)}</div>
<div><h2>Listeners</h2>
{_listener_table(snapshot)}</div>
</div>
<p class="note">The totals of counters include the workers that have exited; active and
CPU are the live workers'. Read at {_e(generated)}; this page reloads every
{REFRESH_SECONDS}s. The same figures: <a href="/metrics">/metrics</a>.</p>
</body>
</html>
"""
    return page.encode()
