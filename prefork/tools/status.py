"""``prefork status HOST:PORT``: the scoreboard of a running server, as a table.

It reads the master's ``--metrics`` endpoint, so it needs nothing but the
address: no shared files, no privileges.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request

from prefork.errors import PreforkError

_SAMPLE = re.compile(
    r'^prefork_(\w+)\{worker="(\d+)",pid="(\d+)",generation="(\d+)"(?:,state="(\w+)")?\} (\S+)$'
)
COLUMNS = (
    ("worker_connections_active", "active"),
    ("worker_connections_accepted_total", "accepted"),
    ("worker_bytes_in_total", "bytes in"),
    ("worker_bytes_out_total", "bytes out"),
    ("worker_heartbeat_age_seconds", "heartbeat"),
)


def fetch(address: str, timeout: float = 5.0) -> str:
    url = f"http://{address}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return str(response.read().decode())
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise PreforkError(f"{url}: {reason}") from None


def per_worker(text: str) -> dict[tuple[int, int, int], dict[str, str]]:
    """The per-worker samples of ``text``: (worker, pid, generation) -> metric
    name without ``prefork_`` -> value (the state's name for ``worker_state``)."""
    rows: dict[tuple[int, int, int], dict[str, str]] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            name, worker, pid, generation, state, value = match.groups()
            row = rows.setdefault((int(worker), int(pid), int(generation)), {})
            row[name] = state if name == "worker_state" else value
    return rows


def table(text: str) -> str:
    """The per-worker metrics of ``text`` as an aligned table."""
    rows = per_worker(text)
    header = ["worker", "pid", "gen", "state", *(title for _, title in COLUMNS)]
    body = []
    for (worker, pid, generation), values in sorted(rows.items()):
        cells = [str(worker), str(pid), str(generation), values.get("worker_state", "")]
        for name, _ in COLUMNS:
            value = values.get(name, "")
            if name.endswith("seconds"):
                value = "waiting" if value.startswith("-") else f"{float(value):.1f}s ago"
            cells.append(value)
        body.append(cells)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.rjust(width) for cell, width in zip(r, widths, strict=True))
        for r in [header, *body]
    )
