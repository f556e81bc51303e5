"""The master's /metrics endpoint and ``prefork status``, with real traffic."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from support import assert_one_line_error, exchange, prefork_command, run, wait_until

pytestmark = pytest.mark.timeout(60)


def metrics_address(server) -> str:
    match = re.search(r"metrics on http://(\S+)/metrics", server.log)
    assert match, server.log
    return match.group(1)


def scrape(address: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


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
    assert sorted(int(line.split()[1]) for line in lines[1:]) == sorted(server.workers())
    assert {line.split()[3] for line in lines[1:]} == {"serving"}
    assert sum(int(line.split()[5]) for line in lines[1:]) == len(sizes)
    assert sum(int(line.split()[6]) for line in lines[1:]) == total


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


def test_other_paths_are_404(server_factory):
    server = server_factory("-w", "1", "--metrics", "127.0.0.1:0")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://{metrics_address(server)}/", timeout=5)
    assert info.value.code == 404


def test_status_of_nothing_is_a_one_line_error():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert_one_line_error(run("status", f"127.0.0.1:{port}"), 1, "Connection refused")


@pytest.mark.parametrize("value", ["unix:/tmp/m.sock", "nope", "127.0.0.1:99999"])
def test_bad_metrics_address_is_a_usage_error(value):
    assert_one_line_error(run("serve", "--metrics", value), 2, "--metrics")
