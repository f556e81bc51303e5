"""--reuse-port: each worker position's own listening sockets, and the retired ones.

How it works: with --reuse-port every worker position 0..N-1 has its own
SO_REUSEPORT socket per TCP or UDP address, each with its own accept queue.
The master holds all of them for as long as they may serve: the worker in a
position inherits that position's sockets, and the next worker there (a
respawn, the next generation) inherits the same sockets and their queue.

A socket closes only when its position is retired (TTOU, or a HUP to fewer
workers), and nothing queued on it may be lost then, because the kernel
resets the queue at the last close:

1. ``retire_from`` attaches the SYN filter, so nothing new joins the queue,
   and remembers which workers held the position (the arbiter then TERMs
   them; each takes the queue as it stops);
2. ``settle`` keeps the master's copy at least ``RETIRE_LINGER`` (a handshake
   whose SYN passed before the filter finishes meanwhile), then as long as
   connections are queued and a holder is still there;
3. once the queue is empty it closes the sockets. If the holders are gone
   and connections are still queued (one had stopped accepting at
   --max-requests and then ended, or was killed), it asks the arbiter to
   fork a worker on those sockets alone that stops at once: it takes the
   queue, serves it and exits (``RETIRE_DRAINS`` times at most).

The arbiter owns the workers and this class owns the sockets: it is told
which pids are alive and forks through the callback given to ``settle``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

from prefork.server.listeners import Listener, close_listeners, create_listeners
from prefork.server.log import get_logger
from prefork.settings import Address

# The master keeps a retired position's sockets at least RETIRE_LINGER (a
# handshake whose SYN passed before the filter finishes within an RTT; a
# longer hold turns more new clients away for a SYN retransmit), looks at
# their queue every RETIRE_POLL while workers take it, and forks at most
# RETIRE_DRAINS workers to take what queued after its own had left.
RETIRE_LINGER = 0.1  # seconds
RETIRE_POLL = 0.05  # seconds
RETIRE_DRAINS = 3


@dataclass
class RetiredSockets:
    """A position's sockets once no worker will take it again."""

    position: int
    listeners: list[Listener]
    holders: set[int]  # pids of the workers that may still accept on them
    since: float  # time.monotonic() when the filter went on
    drains: int = 0  # workers forked only to take what queued after the holders left

    def held(self, alive: Collection[int]) -> bool:
        """Whether a worker that may take the queue is still there."""
        return not self.holders.isdisjoint(alive)


class Positions:
    """Every position's sockets (made on first use, kept across respawns and
    reloads) and the retired ones until their queue is served."""

    def __init__(
        self,
        first: list[Listener],
        backlog: int,
        handed_over: dict[str, int] | None = None,
        proxy: bool = False,
    ) -> None:
        self.log = get_logger()
        self.addresses: list[Address] = [lst.bound_address() for lst in first]
        self.backlog = backlog
        # A USR2 upgrade: the previous master's position sockets, by key
        # (their queues go on; a position made anew would start empty).
        self.handed_over = handed_over or {}
        self.live: dict[int, list[Listener]] = {0: first}
        # Adopt every position handed over, beyond the count too: its queue
        # must be served (retire_from then takes care of the extra ones).
        for key in self.handed_over:
            if key.startswith("p"):
                self.listeners(int(key[1:].partition(".")[0]), proxy)
        self.retired: list[RetiredSockets] = []  # given up, not yet closed

    def listeners(self, position: int, proxy: bool) -> list[Listener]:
        """The sockets of ``position``, made on first use and then kept
        (``proxy``: --proxy-protocol, every stream expects a PROXY header;
        else as each address says)."""
        if position not in self.live:
            made = create_listeners(
                self.addresses,
                self.backlog,
                reuse_port=True,
                keys=[f"p{position}.{i}" for i in range(len(self.addresses))],
                handed_over=self.handed_over,
            )
            for listener in made:
                listener.proxy = listener.proxy or (proxy and not listener.datagram)
            self.live[position] = made
        return self.live[position]

    def live_sockets(self) -> list[Listener]:
        """Every live position's sockets (what a USR2 hands over)."""
        return [lst for group in self.live.values() for lst in group]

    def sockets(self) -> list[Listener]:
        """Every position's sockets, retired ones included."""
        groups = [*self.live.values(), *(group.listeners for group in self.retired)]
        return [lst for group in groups for lst in group]

    def retire_from(self, count: int, positions: dict[int, int]) -> None:
        """Retire every position from ``count`` up: its sockets stop taking
        new connections at once (clients retry onto the other sockets), and
        the workers in it (``positions``: pid -> position) become its
        holders. Call it before TERMing them: they take the queue as they
        stop. A position whose worker had already gone is retired too: what
        queued there waited for a replacement."""
        for position in [p for p in self.live if p >= count]:
            listeners = self.live.pop(position)
            for listener in listeners:
                listener.drop_new_connections()
            holders = {pid for pid, p in positions.items() if p == position}
            self.retired.append(RetiredSockets(position, listeners, holders, time.monotonic()))

    def settle(
        self,
        alive: Collection[int],
        respawn_at: float,
        fork_to_drain: Callable[[int, list[Listener]], int],
    ) -> None:
        """Close retired sockets once nothing is queued on them. ``alive``:
        the workers' pids. ``fork_to_drain(position, sockets)`` forks a
        worker on those sockets that stops at once and returns its pid; it
        is called only from ``respawn_at`` on (the arbiter's crash back-off)."""
        now = time.monotonic()
        for group in list(self.retired):
            if now < group.since + RETIRE_LINGER:
                continue
            queued = any(listener.has_queue() for listener in group.listeners)
            if queued and group.held(alive):
                continue  # a holder takes them as it stops; look again shortly
            if queued and group.drains < RETIRE_DRAINS:
                if now >= respawn_at:
                    self.log.info(
                        "retired position %d: connections queued after its workers left; "
                        "a worker takes them",
                        group.position,
                    )
                    group.holders.add(fork_to_drain(group.position, group.listeners))
                    group.drains += 1
                continue
            if queued:
                self.log.warning(
                    "closing the retired sockets of position %d with connections queued",
                    group.position,
                )
            close_listeners(group.listeners)
            self.retired.remove(group)

    def due(self, alive: Collection[int], respawn_at: float) -> float | None:
        """Seconds until ``settle`` should look again, if ever."""
        now = time.monotonic()
        due = []
        for group in self.retired:
            if now < group.since + RETIRE_LINGER:
                due.append(group.since + RETIRE_LINGER)
            elif group.held(alive):
                due.append(now + RETIRE_POLL)
            else:  # queued, no holder: backing off before the next fork
                due.append(respawn_at)
        return max(0.0, min(due) - now) if due else None

    def close(self) -> None:
        close_listeners(self.sockets())
