"""The watchdog: which workers the master kills now, and how soon it looks again.

How it works: a worker writes a ``time.monotonic()`` heartbeat into its
scoreboard slot at least once a second while its loop turns, and 0.0 while
it waits on a client (which is not silence). With --timeout on, the master
calls ``find_silent`` every WATCHDOG_INTERVAL (``next_look``), so that it
acts within a second of a worker's heartbeat growing older than --timeout:
its loop is stuck (a handler that never returns, a C call that hangs). Such
a worker first gets DUMP_SIGNAL, on which faulthandler writes every
thread's stack to the log from the C signal handler (that works even when
the interpreter is stuck), then, after DUMP_GRACE, a KILL. The stack in the
log says where it was stuck, which a bare KILL would not.

``find_overstayed`` names the workers told to stop (reload, TTOU) that are
still there at their deadline (--graceful-timeout). The master looks at
them first and KILLs them without a dump: they had their time; one that
went silent before its deadline was dumped by the heartbeat check.

This module only decides. The arbiter sends the signals, logs, and marks
the record ``killed``, which both checks skip, so that nobody is killed twice.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from prefork.server.scoreboard import Scoreboard
from prefork.server.workers.base import WorkerRecord

WATCHDOG_INTERVAL = 0.25  # seconds between heartbeat checks when --timeout is on
DUMP_GRACE = 0.2  # seconds a silent worker gets to dump its stack before KILL


@dataclass(frozen=True)
class Silence:
    """A worker silent for longer than --timeout."""

    pid: int
    record: WorkerRecord
    seconds: float  # since its last heartbeat
    active: int  # connections in hand, for the log


def next_look(timeout: float) -> float | None:
    """Seconds until the heartbeats should be read again; None with
    --timeout 0 (no heartbeat to read: the --graceful-timeout deadlines
    wait for the next turn of the master's loop)."""
    return WATCHDOG_INTERVAL if timeout > 0 else None


def find_overstayed(workers: Mapping[int, WorkerRecord], now: float) -> list[int]:
    """The pids of the workers told to stop that are still there at their
    ``stop_deadline``, not yet killed."""
    return [
        pid
        for pid, record in workers.items()
        if record.stopping and not record.killed and now >= record.stop_deadline
    ]


def find_silent(
    workers: Mapping[int, WorkerRecord], scoreboard: Scoreboard, timeout: float, now: float
) -> Iterator[Silence]:
    """The workers whose heartbeat is older than ``timeout`` (none with 0).

    Lazy on purpose: each heartbeat is read when its turn comes, after the
    previous worker's DUMP_GRACE, so a worker that beats meanwhile is spared."""
    if timeout <= 0:
        return
    for pid, record in list(workers.items()):
        stats = scoreboard.read(record.slot)
        if stats.heartbeat <= 0 or record.killed:  # waiting on a client, or done for
            continue
        silent = now - stats.heartbeat
        if silent > timeout:
            yield Silence(pid, record, silent, stats.active)
