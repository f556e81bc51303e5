"""The crash back-off: how long the master waits before it forks again.

How it works: a worker that crashes soon after it starts will most likely
crash again (a handler that takes its process down on every connection, a
native module that segfaults), and respawning it at once would fork in a
tight loop. A crash is an exit code other than 0, or death by a fatal
signal the worker raised itself (CRASH_SIGNALS; a TERM or KILL from the
master or an operator is not one). Each crash within HEALTHY_LIFETIME of
the worker's start puts the next fork off, twice as long each time in a
row, from RESPAWN_DELAY_FIRST up to RESPAWN_DELAY_MAX; any other exit ends
the run of crashes. The arbiter forks nothing (no respawn, no --reuse-port
drain) before ``respawn_at``.
"""

from __future__ import annotations

import os
import signal
import time

from prefork.errors import EXIT_OK
from prefork.server.log import get_logger

HEALTHY_LIFETIME = 1.0  # seconds
RESPAWN_DELAY_FIRST = 0.1  # seconds
RESPAWN_DELAY_MAX = 10.0  # seconds
CRASH_SIGNALS = frozenset(
    {signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGFPE, signal.SIGILL}
)


def is_crash(status: int) -> bool:
    """Whether a ``waitpid`` status is a crash: a non-zero exit code, or a
    signal in CRASH_SIGNALS."""
    if os.WIFSIGNALED(status):
        return os.WTERMSIG(status) in CRASH_SIGNALS
    return os.waitstatus_to_exitcode(status) != EXIT_OK


class Backoff:
    """The run of quick crashes and the time the next fork may happen."""

    def __init__(self) -> None:
        self.log = get_logger()
        self.crashes = 0  # quick crashes in a row
        self.respawn_at = 0.0  # no fork before this time.monotonic()
        self.backoffs = 0  # forks ever put off (for the metrics)

    def note_exit(self, status: int, lifetime: float) -> None:
        """Count a worker's exit (``status`` from ``waitpid``, ``lifetime``
        in seconds since its fork): back off while workers keep crashing
        soon after they start."""
        if not is_crash(status) or lifetime >= HEALTHY_LIFETIME:
            self.crashes = 0
            return
        self.crashes += 1
        self.backoffs += 1
        delay = min(RESPAWN_DELAY_FIRST * 2 ** (self.crashes - 1), RESPAWN_DELAY_MAX)
        self.respawn_at = time.monotonic() + delay
        self.log.warning(
            "workers crashed %d times in a row; next respawn in %.1fs", self.crashes, delay
        )

    def may_respawn(self, now: float) -> bool:
        return now >= self.respawn_at
