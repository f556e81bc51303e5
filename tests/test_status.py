"""``prefork status``: the table, its totals, --json and --watch against real
servers; what a wrong address says; the page parsed whatever its series."""

from __future__ import annotations

import fcntl
import http.server
import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Iterator

import pytest

from prefork.tools.status import parse_exposition, snapshot, table

from support import (
    Server,
    assert_one_line_error,
    exchange,
    handler_env,
    prefork_command,
    run,
    start_server,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, Server]]:
    """An echo server with two workers and metrics; discard and daytime ones
    (their ports are the wrong addresses people give)."""
    started: dict[str, Server] = {}
    try:
        started["echo"] = start_server("-w", "2", "--metrics", "127.0.0.1:0")
        started["discard"] = start_server("-w", "1", "--handler", "discard")
        started["daytime"] = start_server("-w", "1", "--handler", "daytime")
        started["echo"].wait_workers(2)
        yield started
    finally:
        for server in started.values():
            server.kill_all()


def metrics_address(server: Server) -> str:
    match = re.search(r"metrics on http://(\S+)/metrics", server.log)
    assert match, server.log
    return match.group(1)


def status(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run("status", *args, env=env)


def table_rows(text: str) -> tuple[list[str], list[list[str]], list[str]]:
    """The header's words, the worker rows' cells, the totals row's cells."""
    lines = text.splitlines()
    assert lines[-1].split()[0] == "total", text
    return lines[0].split(), [line.split() for line in lines[1:-1]], lines[-1].split()


def accepted_so_far(address: str) -> int:
    """The workers' accepted connections, once three reads in a row agree (a
    worker publishes its counters when its loop turns)."""
    reads: list[int] = []
    while len(reads) < 3 or len(set(reads[-3:])) > 1:
        document = json.loads(status("--json", address).stdout)
        reads.append(int(document["totals"]["connections_accepted_total"]))
        assert len(reads) < 50, reads
        time.sleep(0.05)
    return reads[-1]


def send_traffic(server: Server, sizes: list[int]) -> None:
    for size in sizes:
        with server.connect() as sock:
            assert exchange(sock, b"s" * size) == b"s" * size


# -- the table and --json ---------------------------------------------------------------


def test_table_has_a_row_per_worker_and_a_totals_row(servers):
    server = servers["echo"]
    address = metrics_address(server)
    before = accepted_so_far(address)
    send_traffic(server, [10, 3000, 70_000])
    assert wait_until(lambda: accepted_so_far(address) == before + 3, 20)
    result = status(address)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    header, rows, total = table_rows(result.stdout)
    assert header[:5] == ["worker", "pid", "gen", "state", "active"]
    assert sorted(int(row[1]) for row in rows) == sorted(server.workers())
    assert {row[3] for row in rows} == {"serving"}
    assert total[:3] == ["total", "2", "workers"]
    # active, accepted, bytes in, bytes out: each total is its column's sum.
    for column in range(4, 8):
        assert int(total[column - 1]) == sum(int(row[column]) for row in rows), result.stdout
    assert int(total[4]) == before + 3


def test_json_has_the_rows_the_totals_and_the_server_series(servers):
    server = servers["echo"]
    address = metrics_address(server)
    send_traffic(server, [500])
    result = status("--json", address)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["url"] == f"http://{address}/metrics"
    workers = document["workers"]
    assert sorted(w["pid"] for w in workers) == sorted(server.workers())
    assert [w["worker"] for w in workers] == sorted(w["worker"] for w in workers)
    for row in workers:
        assert row["state"] == "serving" and row["generation"] == 0
        assert isinstance(row["bytes_in_total"], int)
        assert isinstance(row["heartbeat_age_seconds"], float)
    totals = document["totals"]
    assert totals["workers"] == 2 == document["server"]["workers"]
    for key in ("connections_active", "connections_accepted_total", "bytes_in_total"):
        assert totals[key] == sum(row[key] for row in workers), key
    assert "heartbeat_age_seconds" not in totals  # ages do not add up
    # No worker has exited: the server's own totals are the live workers' sums.
    for key in ("connections_accepted_total", "bytes_in_total", "bytes_out_total"):
        assert document["server"][key] == totals[key], key


@pytest.mark.parametrize("form", ["http://{}", "http://{}/", "http://{}/metrics", "{}"])
def test_the_address_may_be_a_url(servers, form):
    address = metrics_address(servers["echo"])
    result = status("--json", form.format(address))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["url"] == f"http://{address}/metrics"


# -- wrong addresses ------------------------------------------------------------------------


def service_address(server: Server) -> str:
    host, port = server.tcp()
    return f"{host}:{port}"


@pytest.mark.parametrize("name", ["echo", "daytime"])
def test_the_service_port_is_a_one_line_error(servers, name):
    where = service_address(servers[name])
    result = status(where)
    assert_one_line_error(result, 1, where, "did not answer in HTTP", "--metrics address")
    assert "BadStatusLine" not in result.stderr


def test_a_port_that_never_answers_is_a_one_line_error(servers):
    where = service_address(servers["discard"])
    began = time.monotonic()
    result = status("--timeout", "0.5", where)
    assert time.monotonic() - began < 10
    assert_one_line_error(result, 1, f"{where}: no reply within 0.5 s", "--metrics address")


def test_nothing_listening_says_cannot_connect():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        result = status(f"127.0.0.1:{port}")
    assert_one_line_error(result, 1, f"cannot connect to 127.0.0.1:{port} (connection refused)")
    assert "Errno" not in result.stderr


def test_an_unknown_host_is_a_one_line_error():
    assert_one_line_error(status("nosuch.invalid:9107"), 1, "cannot resolve 'nosuch.invalid'")


def test_another_path_is_an_http_error(servers):
    address = metrics_address(servers["echo"])
    assert_one_line_error(status(f"http://{address}/nope"), 1, "HTTP 404", "--metrics address")


def test_an_http_server_without_prefork_metrics(tmp_path):
    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
            body = b"# TYPE up gauge\nup 1\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    with http.server.HTTPServer(("127.0.0.1", 0), Page) as httpd:
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        try:
            result = status(f"127.0.0.1:{httpd.server_address[1]}")
        finally:
            httpd.shutdown()
    assert_one_line_error(result, 1, "no prefork_ series", "--metrics address")


@pytest.mark.parametrize(
    ("address", "needle"),
    [
        ("localhost", "'localhost' has no port"),
        ("127.0.0.1", "'127.0.0.1' has no port"),
        ("127.0.0.1:0", "127.0.0.1:0"),
        ("127.0.0.1:99999", "127.0.0.1:99999"),
        ("unix:/tmp/metrics.sock", "'unix:/tmp/metrics.sock'"),
        ("udp://127.0.0.1:9107", "'udp://127.0.0.1:9107'"),
        ("ftp://127.0.0.1:21", "'ftp://127.0.0.1:21'"),
        ("http://127.0.0.1:99999", "'http://127.0.0.1:99999'"),
    ],
)
def test_bad_addresses_are_usage_errors(address, needle):
    assert_one_line_error(status(address), 2, "ADDRESS", needle)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ([], "ADDRESS"),
        (["--timeout", "0", "127.0.0.1:9107"], "--timeout"),
        (["--count", "2", "127.0.0.1:9107"], "--count: only with --watch"),
        (["--watch", "0", "127.0.0.1:9107"], "--watch"),
        (["--watch", "1", "--count", "0", "127.0.0.1:9107"], "--count"),
        (["--watch", "1", "--json", "127.0.0.1:9107"], "--json"),
    ],
)
def test_bad_options_are_usage_errors(args, needle):
    assert_one_line_error(status(*args), 2, needle)


def test_a_reader_that_goes_away_ends_it_quietly(servers):
    address = metrics_address(servers["echo"])
    for args in (["--json"], ["--watch", "0.1"]):
        proc = subprocess.Popen(
            prefork_command("status", *args, address),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            proc.stdout.close()  # like `prefork status ... | head -c0`
            assert proc.wait(20) == 1
            assert proc.stderr.read() == b"", args
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
            proc.stderr.close()


def test_help_says_what_the_exit_status_means():
    result = status("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "Exit status: 0; 1 if the endpoint cannot be read" in text
    for option in ("--json", "--watch", "--count", "--timeout"):
        assert option in text


# -- the page, whatever its series ---------------------------------------------------------

PAGE = r"""# HELP prefork_workers Worker processes running.
# TYPE prefork_workers gauge
prefork_workers 2
# TYPE prefork_handler_errors_total counter
prefork_handler_errors_total{listener="127.0.0.1:7007"} 3
# TYPE prefork_worker_connections_active gauge
prefork_worker_connections_active{worker="3",pid="41",generation="1"} 2
prefork_worker_connections_active{generation="1",pid="40",worker="2"} 5 1700000000000
# TYPE prefork_worker_bytes_in_total counter
prefork_worker_bytes_in_total{worker="2",pid="40",generation="1"} 1e3
prefork_worker_bytes_in_total{worker="3",pid="41",generation="1"} 24
# TYPE prefork_worker_state gauge
prefork_worker_state{worker="2",pid="40",generation="1",state="stopping"} 1
prefork_worker_state{worker="3",pid="41",generation="1",state="serving"} 1
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes{worker="2",pid="40",generation="1"} 8.5e6
process_resident_memory_bytes{worker="3",pid="41",generation="1"} 1.5e6
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total{worker="2",pid="40",generation="1"} 0
# TYPE process_start_time_seconds gauge
process_start_time_seconds{worker="2",pid="40",generation="1"} 1700000000.25
process_start_time_seconds{worker="3",pid="41",generation="1"} 1700000100.5
prefork_worker_odd_seconds{worker="3",pid="41",generation="1",note="a \"quoted\" \\ value"} NaN
this line is not in the format and is skipped
prefork_later_series{kind="x",} +Inf
"""


def test_the_page_is_parsed_generically():
    page = parse_exposition(PAGE)
    names = [sample.name for sample in page.samples]
    assert "prefork_later_series" in names and len(names) == 15
    odd = next(s for s in page.samples if s.name == "prefork_worker_odd_seconds")
    assert odd.labels["note"] == 'a "quoted" \\ value'
    assert page.types["prefork_handler_errors_total"] == "counter"

    document = snapshot(PAGE)
    first, second = document["workers"]  # oldest first, whatever the page's order
    assert (first["worker"], first["pid"], first["state"]) == (2, 40, "stopping")
    assert (second["worker"], second["pid"], second["state"]) == (3, 41, "serving")
    assert first["bytes_in_total"] == 1000 and first["process_resident_memory_bytes"] == 8500000
    assert isinstance(first["process_cpu_seconds_total"], float)  # seconds: a float, even 0
    assert first["process_start_time_seconds"] == 1700000000.25
    assert second['odd_seconds{note="a "quoted" \\ value"}'] is None  # NaN has no JSON
    assert document["totals"] == {
        "workers": 2,
        "connections_active": 7,
        "bytes_in_total": 1024,
        "process_resident_memory_bytes": 10000000,
        "process_cpu_seconds_total": 0.0,  # a counter adds up; times (_seconds) do not
    }
    assert document["server"]["workers"] == 2
    assert document["server"]['handler_errors_total{listener="127.0.0.1:7007"}'] == 3
    assert document["server"]['later_series{kind="x"}'] is None

    # The table shows the known columns the page has, and leaves out the rest.
    header, rows, total = table_rows(table(document))
    assert header == ["worker", "pid", "gen", "state", "active", "bytes", "in"]
    assert rows == [
        ["2", "40", "1", "stopping", "5", "1000"],
        ["3", "41", "1", "serving", "2", "24"],
    ]
    assert total == ["total", "2", "workers", "7", "1024"]


def test_a_page_without_prefork_series_is_refused():
    from prefork.errors import PreforkError

    with pytest.raises(PreforkError, match="no prefork_ series"):
        snapshot("<html><body>hello</body></html>\n")


# -- --watch --------------------------------------------------------------------------------

TITLE = re.compile(rb"prefork status http://\S+/metrics  every 0\.2 s  \d\d:\d\d:\d\d")


def test_watch_redraws_the_table_on_a_terminal_until_ctrl_c(servers):
    """On a pseudo-terminal: rich hides the cursor and redraws in place; a
    connection made meanwhile shows in a later table; Ctrl-C ends it with
    status 0, the cursor shown again."""
    server = servers["echo"]
    address = metrics_address(server)
    accepted = accepted_so_far(address)
    env = dict(os.environ, TERM="xterm")
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(
        prefork_command("status", "--watch", "0.2", address),
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    os.close(follower)
    seen = b""

    closed = False

    def read_until(done, timeout: float = 20) -> None:
        nonlocal seen, closed
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, seen.decode(errors="replace")
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # EIO: the process closed the terminal
                    chunk = b""
                closed = not chunk
                assert chunk or done is ended, seen.decode(errors="replace")
                seen += chunk

    def ended() -> bool:
        return closed

    def totals() -> list[int]:
        text = re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]", b"", seen).decode(errors="replace")
        return [int(m.group(1)) for m in re.finditer(r"total +2 workers +\d+ +(\d+)", text)]

    try:
        read_until(lambda: len(TITLE.findall(seen)) >= 2)
        send_traffic(server, [100])
        read_until(lambda: bool(totals()) and totals()[-1] == accepted + 1)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
        read_until(ended)  # what it wrote last
        assert proc.stderr.read() == b""
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        proc.stderr.close()
        os.close(leader)
    assert totals()[0] == accepted
    assert seen.startswith(b"\x1b[?25l") and seen.rstrip().endswith(b"\x1b[?25h"), seen[-200:]
    assert b"\x1b[1A\x1b[2K" in seen  # a later table is drawn over the earlier one


def test_watch_count_ends_after_that_many_tables(servers):
    address = metrics_address(servers["echo"])
    began = time.monotonic()
    result = status("--watch", "0.2", "--count", "3", address)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - began >= 0.4  # three tables, two waits between them
    # Not a terminal: one table after another, each under its title line.
    assert len(TITLE.findall(result.stdout.encode())) == 3, result.stdout
    tables = re.split(r"(?m)^prefork status .*\n", result.stdout)
    assert tables[0] == "" and len(tables) == 4, result.stdout
    for text in tables[1:]:
        header, rows, total = table_rows(text.strip("\n"))
        assert header[0] == "worker" and len(rows) == 2 and total[0] == "total"


def test_watch_address_may_follow_watch(servers):
    address = metrics_address(servers["echo"])
    result = status("--count", "1", "--watch", address)
    assert result.returncode == 0, result.stderr
    assert re.search(r"every 2 s", result.stdout), result.stdout


def test_watch_shows_a_server_that_went_away_and_exits_1():
    """Not a terminal: tables one after another. The server dies: the next
    ones say why (the last table kept above it); Ctrl-C then exits 1 with
    that error on stderr."""
    server = start_server("-w", "1", "--metrics", "127.0.0.1:0")
    try:
        address = metrics_address(server)
        proc = subprocess.Popen(
            prefork_command("status", "--watch", "0.1", address),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        refused = f"error: cannot connect to {address} (connection refused) (retrying)\n"
        try:
            assert proc.stdout.readline().startswith("prefork status http://")
            server.kill_all()
            lines = []
            while refused not in lines:
                line = proc.stdout.readline()
                assert line, "".join(lines)
                lines.append(line)
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
    finally:
        server.kill_all()
    assert proc.returncode == 1
    assert err == f"prefork: error: cannot connect to {address} (connection refused)\n"


def test_watch_without_rich_names_the_extra(servers, tmp_path):
    (tmp_path / "rich.py").write_text("raise ImportError('rich is blocked by this test')\n")
    result = status("--watch", "0.2", metrics_address(servers["echo"]), env=handler_env(tmp_path))
    assert_one_line_error(result, 2, "--watch needs rich", "bench extra")


def test_watch_of_a_wrong_address_fails_at_once(servers):
    result = status("--watch", "0.2", service_address(servers["daytime"]))
    assert_one_line_error(result, 1, "did not answer in HTTP")
