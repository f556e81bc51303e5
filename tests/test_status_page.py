"""The status page (``GET /`` on the --metrics address), read by a real browser.

Headless Chromium from the distribution's packages (``.ci/run`` installs it)
loads the page from a real server: its DOM must carry every worker's pid and
the totals /metrics reports, and its screenshot must be a real picture of
the page, checked by decoding the PNG here (zlib, no image library). The
test is skipped, saying so, where Chromium is not installed.

Chromium runs in its own process group with HOME and TMPDIR in a temporary
directory: the group is killed and the directory removed at the end.
"""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import tempfile
import urllib.request
import zlib
from collections.abc import Iterator
from html.parser import HTMLParser

import pytest

from prefork.server.scoreboard import WorkerStats
from prefork.server.snapshot import MasterSample, Sample, Snapshot, new_totals
from prefork.server.status_page import REFRESH_SECONDS, render_page

from support import exchange, metrics_address, samples_of, scrape, wait_until

CHROMIUM = shutil.which("chromium")
CHROMIUM_TIMEOUT = 90.0  # seconds for one page; it takes about 2 on an idle machine
WINDOW = (1200, 700)
SERVING_GREEN = (0xC8, 0xF0, 0xC8)  # status_page's background of a serving worker's row
TOTALS_BLUE = (0xB8, 0xC4, 0xDC)  # and of the totals row

needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
pytestmark = pytest.mark.timeout(240)


# -- Chromium ------------------------------------------------------------------------


@pytest.fixture
def browser_home() -> Iterator[str]:
    home = tempfile.mkdtemp(prefix="prefork-chromium-")
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


def chromium(home: str, url: str, *options: str) -> bytes:
    """Headless Chromium's stdout for ``url``; its whole process group is
    killed when it returns or times out."""
    assert CHROMIUM is not None
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",  # we run as root in a container
        "--disable-gpu",
        "--no-first-run",
        f"--user-data-dir={os.path.join(home, 'profile')}",
        *options,
        url,
    ]
    env = dict(os.environ, HOME=home, TMPDIR=home)
    proc = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env=env,
    )
    try:
        out, err = proc.communicate(timeout=CHROMIUM_TIMEOUT)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its renderer, GPU and zygote processes too
        except ProcessLookupError:
            pass
        proc.wait(10)
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out


class PageRows(HTMLParser):
    """The table rows of a page: each row's attributes (and its table's id
    as ``table``) and its cells' ``data-field`` -> ``data-value`` (or text
    where a cell has no value)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[dict[str, str], dict[str, str]]] = []
        self.metas: list[dict[str, str]] = []
        self._cell: tuple[dict[str, str], list[str]] | None = None
        self._table = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        if tag == "table":
            self._table = values.get("id", "")
        elif tag == "tr":
            self.rows.append(({**values, "table": self._table}, {}))
        elif tag in ("td", "th") and self.rows:
            self._cell = (values, [])
        elif tag == "meta":
            self.metas.append(values)

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell[1].append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            attrs, text = self._cell
            if "data-field" in attrs:
                self.rows[-1][1][attrs["data-field"]] = attrs.get("data-value", "".join(text))
            self._cell = None

    def with_attr(self, name: str) -> dict[str, dict[str, str]]:
        return {attrs[name]: cells for attrs, cells in self.rows if name in attrs}

    def table(self, table_id: str) -> dict[str, str]:
        """Every cell of a table of one value per row (the master's)."""
        return {
            k: v
            for attrs, cells in self.rows
            if attrs["table"] == table_id
            for k, v in cells.items()
        }

    def by_id(self, row_id: str) -> dict[str, str]:
        (cells,) = [cells for attrs, cells in self.rows if attrs.get("id") == row_id]
        return cells


# -- PNG -----------------------------------------------------------------------------


def png_pixels(data: bytes) -> tuple[int, int, list[tuple[int, ...]]]:
    """Width, height and every pixel (RGB or RGBA tuples) of an 8-bit,
    non-interlaced truecolour PNG: the chunks read, the IDAT data inflated
    and each scanline unfiltered (PNG spec, section 9)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and colour in (2, 6) and interlace == 0, (depth, colour, interlace)
    bpp = 3 if colour == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    assert len(raw) == height * (stride + 1), "IDAT does not hold the image"
    pixels: list[tuple[int, ...]] = []
    previous = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for i in range(stride):
            left = line[i - bpp] if i >= bpp else 0
            up = previous[i]
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                up_left = previous[i - bpp] if i >= bpp else 0
                p = left + up - up_left
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
                pred = left if pa <= pb and pa <= pc else up if pb <= pc else up_left
                line[i] = (line[i] + pred) & 0xFF
            else:
                assert kind == 0, f"filter type {kind}"
        pixels += [tuple(line[i : i + bpp]) for i in range(0, stride, bpp)]
        previous = line
    return width, height, pixels


def solid_png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A one-colour PNG (no filter), to check the decoder and the checks."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    rows = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def colours(pixels: list[tuple[int, ...]]) -> set[tuple[int, int, int]]:
    return {(p[0], p[1], p[2]) for p in pixels}


def test_png_checks_tell_a_blank_image_from_a_page():
    width, height, pixels = png_pixels(solid_png(40, 30, (255, 255, 255)))
    assert (width, height, len(pixels)) == (40, 30, 1200)
    assert colours(pixels) == {(255, 255, 255)}  # what a blank screenshot would give


# -- the page ------------------------------------------------------------------------


@needs_chromium
def test_the_status_page_in_a_real_browser(server_factory, browser_home):
    server = server_factory("-w", "2", "--metrics", "127.0.0.1:0")
    address = metrics_address(server)
    workers = server.wait_workers(2)
    sizes = [10, 3000, 70_000]
    for size in sizes:
        with server.connect() as sock:
            assert exchange(sock, b"s" * size) == b"s" * size

    def settled() -> bool:
        values = scrape(address)
        serving = [labels for labels, _ in samples_of(values, "prefork_worker_state")]
        return values["prefork_bytes_out_total"] == sum(sizes) and all(
            labels["state"] == "serving" for labels in serving
        )

    assert wait_until(settled, 10), scrape(address)
    url = f"http://{address}/"

    page = PageRows()
    page.feed(chromium(browser_home, url, "--dump-dom").decode())
    values = scrape(address)  # nothing has moved since: no traffic, no signal

    rows = page.with_attr("data-pid")
    assert {int(pid) for pid in rows} == set(workers)
    for labels, accepted in samples_of(values, "prefork_worker_connections_accepted_total"):
        cells = rows[labels["pid"]]
        assert int(cells["accepted"]) == accepted
        assert cells["worker"] == labels["worker"]
        assert cells["state"] == "serving"
        assert float(cells["heartbeat_age"]) < 5
    totals = page.by_id("totals")
    assert int(totals["accepted"]) == values["prefork_connections_accepted_total"] == len(sizes)
    assert int(totals["bytes_in"]) == values["prefork_bytes_in_total"] == sum(sizes)
    assert int(totals["bytes_out"]) == values["prefork_bytes_out_total"] == sum(sizes)
    master = page.table("master")
    assert master["pid"] == str(server.pid)
    assert master["generation"] == "0" and master["respawns"] == "0"
    assert {"http-equiv": "refresh", "content": str(REFRESH_SECONDS)} in page.metas

    shot = os.path.join(browser_home, "page.png")
    size = f"--window-size={WINDOW[0]},{WINDOW[1]}"
    chromium(browser_home, url, f"--screenshot={shot}", size, "--hide-scrollbars")
    with open(shot, "rb") as f:
        width, height, pixels = png_pixels(f.read())
    assert (width, height) == WINDOW
    seen = colours(pixels)
    assert len(seen) > 10, seen  # text is drawn with anti-aliased shades
    assert SERVING_GREEN in seen and TOTALS_BLUE in seen, "the rows are not drawn"


def test_the_page_is_html_and_metrics_stay_text(server_factory):
    server = server_factory("-w", "1", "--metrics", "127.0.0.1:0")
    address = metrics_address(server)
    with urllib.request.urlopen(f"http://{address}/", timeout=5) as response:
        assert response.headers["Content-Type"] == "text/html; charset=utf-8"
        body = response.read().decode()
    assert body.startswith("<!DOCTYPE html>")
    assert "http://" not in body and "https://" not in body and "<script" not in body
    assert scrape(address)["prefork_workers"] == 1  # /metrics: text, as before


def test_what_the_page_shows_is_escaped():
    hostile = '<script>alert("x")</script>&'
    master = MasterSample(1, 0, 1.0, 1, hostile, hostile, None)
    stats = WorkerStats(*(0 for _ in WorkerStats.__dataclass_fields__))
    worker = Sample(1, 2, 0, hostile, 1.0, -1.0, stats, None)
    snapshot = Snapshot(master, [worker], new_totals(), {"silent": 0}, 0, 0, [])
    page = render_page(snapshot).decode()
    assert "<script" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;" in page
    parsed = PageRows()
    parsed.feed(page)
    assert parsed.with_attr("data-pid")["2"]["state"] == hostile
    assert "No TCP listener" in page
