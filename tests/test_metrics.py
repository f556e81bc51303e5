"""The master's /metrics endpoint and ``prefork status``, with real traffic."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from support import (
    TESTS_DIR,
    assert_one_line_error,
    connections_per_worker,
    cpu_seconds,
    exchange,
    handler_env,
    metrics_address,
    prefork_command,
    rss_bytes,
    run,
    samples_of,
    scrape,
    scrape_text,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("k", ["event", "sync", "thread"])
def test_metrics_match_the_traffic_sent(server_factory, k):
    server = server_factory("-w", "2", "-k", k, "--metrics", "127.0.0.1:0")
    address = metrics_address(server)
    sizes = [10, 2000, 300_000, 5, 70_000]
    for size in sizes:
        with server.connect() as sock:
            assert exchange(sock, b"m" * size) == b"m" * size
    total = sum(sizes)

    def settled() -> bool:
        m = scrape(address)
        return (
            m["prefork_connections_accepted_total"] == len(sizes)
            and m["prefork_bytes_in_total"] == total
            and m["prefork_bytes_out_total"] == total
        )

    assert wait_until(settled, 5), scrape(address)
    m = scrape(address)
    assert m["prefork_workers"] == 2
    per_worker = [v for name, v in m.items() if name.startswith("prefork_worker_bytes_in_total{")]
    assert sum(per_worker) == total

    status = subprocess.run(
        prefork_command("status", address), capture_output=True, text=True, timeout=30
    )
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[0].split() == [
        "worker",
        "pid",
        "gen",
        "state",
        "active",
        "accepted",
        "bytes",
        "in",
        "bytes",
        "out",
        "heartbeat",
    ]
    rows, totals = lines[1:-1], lines[-1].split()  # the last row is the totals
    assert sorted(int(line.split()[1]) for line in rows) == sorted(server.workers())
    assert {line.split()[3] for line in rows} == {"serving"}
    assert sum(int(line.split()[5]) for line in rows) == len(sizes) == int(totals[4])
    assert sum(int(line.split()[6]) for line in rows) == total == int(totals[5])


def test_a_worker_told_to_stop_shows_as_stopping_until_it_exits(server_factory):
    server = server_factory("-w", "1", "--metrics", "127.0.0.1:0")
    address = metrics_address(server)
    server.wait_workers(1)
    # The first worker holds connections; TTIN then TTOU: it is the oldest,
    # so it is the one told to finish them.
    held = [server.connect() for _ in range(4)]
    try:
        for sock in held:
            assert exchange_one(sock, b"x") == b"x"
        server.signal(signal.SIGTTIN)
        server.wait_workers(2)
        server.signal(signal.SIGTTOU)

        def states() -> list[str]:
            return sorted(
                name.split('state="')[1].split('"')[0]
                for name in scrape(address)
                if name.startswith("prefork_worker_state{")
            )

        assert wait_until(lambda: states() == ["serving", "stopping"], 5), states()
    finally:
        for sock in held:
            sock.close()
    assert wait_until(lambda: states() == ["serving"], 10), states()


def exchange_one(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    return sock.recv(100)


def test_totals_survive_worker_replacement(server_factory):
    server = server_factory("-w", "1", "--metrics", "127.0.0.1:0", "--max-requests", "2")
    address = metrics_address(server)
    for _ in range(5):
        with server.connect() as sock:
            assert exchange(sock, b"abc") == b"abc"
    assert wait_until(lambda: scrape(address)["prefork_connections_accepted_total"] == 5, 5)
    assert scrape(address)["prefork_bytes_in_total"] == 15


def test_slow_metrics_clients_do_not_stall_the_master(server_factory):
    server = server_factory("-w", "1", "--metrics", "127.0.0.1:0")
    server.wait_workers(1)
    host, port = metrics_address(server).rsplit(":", 1)
    idle = [socket.create_connection((host, int(port))) for _ in range(20)]  # say nothing
    try:
        server.signal(signal.SIGTTIN)
        started = time.monotonic()
        server.wait_workers(2, timeout=5)
        assert time.monotonic() - started < 1.5
        assert scrape(f"{host}:{port}")["prefork_workers"] == 2
    finally:
        for sock in idle:
            sock.close()


@pytest.mark.parametrize("path", ["/nope", "/metrics/", "/index.html"])
def test_other_paths_are_404(server_factory, path):
    server = server_factory("-w", "1", "--metrics", "127.0.0.1:0")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://{metrics_address(server)}{path}", timeout=5)
    assert info.value.code == 404


def test_status_of_nothing_is_a_one_line_error():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run("status", f"127.0.0.1:{port}")
    assert_one_line_error(result, 1, f"cannot connect to 127.0.0.1:{port} (connection refused)")


@pytest.mark.parametrize("value", ["unix:/tmp/m.sock", "nope", "127.0.0.1:99999"])
def test_bad_metrics_address_is_a_usage_error(value):
    assert_one_line_error(run("serve", "--metrics", value), 2, "--metrics")


def test_every_series_has_help_and_type_once(server_factory):
    server = server_factory("-w", "2", "--metrics", "127.0.0.1:0")
    server.wait_workers(2)
    helped: set[str] = set()
    typed: dict[str, str] = {}
    for line in scrape_text(metrics_address(server)).splitlines():
        if line.startswith("# HELP "):
            name = line.split()[2]
            assert name not in helped, f"{name}: HELP twice"
            assert len(line.split(None, 3)) == 4, f"{name}: HELP without text"
            helped.add(name)
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert name not in typed, f"{name}: TYPE twice"
            typed[name] = kind
        elif line:
            name = re.match(r"\w+", line).group()
            assert name in helped and name in typed, f"{name}: no HELP or TYPE before it"
    assert helped == set(typed)
    for name, kind in typed.items():
        assert name.endswith("_total") == (kind == "counter"), (name, kind)
    assert {
        "process_cpu_seconds_total": "counter",
        "process_resident_memory_bytes": "gauge",
        "process_open_fds": "gauge",
        "process_start_time_seconds": "gauge",
        "prefork_watchdog_kills_total": "counter",
        "prefork_respawns_total": "counter",
        "prefork_crash_backoffs_total": "counter",
        "prefork_listen_queue_length": "gauge",
        "prefork_listen_queue_limit": "gauge",
    }.items() <= typed.items()


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_process_series_are_each_process_own(server_factory):
    launched = time.time()
    server = server_factory("-w", "2", "-k", "event", "--metrics", "127.0.0.1:0")
    address = metrics_address(server)
    workers = server.wait_workers(2)
    deadline = time.monotonic() + 30
    while not any(cpu_seconds(pid) > 0 for pid in workers):  # a worker's CPU time to show
        assert time.monotonic() < deadline, "no worker used a clock tick of CPU"
        with server.connect() as sock:
            assert exchange(sock, b"c" * 4_000_000) == b"c" * 4_000_000
    pids = [server.pid, *workers]
    assert wait_until(lambda: active_total(address) == 0, 5)
    idle_fds = {pid: open_fds(pid) for pid in workers}
    held = [server.connect() for _ in range(6)]  # each costs its worker one descriptor
    try:
        for sock in held:
            assert exchange_one(sock, b"h") == b"h"
        assert wait_until(lambda: active_total(address) == len(held), 5)
        fds_before = {pid: open_fds(pid) for pid in pids}
        cpu_before = {pid: cpu_seconds(pid) for pid in pids}
        rss_before = {pid: rss_bytes(pid) for pid in pids}
        values = scrape(address)
        cpu_after = {pid: cpu_seconds(pid) for pid in pids}
        rss_after = {pid: rss_bytes(pid) for pid in pids}
        assert {pid: open_fds(pid) for pid in workers} == {pid: fds_before[pid] for pid in workers}
    finally:
        for sock in held:
            sock.close()

    def by_pid(metric: str) -> dict[int, float]:
        found = {int(labels["pid"]): value for labels, value in samples_of(values, metric)}
        assert set(found) == set(pids), (metric, found)
        return found

    roles = {
        int(labels["pid"]): labels["role"] for labels, _ in samples_of(values, "process_open_fds")
    }
    assert roles == {server.pid: "master", **{pid: "worker" for pid in workers}}
    for pid, value in by_pid("process_cpu_seconds_total").items():
        assert cpu_before[pid] - 1e-6 <= value <= cpu_after[pid] + 1e-6, (pid, value)
    assert sum(by_pid("process_cpu_seconds_total")[pid] for pid in workers) > 0
    assert by_pid("process_cpu_seconds_total")[server.pid] > 0
    # The master allocates while it writes the page: allow it a MiB either way.
    for pid, value in by_pid("process_resident_memory_bytes").items():
        low, high = sorted((rss_before[pid], rss_after[pid]))
        assert low - 2**20 <= value <= high + 2**20, (pid, value, low, high)
    fds = by_pid("process_open_fds")
    # The master's count included the scrape's own connection, and only it:
    # what the master holds once it is closed. (A read just after a scrape may
    # see a connection the client has left and the master not yet closed.)
    assert wait_until(lambda: open_fds(server.pid) == fds[server.pid] - 1, 5), fds
    assert fds[server.pid] - 1 <= fds_before[server.pid] <= fds[server.pid]
    assert {pid: fds[pid] for pid in workers} == {pid: fds_before[pid] for pid in workers}
    assert sum(fds[pid] - idle_fds[pid] for pid in workers) == len(held)
    started = by_pid("process_start_time_seconds")
    # /proc/stat's btime is whole seconds, start times are clock ticks.
    tick = 1 / os.sysconf("SC_CLK_TCK")
    assert launched - 1 - tick <= started[server.pid] <= time.time(), (launched, started)
    for pid in workers:
        assert started[server.pid] <= started[pid] <= time.time() + tick, (pid, started)


def active_total(address: str) -> float:
    return sum(v for _, v in samples_of(scrape(address), "prefork_worker_connections_active"))


def master_events(address: str) -> tuple[float, ...]:
    """(silent kills, graceful-timeout kills, respawns, crash back-offs)."""
    values = scrape(address)
    return (
        values['prefork_watchdog_kills_total{reason="silent"}'],
        values['prefork_watchdog_kills_total{reason="graceful_timeout"}'],
        values["prefork_respawns_total"],
        values["prefork_crash_backoffs_total"],
    )


def test_the_master_counts_watchdog_kills_and_respawns(server_factory):
    server = server_factory(
        "-w", "1", "-k", "event", "--timeout", "2", "--metrics", "127.0.0.1:0",
        "--handler", "handlers.faulty:HangOnData", env=handler_env(TESTS_DIR),
    )  # fmt: skip
    address = metrics_address(server)
    (stuck,) = server.wait_workers(1)
    assert master_events(address) == (0, 0, 0, 0)
    with server.connect() as sock:
        sock.sendall(b"x")  # its loop hangs: the watchdog kills it, the master forks another
        assert wait_until(lambda: master_events(address) == (1, 0, 1, 0), 15), server.log
    assert wait_until(lambda: len(server.workers()) == 1 and stuck not in server.workers(), 5)
    (replacement,) = server.workers()
    os.kill(replacement, signal.SIGKILL)  # from outside: a respawn, no watchdog kill
    assert wait_until(lambda: master_events(address) == (1, 0, 2, 0), 10), server.log
    server.wait_workers(1)
    # Forks that replace no lost worker are not respawns: a TTIN, a HUP.
    server.signal(signal.SIGTTIN)
    old = set(server.wait_workers(2))
    server.signal(signal.SIGHUP)
    assert wait_until(lambda: len(server.workers()) == 2 and not old & set(server.workers()), 10)
    assert master_events(address) == (1, 0, 2, 0)


def test_a_worker_killed_after_graceful_timeout_counts_as_a_watchdog_kill(server_factory):
    server = server_factory(
        "-w", "1", "-k", "event", "--graceful-timeout", "0.5", "--metrics", "127.0.0.1:0",
        "--handler", "handlers.faulty:HangOnData", env=handler_env(TESTS_DIR),
    )  # fmt: skip
    address = metrics_address(server)
    (stuck,) = server.wait_workers(1)
    with server.connect() as sock:
        sock.sendall(b"x")  # hangs for longer than the test: only a KILL ends it
        # The stuck worker holds it before a second worker exists to take
        # it instead (on a busy machine the accept can come after the TTIN).
        port = server.tcp()[1]
        assert wait_until(lambda: connections_per_worker(port) == {stuck: 1}, 10)
        server.signal(signal.SIGTTIN)
        server.wait_workers(2)
        server.signal(signal.SIGTTOU)  # the oldest, the stuck one, is told to stop
        assert wait_until(lambda: master_events(address) == (0, 1, 0, 0), 10), server.log
        assert wait_until(lambda: stuck not in server.workers(), 5)


def test_crash_backoffs_are_counted(server_factory):
    server = server_factory(
        "-w", "1", "--metrics", "127.0.0.1:0",
        "--handler", "handlers.faulty:CrashOnConnect", env=handler_env(TESTS_DIR),
    )  # fmt: skip
    address = metrics_address(server)
    server.wait_workers(1)
    socks = [server.connect() for _ in range(3)]  # each takes a worker down at once
    try:
        assert wait_until(lambda: master_events(address)[3] >= 2, 20), server.log

        def as_logged() -> bool:
            logged = len(re.findall(r"crashed \d+ times in a row", server.log))
            return master_events(address)[3] == logged

        assert wait_until(as_logged, 10), (master_events(address), server.log)
        silent, overstayed, respawns, _ = master_events(address)
        assert (silent, overstayed) == (0, 0)
        assert respawns >= 1
    finally:
        for sock in socks:
            sock.close()


def ss_listen_queue(port: int) -> tuple[int, int]:
    """Recv-Q and Send-Q of the listening socket on ``port``, as ss shows them."""
    out = subprocess.run(
        ["ss", "-ltnH", f"( sport = :{port} )"], capture_output=True, text=True, timeout=10
    ).stdout.split()
    return int(out[1]), int(out[2])


def test_listen_queue_depth_is_the_kernel_s(server_factory):
    server = server_factory("-w", "1", "-k", "sync", "--backlog", "50", "--metrics", "127.0.0.1:0")
    address = metrics_address(server)
    server.wait_workers(1)
    host, port = server.tcp()
    label = f'{{listener="{host}:{port}"}}'

    def queue() -> tuple[float, float]:
        values = scrape(address)
        return (
            values[f"prefork_listen_queue_length{label}"],
            values[f"prefork_listen_queue_limit{label}"],
        )

    assert queue() == (0, ss_listen_queue(port)[1])
    held = server.connect()
    waiting = []
    try:
        assert exchange_one(held, b"x") == b"x"  # the one sync worker is busy with it
        waiting = [server.connect() for _ in range(3)]  # the kernel queues them
        assert wait_until(lambda: queue()[0] == 3, 5), queue()
        assert queue() == ss_listen_queue(port)
        assert queue()[1] == min(50, int(open("/proc/sys/net/core/somaxconn").read()))
    finally:
        for sock in [held, *waiting]:
            sock.close()
    assert wait_until(lambda: queue()[0] == 0, 10), queue()


def test_reuse_port_sockets_are_labelled_by_position(server_factory):
    server = server_factory("-w", "2", "--reuse-port", "--metrics", "127.0.0.1:0")
    server.wait_workers(2)
    host, port = server.tcp()
    found = samples_of(scrape(metrics_address(server)), "prefork_listen_queue_length")
    assert sorted((labels["listener"], labels["position"]) for labels, _ in found) == [
        (f"{host}:{port}", "0"),
        (f"{host}:{port}", "1"),
    ]
