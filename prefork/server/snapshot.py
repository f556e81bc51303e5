"""What the metrics pages show, read at one time: a ``Snapshot``.

``take_snapshot`` reads, once per request, the master's records of its
workers, their scoreboard slots, /proc (``procfs.py``) and the listeners'
accept queues; ``metrics.render`` and ``status_page.render_page`` only
format the result, so both pages agree. The scoreboard's fields are taken
generically: every field after the pid is a counter but those in
``SLOT_GAUGES``, so a field added to the slot shows up without code here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from prefork._fastio_common import SLOT_FIELDS
from prefork.server.listeners import Listener
from prefork.server.positions import Positions
from prefork.server.procfs import ListenQueue, ProcessStats, listen_queue, process_stats
from prefork.server.scoreboard import Scoreboard, WorkerStats

# The scoreboard fields after the pid: what a worker reports.
SLOT_VALUES = SLOT_FIELDS[SLOT_FIELDS.index("pid") + 1 :]

# The scoreboard fields that are levels, not counts.
SLOT_GAUGES = ("active",)
SLOT_COUNTERS = tuple(name for name in SLOT_VALUES if name not in SLOT_GAUGES)

# Why the watchdog killed a worker (arbiter.murder_workers counts them).
KILL_REASONS = ("silent", "graceful_timeout")


def new_totals() -> dict[str, int]:
    """What exited workers served, by counter field, all zero."""
    return dict.fromkeys(SLOT_COUNTERS, 0)


def add_totals(totals: dict[str, int], stats: WorkerStats) -> None:
    """Add a worker's counters to ``totals`` (when it exits, or to sample)."""
    for name in SLOT_COUNTERS:
        totals[name] = totals.get(name, 0) + int(getattr(stats, name))


@dataclass
class MasterEvents:
    """What the master counts where it happens (in the arbiter)."""

    watchdog_kills: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KILL_REASONS, 0))
    respawns: int = 0  # forks that replaced a worker that left untold


@dataclass(frozen=True)
class Sample:
    """One worker's line in the table."""

    age: int  # its number, in spawn order
    pid: int
    generation: int
    state: str  # booting, serving, stopping (told to finish and exit)
    uptime: float  # seconds since its fork
    heartbeat_age: float  # seconds; -1 while it waits on a client
    stats: WorkerStats  # its scoreboard slot
    process: ProcessStats | None  # None if it was gone when /proc was read

    def value(self, slot_field: str) -> int:
        return int(getattr(self.stats, slot_field))


@dataclass(frozen=True)
class MasterSample:
    pid: int
    generation: int
    uptime: float  # seconds
    workers_wanted: int
    worker_class: str
    handler: str
    process: ProcessStats | None


@dataclass(frozen=True)
class ListenerSample:
    name: str
    position: int  # its --reuse-port position; -1 for a listener every worker shares
    queue: ListenQueue


@dataclass(frozen=True)
class Snapshot:
    """Everything both pages show, read at one time."""

    master: MasterSample
    workers: list[Sample]  # oldest first
    totals: dict[str, int]  # every counter field: the live workers and those that exited
    watchdog_kills: dict[str, int]  # by reason
    respawns: int
    crash_backoffs: int
    listeners: list[ListenerSample]  # TCP listeners only: others have no queue to read


class Supervised(Protocol):
    """What the page needs of the master's record of a worker."""

    age: int
    generation: int
    slot: int
    started: float
    stopping: bool


def sample_workers(workers: Mapping[int, Supervised], scoreboard: Scoreboard) -> list[Sample]:
    """What every live worker (by pid) has done, from the scoreboard and
    /proc, oldest first."""
    now = time.monotonic()
    samples = []
    for pid, record in sorted(workers.items(), key=lambda item: item[1].age):
        stats = scoreboard.read(record.slot)
        beat_age = now - stats.heartbeat if stats.heartbeat > 0 else -1.0
        state = "stopping" if record.stopping else "serving" if stats.pid else "booting"
        samples.append(
            Sample(
                record.age,
                pid,
                record.generation,
                state,
                now - record.started,
                beat_age,
                stats,
                process_stats(pid),
            )
        )
    return samples


def held_listeners(
    shared: list[Listener], positions: Positions | None
) -> list[tuple[Listener, int]]:
    """Every listener the master holds, with its --reuse-port position (-1: shared)."""
    held = [(listener, -1) for listener in shared]
    if positions is not None:
        for position, group in sorted(positions.live.items()):
            held += [(listener, position) for listener in group]
        for retired in positions.retired:
            held += [(listener, retired.position) for listener in retired.listeners]
    return held


def sample_listeners(held: list[tuple[Listener, int]]) -> list[ListenerSample]:
    samples = []
    for listener, position in held:
        queue = listen_queue(listener.sock)
        if queue is not None:
            samples.append(ListenerSample(listener.name, position, queue))
    return samples


def take_snapshot(
    master: MasterSample,
    workers: Mapping[int, Supervised],
    scoreboard: Scoreboard,
    exited_totals: dict[str, int],
    events: MasterEvents,
    crash_backoffs: int,
    held: list[tuple[Listener, int]],
) -> Snapshot:
    """Read everything once: the live workers, and the totals with what
    exited ones served."""
    samples = sample_workers(workers, scoreboard)
    totals = dict(exited_totals)
    for s in samples:
        add_totals(totals, s.stats)
    return Snapshot(
        master,
        samples,
        totals,
        dict(events.watchdog_kills),
        events.respawns,
        crash_backoffs,
        sample_listeners(held),
    )


def master_sample(
    generation: int, started: float, workers_wanted: int, worker_class: str, handler: str
) -> MasterSample:
    """This process, the master, as the pages show it (``started``: its
    time.monotonic() at start)."""
    pid = os.getpid()
    return MasterSample(
        pid,
        generation,
        time.monotonic() - started,
        workers_wanted,
        worker_class,
        handler,
        process_stats(pid),
    )
