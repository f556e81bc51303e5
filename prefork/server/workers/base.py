"""What every worker does around its loop: signals, orphan checks, exit codes.

The constructor runs in the master and touches nothing process-wide;
``init_process()`` runs in the forked child and sets the process up before
``run()``. After the fork the master keeps a ``WorkerRecord`` by pid.

Signal handlers only record (TERM sets ``alive`` false and ``stopping``) or
raise (INT, QUIT); the C-level handler also writes a byte to the wake-up
pipe (``signal.set_wakeup_fd``), which ends the loop's wait, and the loop
acts. One exception, the sync worker's TERM handler: its only thread may be
inside a connection for as long as the client likes, and its listeners must
be let go of now, so the handler itself takes the queue and closes them
(``SyncWorker.handle_term`` says why; it only accepts on non-blocking
listeners and appends to a deque: no logging, no locks, no blocking).

Signals a worker obeys:
- TERM: graceful. Take what is queued on the listeners, then close them
  (a listener's last close resets whatever is still queued, and the
  master's copy may already be gone), finish every connection, exit.
- INT, QUIT: fast. Exit now; the connection in hand is closed.
- USR1: reopen --log-file (the master sends it on after reopening its own).
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import random
import signal
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

from prefork._fastio_common import (
    LIMIT_REFUSALS,
    LOOP_COUNTERS,
    UDP_REFUSALS,
    ClientLimits,
    access_line,
    client_address,
    format_client,
)
from prefork.proxy import TrustedPeers
from prefork.server.access_log import AccessLog
from prefork.server.handlers import LoadedHandler
from prefork.server.listeners import Listener
from prefork.server.log import get_logger, log_stream, plural, reopen_log_file
from prefork.server.privileges import drop_privileges
from prefork.server.proctitle import set_title
from prefork.server.scoreboard import Scoreboard
from prefork.server.wakeup import drain, open_wakeup_pipe
from prefork.settings import Config

PR_SET_PDEATHSIG = 1

# Signals the master owns; a worker must not die of them or act on them.
# SIGALRM too: no worker sets an alarm, and its default action would kill the
# worker and every connection on it (a handler's own signal.signal() still wins).
_IGNORED = (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGALRM)
# The master's watchdog sends this before it kills a silent worker: faulthandler
# dumps every thread's Python stack from the C signal handler, even when the
# interpreter is stuck.
DUMP_SIGNAL = signal.SIGUSR2


def set_parent_death_signal(sig: int) -> None:
    """Ask the kernel to send ``sig`` when the parent (the master) dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@dataclass
class WorkerRecord:
    """What the master keeps of one forked worker, by pid (the ``Worker``
    object went on in the child; the master reads its counters in the
    scoreboard)."""

    age: int  # spawn order, for logs
    generation: int  # bumped by every HUP
    slot: int  # its counters in the scoreboard
    position: int  # its --reuse-port socket group, -1 without
    started: float  # time.monotonic() at fork
    killed: bool = False  # the watchdog has killed it
    stopping: bool = False  # told to finish and exit (reload, TTOU)
    stop_deadline: float = 0.0  # then KILLed at this time.monotonic() if still there


class Worker:
    """Base class: subclasses implement ``run()``."""

    def __init__(
        self,
        age: int,
        ppid: int,
        listeners: list[Listener],
        config: Config,
        handler: LoadedHandler,
        scoreboard: Scoreboard,
        slot: int,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.age = age  # spawn order, for logs
        self.tls = tls  # the TLS listeners' context, made in the master
        self.scoreboard = scoreboard
        self.slot = slot  # this worker's counters in the scoreboard
        self.ppid = ppid
        self.listeners = listeners
        self.config = config
        self.handler = handler
        self.alive = True  # false once it stops accepting: TERM or --max-requests
        self.stopping = False  # TERM came: take the queue, let go of the listeners
        self.quitting = False  # QUIT came: leaving now
        self.max_requests = 0  # set in the child, where the jitter is drawn
        # How often the loop wakes to beat and to look at the master: well
        # inside --timeout, so a healthy worker is never taken for a stuck one.
        self.tick = min(1.0, config.timeout / 4) if config.timeout > 0 else 1.0
        self.booted = False  # False until run(): a failure before is a boot error
        self.log = get_logger()
        self.wakeup_r = -1
        # Counters, published to the scoreboard for the master to read.
        self.stats_lock = threading.Lock()
        self.accepted = 0
        self.active = 0
        self.bytes_in = 0
        self.bytes_out = 0
        # Connections ended or turned away, and why (the scoreboard's names).
        self.idle_closed = 0
        self.max_buffer_closed = 0
        self.handler_errors = 0
        self.stream_errors = 0  # of those, stream handlers' (tasks the loop does not see)
        self.proxy_rejected = 0
        # Datagrams the UDP guard dropped, by reason; when each was last logged.
        self.udp_refused_loop = 0
        self.udp_refused_source = 0
        self.udp_refused_rate = 0
        self.udp_rate_evictions = 0
        self.udp_refusals_logged = dict.fromkeys(UDP_REFUSALS, (0, 0.0))
        # A table's evictions last logged, by counter name: (count, when).
        self.evictions_logged: dict[str, tuple[int, float]] = {}
        # Connections the per-client limits refused, by reason; the tables'
        # evictions; when each was last logged, and the last client refused.
        self.limit_refused_conns = 0
        self.limit_refused_rate = 0
        self.limit_evictions = 0
        self.limit_refusals_logged = dict.fromkeys(LIMIT_REFUSALS, (0, 0.0))
        self.limit_refused_from = dict.fromkeys(LIMIT_REFUSALS, "")
        # The per-client limits as the blocking workers apply them (the
        # event worker's loop applies its own, with the same tables).
        self.client_limits = ClientLimits(**self.client_limit_args())
        # --access-log, opened in the child; lines dropped so far, last reported.
        self.access_log: AccessLog | None = None
        self.reported_drops = 0
        # Who may send a PROXY protocol header (--forwarded-allow-ips).
        self.proxy_trusted = TrustedPeers(config.forwarded_allow_ips)

    def init_process(self) -> None:
        """In the child: signals, wake-up pipe, privileges, orphan protection,
        then run."""
        self.init_signals()
        set_title(f"worker {self.age} [{self.title_suffix}]")
        if self.config.access_log is not None:  # before the privilege drop, as --log-file
            try:
                self.access_log = AccessLog(self.config.access_log)
            except OSError as exc:  # checked at start; a HUP's new path is not: serve on
                self.log.error(
                    "--access-log %s: cannot open: %s; no access log",
                    self.config.access_log,
                    exc.strerror,
                )
        drop_privileges(self.config.user, self.config.group)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())  # blocked across fork
        # Fast stop if the master dies; SIGQUIT is handled, so we log and go.
        # (After the privilege drop: changing credentials clears this setting.)
        set_parent_death_signal(signal.SIGQUIT)
        if os.getppid() != self.ppid:  # the master died before prctl
            self.log.warning("master is gone; worker exiting")
            return
        if self.config.max_requests:
            self.max_requests = self.config.max_requests + random.randint(
                0, self.config.max_requests_jitter
            )
        self.log.debug("worker %d booted", self.age)
        self.booted = True
        self.notify()
        self.publish()
        try:
            self.run()
        finally:
            self.publish()

    def notify(self) -> None:
        """Tell the master's watchdog this worker is alive. Call it at least
        every second while working, or the master kills it after --timeout."""
        self.scoreboard.beat(self.slot, time.monotonic())

    def waiting_on_peer(self) -> None:
        """A blocking wait for a client is not silence: pause the watchdog."""
        self.scoreboard.beat(self.slot, 0.0)

    def publish(self) -> None:
        """Write this worker's counters where the master can read them."""
        counters = (getattr(self, name) for name in LOOP_COUNTERS)  # the slot's order
        self.scoreboard.write(self.slot, os.getpid(), *counters)

    def init_signals(self) -> None:
        for sig in _IGNORED:
            signal.signal(sig, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, self.handle_term)
        signal.signal(signal.SIGINT, self.handle_quit)
        signal.signal(signal.SIGQUIT, self.handle_quit)
        signal.signal(signal.SIGUSR1, self.handle_usr1)
        faulthandler.register(DUMP_SIGNAL, file=log_stream(), all_threads=True)
        # A fresh wake-up pipe: the master's stays the master's.
        self.wakeup_r, self.wakeup_w = open_wakeup_pipe()

    @property
    def title_suffix(self) -> str:
        names = " ".join(listener.name for listener in self.listeners)
        return f"{self.config.handler} {names}"

    def handle_usr1(self, signum: int, frame: FrameType | None) -> None:
        if self.access_log is not None and not self.access_log.reopen():
            self.log.error("USR1: cannot reopen the access log; still writing to the old one")
        if reopen_log_file():
            faulthandler.register(DUMP_SIGNAL, file=log_stream(), all_threads=True)
        else:
            self.log.error("USR1: cannot reopen the log file; still writing to the old one")

    def log_access(self, client: object, started: float, nin: int, nout: int, end: str) -> None:
        """One access log line for a connection that ended, if there is an
        access log (blocking and asyncio workers; the event loop writes its own)."""
        if self.access_log is None:
            return
        line = access_line(
            time.time_ns(),
            format_client(client),
            os.getpid(),
            time.monotonic() - started,
            nin,
            nout,
            end,
        )
        self.access_log.write(line)
        self.report_access_log_drops(self.access_log.dropped)

    def report_access_log_drops(self, dropped: int) -> None:
        """Log lines the access log could not take, at most once a second."""
        now = time.monotonic()
        if dropped != self.reported_drops and now - self.drops_logged_at >= 1.0:
            self.log.warning(
                "access log: %d lines dropped (the file did not take them at once)",
                dropped - self.reported_drops,
            )
            self.reported_drops, self.drops_logged_at = dropped, now

    drops_logged_at = 0.0

    def report_udp_refusals(self, last_from: dict[str, str]) -> None:
        """Log the datagrams the UDP guard dropped, at most once a second per
        reason; ``last_from`` names the last sender refused for each."""
        self.report_refusals(
            "udp",
            "datagram",
            {
                "loop": "from a port below 1024 or one this server serves UDP on: a reply "
                "could start a packet loop",
                "source": "from an address no reply may go to (broadcast, multicast, unspecified)",
                "rate": "over --udp-rate for their source prefix",
            },
            "udp_refused_",
            self.udp_refusals_logged,
            last_from,
        )
        self.report_evictions(
            "udp_rate_evictions",
            "udp: the --udp-rate table is full: %s still limited pushed out, which "
            "start afresh; raise --udp-rate-table",
            lambda n: f"{n} prefix(es)",
        )

    def report_refusals(
        self,
        topic: str,
        noun: str,
        why: dict[str, str],
        prefix: str,
        logged: dict[str, tuple[int, float]],
        last_from: dict[str, str],
    ) -> None:
        """One line per reason of ``why`` whose counter (``prefix + reason``)
        moved, at most once a second each: how many ``noun``s were refused
        since the last line, why, and the last one's source; ``logged`` keeps
        (count, time) of each reason's last line."""
        now = time.monotonic()
        for reason, text in why.items():
            count = getattr(self, prefix + reason)
            before, at = logged[reason]
            if count == before or now - at < 1.0:
                continue
            self.log.warning(
                "%s: %s refused %s (last from %s)",
                topic,
                plural(count - before, noun),
                text,
                last_from.get(reason) or "-",
            )
            logged[reason] = (count, now)

    def report_evictions(self, name: str, message: str, what: Callable[[int], str]) -> None:
        """Log that the evictions counter ``name`` moved, at most once a
        second: ``message`` with ``what(evictions since the last line)``."""
        count = getattr(self, name)
        logged, at = self.evictions_logged.get(name, (0, 0.0))
        now = time.monotonic()
        if count != logged and now - at >= 1.0:
            self.log.warning(message, what(count - logged))
            self.evictions_logged[name] = (count, now)

    def stream_failed(self, exc: Exception, peer: object) -> None:
        """An ``async def handle(reader, writer)`` raised: log it with the
        peer and count it (its connection is aborted)."""
        self.stream_errors += 1
        self.handler_errors += 1
        self.log.error("handler failed; connection from %s closed", peer, exc_info=exc)

    def client_limit_args(self) -> dict[str, Any]:
        """--max-conns-per-ip and --conn-rate-per-ip, as ``ClientLimits``
        (and the event loop, with a ``conn_`` prefix) take them."""
        config = self.config
        limit = config.max_conns_per_ip
        return {
            "limit": limit,
            "tables": self.scoreboard.client_tables() if limit else None,
            "slot": self.slot,
            "rate": config.conn_rate_per_ip,
            "burst": config.conn_burst_per_ip,
            "rate_table": self.scoreboard.conn_rate_table() if config.conn_rate_per_ip else None,
        }

    def admit_client(self, peer: object) -> tuple[bool, tuple[int, int] | None]:
        """The per-client limits for a new connection from ``peer`` (the
        PROXY header's source if there was one): whether to serve it, and
        what to hand ``client_limits.release`` when it ends. A refusal is
        counted, and logged by ``report_limit_refusals``."""
        refusal, key, evicted = self.client_limits.admit(peer)
        with self.stats_lock:  # threads of a ThreadWorker share the counters
            self.limit_evictions += evicted
            if refusal is None:
                return True, key
            name = f"limit_refused_{refusal}"
            setattr(self, name, getattr(self, name) + 1)
            assert key is not None  # a peer without a key is never refused
            self.limit_refused_from[refusal] = client_address(key)
        return False, None

    def report_limit_refusals(self, last_from: dict[str, str]) -> None:
        """Log the connections the per-client limits refused, at most once a
        second per reason; ``last_from`` names the last client refused."""
        self.report_refusals(
            "limits",
            "connection",
            {
                "conns": f"over --max-conns-per-ip {self.config.max_conns_per_ip}",
                "rate": f"over --conn-rate-per-ip {self.config.conn_rate_per_ip:g}/s",
            },
            "limit_refused_",
            self.limit_refusals_logged,
            last_from,
        )
        self.report_evictions(
            "limit_evictions",
            "limits: the per-client table is full: %s still counted or limited pushed "
            "out (their limits start afresh); raise --per-ip-table",
            lambda n: plural(n, "client"),
        )

    def handle_term(self, signum: int, frame: FrameType | None) -> None:
        """Only record: the loop, woken by the wake-up pipe, sees ``stopping``
        and calls ``stop_accepting()``."""
        self.alive = False
        self.stopping = True

    def recycle(self) -> None:
        """Served ``max_requests``: stop accepting, finish, exit to be replaced."""
        if self.alive:
            self.alive = False
            served = plural(self.accepted, "connection")
            self.log.info("worker %d recycled after %s", self.age, served)
            self.recycle_listeners()

    def recycle_listeners(self) -> None:
        """What recycling does with the listeners: what a stop does."""
        self.stop_accepting()

    def stop_accepting(self) -> None:
        """Close this worker's copies of the listeners (idempotent). The
        loop calls it, not a signal handler (but see the sync worker)."""
        for listener in self.listeners:
            listener.close()

    def handle_quit(self, signum: int, frame: FrameType | None) -> None:
        """Fast stop: leave now. The master repeats QUIT until this process is
        gone (one that lands just before a blocking call is only run when the
        call returns), so a repeat while already leaving does nothing."""
        if self.quitting:
            return
        self.quitting = True
        self.alive = False
        sys.exit(0)

    def parent_alive(self) -> bool:
        return os.getppid() == self.ppid

    def drain_wakeup(self) -> None:
        drain(self.wakeup_r)

    def run(self) -> None:
        raise NotImplementedError
