"""Slowloris: hundreds of connections that trickle a byte a second or send
nothing, against one event worker with a short --idle-timeout.

What a user is owed: the slow connections do not slow anybody else down (a
normal client's p99 latency, connect + echo, stays within 2x of the unloaded
figure), the silent ones are closed once they have been idle for
--idle-timeout (not before, and within one sweep after), and the trickling
ones, never idle that long, are left alone.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time

from harness import descriptor_limit, percentile, scaled, timeout

COUNT = scaled(300, 2000)
IDLE_TIMEOUT = 2.0
# The loop sweeps for idle connections every min(1 s, idle_timeout / 2).
SWEEP = min(1.0, IDLE_TIMEOUT / 2)
HOLD = IDLE_TIMEOUT + SWEEP + 2.0  # seconds the peer keeps its connections
SAMPLES = 200  # ping-pongs per batch
BATCHES = 5  # the figure is the median of the batches' p99s
# Scheduler noise on a shared 2-core machine moves a sub-millisecond p99 by
# a millisecond or more at random; an allowance below 2 ms would test the
# machine, not the server. So: within 2x, or 2 ms, whichever is larger.
FLOOR = 0.002
MESSAGE = b"x" * 64


def normal_client_p99(address: tuple[str, int]) -> float:
    """The median over BATCHES of the p99 of SAMPLES connect + echo + close."""
    figures = []
    for _ in range(BATCHES):
        samples = []
        for _ in range(SAMPLES):
            started = time.perf_counter()
            with socket.create_connection(address, timeout=10) as sock:
                sock.sendall(MESSAGE)
                received = b""
                while len(received) < len(MESSAGE):
                    chunk = sock.recv(64)
                    assert chunk, "closed before the echo"
                    received += chunk
            samples.append(time.perf_counter() - started)
            assert received == MESSAGE
        figures.append(percentile(samples, 0.99))
    return statistics.median(figures)


@timeout(90, 180)
def test_slow_clients_do_not_slow_the_others_and_idle_ones_are_closed(server_factory):
    with descriptor_limit(2 * COUNT + 512):
        server = server_factory(
            "-w",
            "1",
            "-k",
            "event",
            "--idle-timeout",
            str(IDLE_TIMEOUT),
            "--max-connections",
            str(COUNT + 256),
            "--backlog",
            str(COUNT + 256),
        )
        server.wait_workers(1)
        host, port = server.tcp()
        normal_client_p99((host, port))  # warm-up: imports, caches, the first connections
        unloaded = normal_client_p99((host, port))

        peer = subprocess.Popen(
            [sys.executable, os.path.join(os.path.dirname(__file__), "slowloris.py")]
            + [host, str(port), str(COUNT), str(HOLD)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert peer.stdout is not None
            assert peer.stdout.readline().strip() == "ready"
            opened = time.monotonic()
            loaded = normal_client_p99((host, port))
            measured_in = time.monotonic() - opened
            summary = json.loads(peer.stdout.readline())
            assert peer.wait(30) == 0
        finally:
            peer.kill()
            peer.wait()

    # Measured while every slow connection was still open.
    assert measured_in < IDLE_TIMEOUT, f"the loaded measurement took {measured_in:.2f}s"
    bound = max(2 * unloaded, FLOOR)
    print(
        f"\n{COUNT} slow connections: p99 unloaded {unloaded * 1e3:.2f} ms, "
        f"loaded {loaded * 1e3:.2f} ms (bound {bound * 1e3:.2f} ms); silent closed after "
        f"{min(summary['silent_lived']):.2f}..{max(summary['silent_lived']):.2f}s"
    )
    assert loaded <= bound, (unloaded, loaded)

    silent = COUNT // 2
    lived = summary["silent_lived"]
    assert len(lived) == silent, f"{silent - len(lived)} silent connections were never closed"
    # Not before --idle-timeout (the clock starts at accept, after our connect),
    # and within one sweep of it; 0.5 s for a loaded scheduler.
    assert min(lived) >= IDLE_TIMEOUT - 0.05, sorted(lived)[:5]
    assert max(lived) <= IDLE_TIMEOUT + SWEEP + 0.5, sorted(lived)[-5:]
    assert summary["trickle_closed"] == 0, "connections trickling a byte a second were closed"
    trickling = COUNT - silent
    assert summary["echoed"] >= trickling * int(HOLD - 1), summary["echoed"]
    assert server.workers(), "the worker died"
    assert "Traceback" not in server.log and "[ERROR]" not in server.log, server.log
