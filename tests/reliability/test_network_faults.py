"""Network faults between a client and the server, in a network namespace the
test makes itself: the server runs inside it, the client outside, joined by a
veth pair whose queueing disciplines inject the faults.

What a user is owed: over a link that delays, drops and reorders packets, a
1 MiB echo is still byte-exact (TCP repairs, the server neither loses nor
reorders a byte); and when the peer vanishes (the link goes dark), the
server still closes the connection at --idle-timeout, while the client's own
timeout fires instead of hanging; once the link is back, service resumes.

netem (delay, random loss, reordering) needs the kernel's sch_netem; where it
is missing the netem test is skipped with the reason, and the tbf test still
injects real loss: a token bucket with a short queue drops what overflows it
(tail drop), which TCP must retransmit, and it delays what it queues.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass

import pytest

from harness import fd_count, payload, scaled, timeout
from support import exchange, launch, prefork_command, wait_until

ECHO_SIZE = 1 << 20
PARALLEL = scaled(4, 16)  # concurrent 1 MiB echoes
IDLE_TIMEOUT = 2.0


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=check)


@dataclass
class Namespace:
    name: str
    host_if: str  # the veth end outside, where the client is
    ns_if: str  # the end inside, where the server is
    host_ip: str
    ns_ip: str

    def inside(self, *command: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *command]

    def qdisc(self, *spec: str) -> None:
        """Put the same queueing discipline on both ends (both directions)."""
        for command in (
            ["tc", "qdisc", "add", "dev", self.host_if, "root", *spec],
            self.inside("tc", "qdisc", "add", "dev", self.ns_if, "root", *spec),
        ):
            result = subprocess.run(command, capture_output=True, text=True, timeout=10)
            if result.returncode != 0:
                reason = result.stderr.strip().splitlines()[-1] if result.stderr else "failed"
                pytest.skip(
                    f"tc qdisc {spec[0]} unavailable (no sch_{spec[0]} in this kernel?): {reason}"
                )

    def dropped(self) -> int:
        """Packets the queueing disciplines dropped, both ends."""
        total = 0
        for command in (
            ["tc", "-s", "qdisc", "show", "dev", self.host_if],
            self.inside("tc", "-s", "qdisc", "show", "dev", self.ns_if),
        ):
            out = subprocess.run(command, capture_output=True, text=True, timeout=10).stdout
            total += sum(int(n) for n in re.findall(r"dropped (\d+)", out))
        return total


@pytest.fixture
def netns():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if not (shutil.which("ip") and shutil.which("tc")):
        pytest.skip("needs ip and tc (iproute2)")
    tag = os.getpid() % 100_000
    octet = tag % 250 + 1
    ns = Namespace(f"pfk-rel-{tag}", f"pfk{tag}h", f"pfk{tag}n", f"10.213.{octet}.1", "")
    ns.ns_ip = f"10.213.{octet}.2"
    made = ip("netns", "add", ns.name, check=False)
    if made.returncode != 0:
        pytest.skip(f"cannot make a network namespace: {made.stderr.strip()}")
    try:
        ip("link", "add", ns.host_if, "type", "veth", "peer", "name", ns.ns_if)
        ip("link", "set", ns.ns_if, "netns", ns.name)
        ip("addr", "add", f"{ns.host_ip}/24", "dev", ns.host_if)
        ip("link", "set", ns.host_if, "up")
        ip("-n", ns.name, "addr", "add", f"{ns.ns_ip}/24", "dev", ns.ns_if)
        ip("-n", ns.name, "link", "set", ns.ns_if, "up")
        ip("-n", ns.name, "link", "set", "lo", "up")
        yield ns
    finally:
        ip("link", "del", ns.host_if, check=False)  # takes its peer with it
        ip("netns", "del", ns.name, check=False)


@pytest.fixture
def server_in(netns):
    started = []

    def start(*args: str):
        command = netns.inside(*prefork_command("serve", "-b", f"{netns.ns_ip}:0", *args))
        server = launch(command)
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill_all()


def parallel_echoes(address: tuple[str, int], count: int, timeout_s: float) -> list[str]:
    """``count`` concurrent 1 MiB echoes; returns the problems seen."""
    problems: list[str] = []

    def one(seed: int) -> None:
        data = payload(random.Random(seed), ECHO_SIZE)
        try:
            with socket.create_connection(address, timeout=timeout_s) as sock:
                got = exchange(sock, data, timeout=timeout_s)
            if got != data:
                problems.append(f"echo {seed}: {len(got)} bytes back, not byte-exact")
        except OSError as exc:
            problems.append(f"echo {seed}: {exc!r}")

    threads = [threading.Thread(target=one, args=(seed,)) for seed in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout_s + 10)
    return problems


@timeout(120, 600)
def test_echo_is_byte_exact_over_delay_loss_and_reordering(netns, server_in):
    netns.qdisc("netem", "delay", "50ms", "10ms", "loss", "2%", "reorder", "25%", "50%")
    server = server_in("-w", "2")
    server.wait_workers(2)
    problems = parallel_echoes(server.tcp(), PARALLEL, timeout_s=90)
    assert not problems, problems


@timeout(60, 300)
def test_echo_is_byte_exact_through_a_dropping_rate_limited_link(netns, server_in):
    # 40 Mbit/s with a 32 KiB queue: bursts overflow it and are dropped.
    netns.qdisc("tbf", "rate", "40mbit", "burst", "16kb", "limit", "32kb")
    server = server_in("-w", "2")
    server.wait_workers(2)
    started = time.monotonic()
    problems = parallel_echoes(server.tcp(), PARALLEL, timeout_s=45)
    took = time.monotonic() - started
    dropped = netns.dropped()
    print(f"\n{PARALLEL} x 1 MiB echoed in {took:.1f}s; the link dropped {dropped} packets")
    assert not problems, problems
    assert dropped > 0, "no packet was dropped: the fault was not injected"


@timeout(60, 60)
def test_a_peer_behind_a_dead_link_is_closed_at_idle_timeout(netns, server_in):
    server = server_in("-w", "1", "--idle-timeout", str(IDLE_TIMEOUT))
    (worker,) = server.wait_workers(1)
    with server.connect() as sock:
        assert exchange(sock, b"warm") == b"warm"
    time.sleep(0.2)
    baseline = fd_count(worker)

    sock = server.connect()
    try:
        sock.sendall(b"before the cut")
        sock.settimeout(5)
        assert sock.recv(64) == b"before the cut"
        ip("link", "set", netns.host_if, "down")  # the client's side goes dark
        cut = time.monotonic()
        # The server sees no byte and can send none: idle, closed on time.
        assert wait_until(lambda: fd_count(worker) == baseline, IDLE_TIMEOUT + 3), (
            "the server kept a connection to a vanished peer"
        )
        closed_after = time.monotonic() - cut
        assert closed_after >= IDLE_TIMEOUT - 0.5, closed_after
        # The client's own timeout fires: nothing hangs.
        sock.settimeout(1.0)
        with pytest.raises(TimeoutError):
            sock.sendall(b"into the void")
            sock.recv(64)
    finally:
        ip("link", "set", netns.host_if, "up")
        sock.close()
    # The link is back: new clients are served.
    assert wait_until(lambda: _echo_ok(server), 10)
    assert server.workers() == [worker]


def _echo_ok(server) -> bool:
    try:
        with server.connect(timeout=2) as sock:
            return exchange(sock, b"back", timeout=2) == b"back"
    except OSError:
        return False
