"""The master: owns the listeners, forks workers, keeps their number, stops them.

How it works: the master binds every listener before forking and keeps them
open for its whole life (workers only borrow them, so a worker that leaves
never resets a queue). Its signal handler only records: ``record_signal``
appends to ``sig_queue`` and ``signal.set_wakeup_fd`` ends the loop's
``select``. Each round the loop reaps exited workers, runs the watchdog
(``murder_workers``), acts on the recorded signals through one table,
``signal_handlers`` (each ``handle_*`` says what its signal does), and forks
what the current generation is missing. A stop leaves the loop for ``stop``.

The arbiter acts; other modules decide or keep state for it: ``watchdog.py``
says which workers to kill and when to look again, ``backoff.py`` when the
next fork may happen after crashes, ``listeners.py`` opens the listeners and
``positions.py`` keeps the --reuse-port sockets; the /metrics and status
pages are read in ``snapshot.py``, written in ``metrics.py`` and
``status_page.py`` and served from this loop. The arbiter counts what the
pages report of it (respawns, watchdog kills) where each happens.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from types import FrameType
from typing import Literal

from prefork.errors import (
    EXIT_OK,
    WORKER_BOOT_ERROR,
    BindError,
    ConfigError,
    PreforkError,
    WorkerBootError,
)
from prefork.server.backoff import Backoff
from prefork.server.handlers import LoadedHandler, check_fit, load_handler, reload_handler
from prefork.server.listeners import Listener, close_listeners, give_unix_sockets_to, open_listeners
from prefork.server.log import get_logger, log_file_path, plural, reopen_log_file, setup_logging
from prefork.server.metrics import MetricsServer
from prefork.server.pidfile import PidFile
from prefork.server.positions import Positions
from prefork.server.privileges import file_owner
from prefork.server.proctitle import set_title
from prefork.server.scoreboard import Scoreboard
from prefork.server.snapshot import (
    MasterEvents,
    Snapshot,
    add_totals,
    held_listeners,
    master_sample,
    new_totals,
    take_snapshot,
)
from prefork.server.systemd import Notifier
from prefork.server.upgrade import HandOver, Successor, old_pid_path, read_ready, start_successor
from prefork.server.wakeup import drain, open_wakeup_pipe
from prefork.server.watchdog import DUMP_GRACE, find_overstayed, find_silent, next_look
from prefork.server.workers import WORKER_CLASSES
from prefork.server.workers.base import DUMP_SIGNAL, WorkerRecord
from prefork.settings import OPTIONS, RESTART_ONLY, Config, check_udp_exposure
from prefork.tls import check_tls_fit, check_tls_options, context_of

FAST_STOP_TIMEOUT = 5.0  # seconds a fast stop waits before KILL
# A QUIT that reaches a worker just before it blocks in recv() runs its handler
# only when that call returns, which a quiet client may never make happen; a
# second QUIT interrupts the call. So a fast stop repeats QUIT this often.
QUIT_REPEAT = 0.5  # seconds
LOOP_INTERVAL = 1.0  # seconds the master sleeps when nothing happens


def show_setting(key: str, value: object) -> str:
    """A setting's value as the command line would say it (HUP's log line)."""
    if value is None:
        return "unset"
    if key in ("umask", "unix_mode") and isinstance(value, int):
        return f"{value:03o}"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(str(item) for item in value)
    return str(value)


def datagram_hosts(listeners: list[Listener]) -> list[tuple[str, str]]:
    """Each UDP listener's name and bound host, as check_udp_exposure takes
    them (an inherited fd:// socket's address is only known here)."""
    return [
        (lst.name, str(lst.sock.getsockname()[0]))
        for lst in listeners
        if lst.datagram and lst.sock.family in (socket.AF_INET, socket.AF_INET6)
    ]


def check_listeners(config: Config, handler: LoadedHandler, listeners: list[Listener]) -> None:
    """The handler and the settings fit the listeners as bound (start and
    HUP): the worker class, TLS beside UDP, UDP exposure (raises PreforkError)."""
    datagram = next((lst.name for lst in listeners if lst.datagram), None)
    stream = next((lst.name for lst in listeners if not lst.datagram), None)
    secured = next((lst.name for lst in listeners if lst.tls), None)
    check_fit(handler, config.worker_class, datagram, stream)
    check_tls_fit(
        config.worker_class, secured, datagram, handler.builtin is not None, bool(config.sni)
    )
    check_udp_exposure(config.handler, config.udp_public, datagram_hosts(listeners))


class Stop(Exception):
    """Raised by a stop signal's handler: the main loop leaves for ``stop``."""

    def __init__(self, graceful: bool) -> None:
        super().__init__("graceful stop" if graceful else "fast stop")
        self.graceful = graceful


class Arbiter:
    def __init__(
        self,
        config: Config,
        handler: LoadedHandler,
        reload_config: Callable[[], Config] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.config = config
        # The TLS listeners' context: made before the first fork, again by a HUP.
        self.tls = tls
        self.reload_config = reload_config  # HUP reads the settings again with it
        self.log = get_logger()
        self.worker_class = WORKER_CLASSES[config.worker_class]
        self.handler = handler
        self.num_workers = config.workers
        self.listeners: list[Listener] = []  # shared by every worker
        self.positions: Positions | None = None  # --reuse-port: each position's own
        self.workers: dict[int, WorkerRecord] = {}  # by pid
        self.scoreboard = Scoreboard(
            rate_entries=config.udp_rate_table,
            client_entries=config.per_ip_table if config.max_conns_per_ip else 0,
            conn_rate_entries=config.per_ip_table if config.conn_rate_per_ip else 0,
        )
        self.worker_age = 0
        self.generation = 0
        self.metrics: MetricsServer | None = None
        # What workers that have exited served, for the metrics totals.
        self.exited_totals = new_totals()
        self.events = MasterEvents()  # respawns and watchdog kills, for the metrics
        self.vacancies = 0  # current workers gone untold: the next forks are respawns
        self.started = time.monotonic()
        self.backoff = Backoff()  # after quick crashes, forks wait
        self.sig_queue: deque[int] = deque()
        # The one place where a signal meets what the master does about it.
        self.signal_handlers: dict[int, Callable[[], None]] = {
            signal.SIGHUP: self.handle_hup,
            signal.SIGTERM: self.handle_term,
            signal.SIGINT: self.handle_int,
            signal.SIGQUIT: self.handle_quit,
            signal.SIGTTIN: self.handle_ttin,
            signal.SIGTTOU: self.handle_ttou,
            signal.SIGUSR1: self.handle_usr1,
            signal.SIGUSR2: self.handle_usr2,
            signal.SIGWINCH: self.handle_winch,
            signal.SIGCHLD: self.handle_chld,
        }
        self.stop_mode: Literal["graceful", "fast"] | None = None  # set by stop()
        self.stop_deadline = 0.0  # stop(): KILL what is left at this time.monotonic()
        self.wakeup_r = -1
        self.wakeup_w = -1
        self.pid = os.getpid()
        self.pid_file = PidFile(config.pid_file) if config.pid_file else None
        self.notifier = Notifier()
        # USR2 (upgrade.py): what this master was handed by the one it
        # upgrades, the new master it started, and WINCH's "no workers".
        self.hand_over = HandOver()
        self.successor: Successor | None = None
        self.winched = False

    # -- set-up ---------------------------------------------------------------

    def start(self) -> None:
        """Bind every listener (raises BindError), then take over signals."""
        if self.config.umask is not None:
            os.umask(self.config.umask)
        self.hand_over = HandOver.from_environment()
        if self.pid_file is not None:  # first: a second server must change nothing
            self.pid_file.create(self.pid)
        self.give_log_file_to_workers()
        if self.config.metrics is not None:
            try:
                self.metrics = MetricsServer(self.config.metrics, self.hand_over.take_metrics())
            except BindError as exc:  # say which option: -b addresses fail alike
                raise BindError(f"--metrics {exc}") from None
        # A failure is then the only line.
        listeners = open_listeners(self.config, self.hand_over.sockets)
        if self.metrics is not None:
            self.log.info("metrics on http://%s/metrics", self.metrics.name)
        for listener in listeners:
            notes = [
                name
                for name, on in (("PROXY protocol", listener.proxy), ("TLS", listener.tls))
                if on
            ]
            note = f" ({', '.join(notes)})" if notes else ""
            self.log.info("listening on %s%s", listener.name, note)
        try:
            check_listeners(self.config, self.handler, listeners)
        except PreforkError:
            close_listeners(listeners, unlink=True)
            raise
        give_unix_sockets_to(listeners, self.config.user, self.config.group)
        self.listeners = listeners
        if self.config.reuse_port:  # UNIX and fd:// sockets stay shared
            self.listeners = [lst for lst in listeners if not lst.per_slot]
            first = [lst for lst in listeners if lst.per_slot]  # position 0's
            self.positions = Positions(
                first, self.config.backlog, self.hand_over.sockets, self.config.proxy_protocol
            )
        if self.hand_over.sockets:
            adopted = {lst.fileno() for lst in self.all_listeners()}
            if self.metrics is not None:
                adopted.add(self.metrics.listener.fileno())
            self.hand_over.close_unused(adopted)
            self.log.info(
                "upgrade: took over %s from master %d",
                plural(len(adopted), "socket"),
                self.hand_over.predecessor,
            )
        self.init_signals()
        names = " ".join(lst.name for lst in listeners)
        set_title(f"master [{self.config.handler} {names}]")
        self.log.info(
            "master started: %d %s worker(s), handler %s",
            self.num_workers,
            self.config.worker_class,
            self.config.handler,
        )

    def give_log_file_to_workers(self) -> None:
        """Workers that drop privileges reopen --log-file on USR1 as their
        user: the file must be theirs (as gunicorn does)."""
        path = log_file_path()
        owner = file_owner(self.config.user, self.config.group)
        if path is not None and owner is not None and os.geteuid() == 0:
            os.chown(path, *owner)

    def init_signals(self) -> None:
        self.wakeup_r, self.wakeup_w = open_wakeup_pipe()
        # A stray alarm must not take the master (and so every worker) down.
        signal.signal(signal.SIGALRM, signal.SIG_IGN)
        for sig in self.signal_handlers:
            signal.signal(sig, self.record_signal)

    def record_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only record: logging or forking from a handler can deadlock.
        self.sig_queue.append(signum)

    # -- the loop -------------------------------------------------------------

    def run(self) -> int:
        """Serve until a stop signal; return the exit code."""
        try:
            self.start()
            self.manage_workers()
            self.notifier.notify(f"READY=1\nMAINPID={self.pid}\nSTATUS={self.status_text()}")
            self.hand_over.report_ready()  # a USR2 upgrade: the old master may go
            while True:
                self.sleep(self.loop_timeout())
                self.notifier.ping()
                self.reap_workers()
                self.murder_workers()
                self.dispatch_signals()
                self.manage_workers()
        except Stop as request:
            return self.stop(request.graceful)
        except WorkerBootError as exc:
            self.log.error("%s; stopping", exc)
            self.stop(graceful=False)
            raise
        finally:
            self.close_all_listeners()
            self.notifier.close()
            if self.pid_file is not None:
                self.pid_file.remove(self.pid)
                if self.successor is not None:  # ours is FILE.oldbin meanwhile
                    PidFile(old_pid_path(self.pid_file.path)).remove(self.pid)

    def status_text(self) -> str:
        return (
            f"{self.num_workers} {self.config.worker_class} worker(s), generation {self.generation}"
        )

    def loop_timeout(self) -> float:
        """Sleep no longer than until the next thing is due: the watchdog's
        look at the heartbeats, systemd's watchdog ping, a look at the
        retired --reuse-port sockets, a respawn put off after crashes."""
        dues = [next_look(self.config.timeout), self.notifier.ping()]
        if self.positions is not None:
            dues.append(self.positions.due(self.workers, self.backoff.respawn_at))
        interval = min([LOOP_INTERVAL, *(due for due in dues if due is not None)])
        delay = self.backoff.respawn_at - time.monotonic()
        return max(0.0, min(interval, delay)) if delay > 0 else interval

    def sleep(self, timeout: float) -> None:
        """Wait for a signal (via the wake-up pipe) or ``timeout`` seconds,
        serving the metrics endpoint meanwhile."""
        if self.sig_queue:
            return
        watched = [self.wakeup_r]
        if self.successor is not None and self.successor.ready_r >= 0:
            watched.append(self.successor.ready_r)
        if self.metrics is not None:
            watched += self.metrics.fds()
            client_due = self.metrics.timeout(time.monotonic())
            if client_due is not None:
                timeout = min(timeout, client_due)
        try:
            readable, _, _ = select.select(watched, [], [], timeout)
        except InterruptedError:
            readable = []
        drain(self.wakeup_r)
        if self.successor is not None and self.successor.ready_r in readable:  # -1 never is
            self.check_successor()
        if self.metrics is not None:
            self.metrics.handle(readable, self.snapshot)

    def snapshot(self) -> Snapshot:
        """What the metrics pages show, read now."""
        master = master_sample(
            self.generation,
            self.started,
            self.num_workers,
            self.config.worker_class,
            self.config.handler,
        )
        return take_snapshot(
            master,
            self.workers,
            self.scoreboard,
            self.exited_totals,
            self.events,
            self.backoff.backoffs,
            held_listeners(self.listeners, self.positions),
        )

    # -- signals --------------------------------------------------------------

    def dispatch_signals(self) -> None:
        """Act on the recorded signals in order, each through its entry in
        ``signal_handlers``. Once a stop has begun only INT and QUIT still
        count (they make a graceful stop fast)."""
        while self.sig_queue:
            sig = self.sig_queue.popleft()
            if self.stop_mode is None or sig in (signal.SIGINT, signal.SIGQUIT):
                self.signal_handlers[sig]()

    def handle_term(self) -> None:
        """Graceful stop. The SYN filter goes on every TCP listener and the
        master closes its copies (new clients are refused once the workers
        let go, not queued and reset later), TERMs the workers, waits up to
        --graceful-timeout for their connections, KILLs the rest, exits 0."""
        raise Stop(graceful=True)

    def handle_int(self) -> None:
        """Fast stop: close the listeners, QUIT the workers, KILL what is left
        after FAST_STOP_TIMEOUT, exit 0. During a graceful stop: make it fast."""
        if self.stop_mode is None:
            raise Stop(graceful=False)
        if self.stop_mode == "graceful":
            self.stop_mode = "fast"
            self.log.info("fast stop")
            self.kill_workers(signal.SIGQUIT)
            self.stop_deadline = min(self.stop_deadline, time.monotonic() + FAST_STOP_TIMEOUT)

    def handle_quit(self) -> None:
        """As INT."""
        self.handle_int()

    def handle_hup(self) -> None:
        """Graceful reload (see ``reload``), told to systemd. After WINCH: the
        workers come back as they were, nothing read again (a rollback)."""
        if self.winched:
            self.winched = False
            self.num_workers = self.config.workers
            self.log.info("HUP after WINCH: %s back", plural(self.num_workers, "worker"))
            return
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notifier.notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")
        self.reload()
        self.notifier.notify(f"READY=1\nSTATUS={self.status_text()}")

    def handle_ttin(self) -> None:
        """One worker more (at most one per scoreboard slot)."""
        self.num_workers = min(self.num_workers + 1, self.scoreboard.slots)
        self.log.info("TTIN: %d worker(s)", self.num_workers)

    def handle_ttou(self) -> None:
        """One worker fewer, never fewer than one (``manage_workers`` TERMs it)."""
        if self.num_workers > 1:
            self.num_workers -= 1
        self.log.info("TTOU: %d worker(s)", self.num_workers)

    def handle_usr1(self) -> None:
        """Reopen --log-file here, then it and --access-log in every worker."""
        if log_file_path() is None:
            self.log.info("USR1: no --log-file to reopen (the log goes to stderr)")
            if self.config.access_log is not None:
                self.kill_workers(signal.SIGUSR1)  # their --access-log
            return
        if reopen_log_file():
            self.give_log_file_to_workers()  # a new file is root's: the workers must reopen it
            self.log.info("USR1: log file reopened")
        else:
            self.log.error("USR1: cannot reopen the log file; still writing to the old one")
        self.kill_workers(signal.SIGUSR1)

    def handle_usr2(self) -> None:
        """Upgrade: start a new master (``python -m prefork``, this command
        line) on these very sockets; see upgrade.py. One at a time."""
        if self.successor is not None:
            self.log.warning(
                "USR2: an upgrade is under way (new master %d); ignored", self.successor.pid
            )
            return
        if self.hand_over.predecessor_alive():
            self.log.warning(
                "USR2: master %d, which this one upgrades, is still running; ignored",
                self.hand_over.predecessor,
            )
            return
        sockets = {lst.key: lst.fileno() for lst in self.listeners}
        if self.positions is not None:
            sockets.update({lst.key: lst.fileno() for lst in self.positions.live_sockets()})
        if self.metrics is not None:
            sockets["metrics"] = self.metrics.listener.fileno()
        if self.pid_file is not None:
            try:
                os.replace(self.pid_file.path, old_pid_path(self.pid_file.path))
            except OSError as exc:
                self.log.error("USR2: cannot move the pid file aside: %s; ignored", exc.strerror)
                return
        try:
            self.successor = start_successor(sockets, self.pid, self.notifier.address)
        except OSError as exc:
            self.log.error("USR2: cannot fork a new master: %s", exc.strerror)
            self.give_pid_file_back()
            return
        self.log.info("USR2: new master %d starting", self.successor.pid)

    def check_successor(self) -> None:
        """The new master's pipe is readable: it is ready, or it failed."""
        assert self.successor is not None
        said = read_ready(self.successor)
        if said is None:
            return
        if said:
            self.log.info(
                "USR2: new master %d ready; WINCH here retires this master's workers",
                self.successor.pid,
            )
        os.close(self.successor.ready_r)  # said, or closed unsaid: reaping tells the rest
        self.successor.ready_r = -1

    def successor_exited(self, status: int) -> None:
        """The new master left (failed to start, or stopped after a rollback):
        this master keeps serving and takes the pid file back."""
        assert self.successor is not None
        successor, self.successor = self.successor, None
        if successor.ready_r >= 0:
            os.close(successor.ready_r)
        how = (
            f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
            if os.WIFSIGNALED(status)
            else f"exited with code {os.waitstatus_to_exitcode(status)}"
        )
        if successor.ready:  # stopped after it served: a rollback
            self.log.info("USR2: new master %d %s; this master serves alone", successor.pid, how)
        else:
            self.log.error(
                "USR2: new master %d %s before it was ready; this master (%d) keeps serving",
                successor.pid,
                how,
                self.pid,
            )
        self.give_pid_file_back()

    def give_pid_file_back(self) -> None:
        """FILE.oldbin back to FILE (written anew if it went missing)."""
        if self.pid_file is None:
            return
        try:
            os.replace(old_pid_path(self.pid_file.path), self.pid_file.path)
        except OSError:
            try:
                self.pid_file.create(self.pid)
            except PreforkError as exc:
                self.log.error("%s", exc)

    def handle_winch(self) -> None:
        """Stop this master's workers gracefully and fork none (a new master
        serves); the master stays. HUP brings them back, TERM ends it."""
        if self.winched:
            return
        self.winched = True
        self.log.info(
            "WINCH: %s finishing; HUP brings them back, TERM stops this master",
            plural(len(self.current_workers()), "worker"),
        )

    def sharing_master(self) -> int:
        """The pid of another master holding these sockets (the new master a
        USR2 started, or the one this master upgraded), or 0."""
        if self.successor is not None:
            return self.successor.pid
        if self.hand_over.predecessor_alive():
            return self.hand_over.predecessor
        return 0

    def handle_chld(self) -> None:
        """Nothing: CHLD only wakes the loop, which reaps every time round."""

    def reload_tls(self, config: Config) -> ssl.SSLContext | None:
        """HUP: the certificate, key and CA files read again (raises
        PreforkError: the running workers keep the old ones). Listeners
        were made TLS or not at start; a HUP cannot change that."""
        secured = [lst.name for lst in self.all_listeners() if lst.tls]
        if not secured:
            if config.certfile is not None:
                self.log.warning("HUP: TLS on a listener needs a restart; serving without it")
            return None
        if config.certfile is None:
            raise ConfigError(f"the TLS listener {secured[0]} needs --certfile")
        check_tls_options(config)
        return context_of(config)

    def reload_settings(self) -> tuple[Config, LoadedHandler, ssl.SSLContext | None]:
        """HUP: the settings read again, the handler imported afresh and the
        TLS files loaded again (raises PreforkError; nothing is changed then)."""
        config = self.config
        if self.reload_config is not None:
            config = self.reload_config()
            for name in RESTART_ONLY:
                if getattr(config, name) != getattr(self.config, name):
                    self.log.warning("HUP: changing %s needs a restart; keeping it", name)
                    config = replace(config, **{name: getattr(self.config, name)})
            for name, table in (
                ("max_conns_per_ip", self.scoreboard.client_tables()),
                ("conn_rate_per_ip", self.scoreboard.conn_rate_table()),
            ):
                if getattr(config, name) and table is None:  # its table is made at start
                    self.log.warning("HUP: turning on %s needs a restart; keeping it off", name)
                    config = replace(config, **{name: getattr(self.config, name)})  # off
        if (config.handler, config.handler_type) == (self.handler.spec, self.handler.handler_type):
            handler = reload_handler(self.handler)
        else:
            handler = load_handler(config.handler, config.handler_type)
        check_listeners(config, handler, self.all_listeners())
        tls = self.reload_tls(config)
        if config.log_file != self.config.log_file or config.log_level != self.config.log_level:
            setup_logging(config.log_level, config.log_file)
        return config, handler, tls

    def reload(self) -> None:
        """HUP: read the command line and the -c file again, re-import the
        handler, start a new generation of workers, TERM the old one (it
        takes what is queued and finishes its connections). The listeners
        never close, so nothing queued is lost. If the settings or the
        handler do not load, the running workers are kept."""
        try:
            config, handler, tls = self.reload_settings()
        except PreforkError as exc:
            self.log.error("HUP: reload failed, keeping the running workers: %s", exc)
            return
        if config.workers != self.config.workers:  # else keep what TTIN/TTOU made
            self.num_workers = config.workers
        if config.umask is not None:
            os.umask(config.umask)
        self.log_changes(self.config, config)
        self.config = config
        self.worker_class = WORKER_CLASSES[config.worker_class]
        self.handler = handler
        self.tls = tls
        self.give_log_file_to_workers()
        old = [pid for pid, w in self.workers.items() if w.generation == self.generation]
        self.generation += 1
        self.manage_workers()
        for pid in old:  # they stop accepting at once and finish what they have
            self.stop_worker(pid)  # (manage_workers retired positions above the count)
        self.log.info(
            "HUP: generation %d started; %d old worker(s) finishing", self.generation, len(old)
        )

    def log_changes(self, old: Config, new: Config) -> None:
        """HUP: one line saying which settings the reload changed."""
        changes = [
            f"{option.name} {show_setting(option.key, getattr(old, option.key))} -> "
            f"{show_setting(option.key, getattr(new, option.key))}"
            for option in OPTIONS
            if getattr(old, option.key) != getattr(new, option.key)
        ]
        self.log.info("HUP: %s", ", ".join(changes) if changes else "nothing changed")

    # -- workers --------------------------------------------------------------

    def current_workers(self) -> list[int]:
        """This generation's workers, not counting those told to stop, oldest first."""
        current = [
            pid
            for pid, w in self.workers.items()
            if w.generation == self.generation and not w.stopping
        ]
        return sorted(current, key=lambda pid: self.workers[pid].age)

    def manage_workers(self) -> None:
        """Fork until the current generation has ``num_workers``; TERM extras
        (the oldest; with --reuse-port, see manage_positions)."""
        if self.winched:  # workers of a new master serve: ours only leave
            for pid in self.current_workers():
                self.stop_worker(pid)
            return
        if self.positions is not None:
            self.manage_positions(self.positions)
            return
        current = self.current_workers()
        for pid in current[: max(0, len(current) - self.num_workers)]:
            self.stop_worker(pid)
        if self.backoff.may_respawn(time.monotonic()):
            self.spawn_workers(self.num_workers - len(current))
            self.count_respawns(self.num_workers - len(current))

    def manage_positions(self, positions: Positions) -> None:
        """--reuse-port: positions 0..N-1 each have exactly one current
        worker, since each has its own socket and queue. Positions from N up
        are retired: filtered first, then their workers TERMed (each takes
        the queue as it stops); ``positions.settle`` closes them later."""
        positions.retire_from(self.num_workers, {p: w.position for p, w in self.workers.items()})
        current = self.current_workers()
        for pid in current:
            if self.workers[pid].position >= self.num_workers:
                self.stop_worker(pid)
        if self.backoff.may_respawn(time.monotonic()):
            served = {self.workers[pid].position for pid in current}
            missing = sorted(set(range(self.num_workers)) - served)
            for position in missing:
                self.spawn_worker(position)
            self.count_respawns(len(missing))
        positions.settle(self.workers, self.backoff.respawn_at, self.fork_to_drain)

    def count_respawns(self, forked: int) -> None:
        """Of ``forked`` workers just forked for the current generation, those
        that replace one gone untold are respawns; a start, a HUP or a TTIN
        fork none. Vacancies not filled now went with a TTOU."""
        self.events.respawns += min(max(forked, 0), self.vacancies)
        self.vacancies = 0

    def fork_to_drain(self, position: int, listeners: list[Listener]) -> int:
        """--reuse-port: a worker on a retired position's sockets alone, told
        to stop at once: it takes their queue, serves it and exits."""
        pid = self.spawn_worker(position, listeners)
        self.stop_worker(pid)
        return pid

    def listeners_for(self, position: int) -> list[Listener]:
        """What the worker in ``position`` accepts on."""
        if self.positions is None:
            return self.listeners
        return self.listeners + self.positions.listeners(position, self.config.proxy_protocol)

    def all_listeners(self) -> list[Listener]:
        return self.listeners + (self.positions.sockets() if self.positions else [])

    def close_all_listeners(self, unlink: bool = True) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        close_listeners(self.listeners, unlink=unlink)
        if self.positions is not None:
            self.positions.close()

    def spawn_workers(self, count: int) -> None:
        for _ in range(count):
            self.spawn_worker()

    def spawn_worker(self, position: int = -1, listeners: list[Listener] | None = None) -> int:
        """Fork a worker (in ``position``, with --reuse-port; on nothing but
        ``listeners`` if given: a retired position's sockets)."""
        self.worker_age += 1
        slot = min(set(range(self.scoreboard.slots)) - {w.slot for w in self.workers.values()})
        self.scoreboard.clear(slot)
        worker = self.worker_class(
            self.worker_age,
            self.pid,
            self.listeners_for(position) if listeners is None else listeners,
            self.config,
            self.handler,
            self.scoreboard,
            slot,
            tls=self.tls,
        )
        # Signals stay blocked across fork so that the child cannot run the
        # master's handlers before it has installed its own.
        signal.pthread_sigmask(signal.SIG_BLOCK, self.signal_handlers.keys())
        pid = -1
        try:
            pid = os.fork()
        finally:
            if pid != 0:  # the master, whether fork worked or not
                signal.pthread_sigmask(signal.SIG_UNBLOCK, self.signal_handlers.keys())
        if pid:
            self.workers[pid] = WorkerRecord(
                self.worker_age, self.generation, slot, position, time.monotonic()
            )
            where = f" in position {position}" if position >= 0 else ""
            self.log.debug("spawned worker %d (pid %d)%s", self.worker_age, pid, where)
            return pid
        # The child: never return into the master's code.
        code = EXIT_OK
        try:
            os.close(self.wakeup_r)
            os.close(self.wakeup_w)
            if self.metrics is not None:  # the master's, not ours
                self.metrics.close()
            if self.positions is not None:  # other positions' sockets must
                theirs = self.positions.sockets()  # not outlive the master's copy in us
                close_listeners([lst for lst in theirs if lst not in worker.listeners])
            try:
                worker.init_process()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else EXIT_OK
        except BaseException:
            self.log.exception("worker %d failed", self.worker_age)
            code = 1 if worker.booted else WORKER_BOOT_ERROR
        finally:
            os._exit(code)

    def stop_worker(self, pid: int) -> None:
        """TERM: stop accepting, finish the connections in hand, exit."""
        record = self.workers[pid]
        if record.stopping:
            return
        record.stopping = True
        record.stop_deadline = time.monotonic() + self.config.graceful_timeout
        self.kill_worker(pid, signal.SIGTERM)

    def kill_worker(self, pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def kill_workers(self, sig: int) -> None:
        for pid in list(self.workers):
            self.kill_worker(pid, sig)

    def reap_workers(self) -> None:
        """Collect every exited child and log what it served; a child we did
        not fork is reaped too (the master may be PID 1 in a container)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.successor is not None and pid == self.successor.pid:
                self.successor_exited(status)
                continue
            record = self.workers.pop(pid, None)
            if record is None:
                continue
            self.scoreboard.clear_clients(record.slot)  # its connections died with it
            age = record.age
            stats = self.scoreboard.read(record.slot)
            add_totals(self.exited_totals, stats)
            if record.generation == self.generation and not record.stopping:
                self.vacancies += 1  # left untold: its replacement is a respawn
            served = (
                f"{plural(stats.accepted, 'connection')}, {stats.bytes_in} bytes in, "
                f"{stats.bytes_out} bytes out"
            )
            if os.WIFSIGNALED(status):
                sig = signal.Signals(os.WTERMSIG(status))
                self.log.warning("worker %d (pid %d) killed by %s: %s", age, pid, sig.name, served)
            else:
                code = os.waitstatus_to_exitcode(status)
                if code == WORKER_BOOT_ERROR:
                    raise WorkerBootError(f"worker {age} (pid {pid}) failed to boot")
                if code != EXIT_OK:
                    self.log.warning(
                        "worker %d (pid %d) exited with code %d: %s", age, pid, code, served
                    )
                else:
                    self.log.info("worker %d (pid %d) exited: %s", age, pid, served)
            self.backoff.note_exit(status, time.monotonic() - record.started)

    # -- the watchdog ---------------------------------------------------------

    def murder_workers(self) -> None:
        """KILL workers told to stop (reload, TTOU) that are still there
        after --graceful-timeout; dump and kill every worker silent for
        longer than --timeout (``watchdog.py`` says which)."""
        now = time.monotonic()
        for pid in find_overstayed(self.workers, now):
            self.log.warning(
                "worker %d (pid %d) still finishing after --graceful-timeout %gs: killing it",
                self.workers[pid].age,
                pid,
                self.config.graceful_timeout,
            )
            self.kill_worker(pid, signal.SIGKILL)
            self.workers[pid].killed = True
            self.events.watchdog_kills["graceful_timeout"] += 1
        for silent in find_silent(self.workers, self.scoreboard, self.config.timeout, now):
            self.log.error(
                "worker %d (pid %d) silent for %.1fs with %d active connection(s): "
                "dumping its stack, then killing it",
                silent.record.age,
                silent.pid,
                silent.seconds,
                silent.active,
            )
            self.kill_worker(silent.pid, DUMP_SIGNAL)
            time.sleep(DUMP_GRACE)  # faulthandler writes from the signal handler
            self.kill_worker(silent.pid, signal.SIGKILL)
            silent.record.killed = True
            self.events.watchdog_kills["silent"] += 1

    # -- stopping -------------------------------------------------------------

    def stop(self, graceful: bool) -> int:
        """Close listeners, signal workers, wait, KILL stragglers; return 0."""
        self.notifier.notify(f"STOPPING=1\nSTATUS={'graceful' if graceful else 'fast'} stop")
        sharer = self.sharing_master()
        if sharer:  # its workers go on serving the queues: leave the sockets as they are
            self.log.info("the sockets stay with master %d", sharer)
        elif graceful:  # no new connections, but the queued ones get served
            for listener in self.all_listeners():
                listener.drop_new_connections()
        self.close_all_listeners(unlink=not sharer)
        if graceful:
            self.stop_mode = "graceful"
            self.stop_deadline = time.monotonic() + self.config.graceful_timeout
            self.log.info("TERM: graceful stop (up to %gs)", self.config.graceful_timeout)
            self.kill_workers(signal.SIGTERM)
        else:
            self.stop_mode = "fast"
            self.stop_deadline = time.monotonic() + FAST_STOP_TIMEOUT
            self.log.info("fast stop")
            self.kill_workers(signal.SIGQUIT)
        while self.workers:
            try:
                self.reap_workers()
            except WorkerBootError:
                pass
            if not self.workers:
                break
            left = self.stop_deadline - time.monotonic()
            if left <= 0:
                self.log.warning("killing %d worker(s) still running", len(self.workers))
                self.kill_workers(signal.SIGKILL)
                self.stop_deadline = time.monotonic() + FAST_STOP_TIMEOUT
                continue
            if self.stop_mode == "fast":
                self.sleep(min(left, QUIT_REPEAT))
                self.kill_workers(signal.SIGQUIT)
            else:
                self.sleep(min(left, LOOP_INTERVAL))
            self.dispatch_signals()  # INT, QUIT: a graceful stop turns fast
        self.log.info("master exiting")
        return EXIT_OK
