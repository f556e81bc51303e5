"""kill -9 of a random worker every 200 ms under an echo load.

What a user is owed: the master keeps the worker count (each victim is reaped
and replaced within a second, no zombie is left), and the only connections
that fail are the ones that were on a worker when it died. The listening
socket belongs to the master, so a connect is never refused; a lost
connection ends in a reset or an early end of file while its lifetime covers
a kill; every echo that completes is byte-exact.
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

from harness import SOAK, EchoLoad, scaled, timeout, zombie_children
from support import WORKER_CLASS_ARGS, pid_alive, wait_until

STORM = scaled(3.0, 12.0)  # seconds of killing
PERIOD = 0.2  # one kill every 200 ms
CLIENTS = scaled(16, 50)
WORKERS = 4
REPLACE_WITHIN = 1.0  # seconds from a kill to the count being whole again
# A kill is taken at its os.kill(); a connection may be seen to start a little
# after the worker that accepts it was chosen as a victim.
SLACK = 0.1


def kill_storm(server, duration: float, rng: random.Random) -> tuple[list[float], list[int]]:
    """Kill a random worker every PERIOD; return the kill times and victims."""
    kills: list[float] = []
    victims: list[int] = []
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        started = time.monotonic()
        workers = server.workers()
        assert len(workers) == WORKERS, f"worker count {len(workers)} before a kill\n{server.log}"
        victim = rng.choice(workers)
        kills.append(time.monotonic())
        os.kill(victim, signal.SIGKILL)
        victims.append(victim)
        assert wait_until(
            lambda v=victim: not pid_alive(v) and len(server.workers()) == WORKERS,
            REPLACE_WITHIN,
            0.005,
        ), f"worker {victim} not replaced within {REPLACE_WITHIN}s: {server.workers()}"
        time.sleep(max(0.0, PERIOD - (time.monotonic() - started)))
    return kills, victims


@pytest.mark.parametrize("worker_class", list(WORKER_CLASS_ARGS))
@timeout(90, 300)
def test_random_worker_kills_lose_only_the_connections_they_were_serving(
    server_factory, worker_class
):
    server = server_factory("-w", str(WORKERS), *WORKER_CLASS_ARGS[worker_class])
    server.wait_workers(WORKERS)
    load = EchoLoad(server.tcp(), threads=CLIENTS, duration=STORM + 30).start()
    try:
        time.sleep(0.3)  # the load is running before the first kill
        kills, victims = kill_storm(server, STORM, random.Random(6))
        time.sleep(0.3)
    finally:
        load.stop()

    # Reaped and replaced: the count is whole, no victim lingers as a zombie.
    server.wait_workers(WORKERS)
    assert wait_until(lambda: not zombie_children(server.pid), 2), zombie_children(server.pid)
    lingering = [v for v in victims if os.path.exists(f"/proc/{v}")]
    assert not lingering, f"victims not reaped: {lingering}"
    assert len(set(victims)) == len(victims)  # every kill hit a fresh worker

    assert load.corrupt == 0, f"{load.corrupt} echoes were not byte-exact"
    refused = [f for f in load.failures if f.phase == "connect"]
    assert not refused, f"connects failed while the master held the listener: {refused[:5]}"
    for failure in load.failures:
        assert "ConnectionResetError" in failure.error or (
            "BrokenPipeError" in failure.error or "EOF after" in failure.error
        ), failure
        assert any(failure.started - SLACK <= t <= failure.ended for t in kills), (
            f"a connection failed with no kill during its life: {failure}"
        )
    # Served throughout: far more echoes completed than were lost.
    assert load.completed > 10 * max(1, len(load.failures)), (load.completed, load.failures)
    print(
        f"\n{worker_class}: {len(kills)} kills in {STORM}s, {CLIENTS} clients, "
        f"{load.completed} echoes, {len(load.failures)} lost" + (" (soak)" if SOAK else "")
    )
    assert "Traceback" not in server.log, server.log
