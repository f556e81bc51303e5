"""The event worker: one epoll loop serving many connections at once.

The whole loop (accept, read, write back, buffer what the kernel did not
take, publish the heartbeat and counters) runs inside ``fastio.EventLoop``
without the GIL; this class only starts it, wakes up every tick (a second,
or a quarter of --timeout) or at a signal to check on the master and report
trouble, and stops it gracefully. Between two runs of the loop it runs the
asyncio callbacks and timers that user protocols scheduled: to their code
the loop is an asyncio loop (``EventWorkerLoop``, workers/event_asyncio.py).
"""

from __future__ import annotations

import select
import time
from typing import Any

from prefork import fastio
from prefork._fastio_common import LOOP_COUNTERS
from prefork.server.handlers import CHARGEN_PATTERN, STREAM_SERVICES, StreamHandlerProtocol
from prefork.server.tls_protocol import mixed_factory, native_tls, tls_factory
from prefork.server.workers.base import Worker
from prefork.server.workers.event_asyncio import EventWorkerLoop
from prefork.settings import udp_rate_of

# At most this long before the master's KILL, a graceful stop cancels the
# tasks still running, so that their cancellation runs (as -k asyncio does).
CANCEL_LEAD = 1.0


class EventWorker(Worker):
    loop: fastio.EventLoop | None = None

    def run(self) -> None:
        config = self.config
        streams = [lst.sock for lst in self.listeners if not lst.datagram]
        proxied = [lst.sock for lst in self.listeners if lst.proxy and not lst.datagram]
        datagrams = [lst.sock for lst in self.listeners if lst.datagram]
        self.booted = False  # a loop that cannot be built is a boot failure (exit 3)
        secured = [lst.sock for lst in self.listeners if lst.tls]
        native = bool(secured) and native_tls(self.handler.builtin, self.tls)
        tls: dict[str, Any] = {}
        if native:  # the built-in services over TLS in the loop: OpenSSL on the socket
            tls = {
                "tls_context": self.tls,
                "tls_listeners": secured,
                "tls_handshake_timeout": config.tls_handshake_timeout,
            }
        if secured and not native:  # protocols (and --sni): Python protocols (tls_protocol.py)
            service, factory = "protocol", self.tls_protocol_factory()
        else:
            service, factory = self.handler.builtin or "protocol", self.protocol_factory()
        self.loop = fastio.EventLoop(
            streams,
            service,
            datagram_sockets=datagrams,
            protocol_factory=factory,
            wakeup_fd=self.wakeup_r,
            max_connections=config.max_connections,
            max_buffer=config.max_buffer,
            idle_timeout=config.idle_timeout,
            pattern=CHARGEN_PATTERN,
            max_accepts=self.max_requests,
            stats=self.scoreboard.slot_view(self.slot),
            proxy_listeners=proxied,
            proxy_trusted=self.proxy_trusted,
            access_log=self.access_log.fd if self.access_log is not None else -1,
            # The loop refuses datagrams from its own sockets' ports: every UDP
            # service this server runs is among them.
            udp_allow_low_ports=config.udp_allow_low_ports,
            udp_rate=udp_rate_of(config) if datagrams else 0.0,
            udp_burst=config.udp_burst,
            udp_rate_prefix=config.udp_rate_prefix,
            udp_rate_table=self.scoreboard.rate_table() if datagrams else None,
            **{f"conn_{name}": value for name, value in self.client_limit_args().items()},
            **tls,
        )
        self.booted = True
        if self.stopping:  # TERM arrived while booting
            self.loop.drain()
        # The methods it lacks raise NotImplementedError (set at import): not abstract.
        aio = EventWorkerLoop(self.wakeup_w)  # type: ignore[abstract]
        aio.attach(self.loop)
        reported_errors = 0
        next_look = 0.0  # the once-a-tick look at the master and the counters
        cancel_at: float | None = None  # a graceful stop: when to cancel the tasks left
        try:
            while self.loop.accepting or self.loop.active or aio.busy():
                if self.loop.accepting or self.loop.active:
                    self.loop.run(aio.timeout(self.tick))
                else:  # only tasks and timers are left (a graceful stop): wait for them
                    waits = [self.wakeup_r, aio.watched_fd()]  # and the sockets they wait on
                    if self.wakeup_r in select.select(waits, [], [], aio.timeout(self.tick))[0]:
                        self.drain_wakeup()
                aio.run_once()
                now = time.monotonic()
                serving = self.loop.accepting or self.loop.active
                if now < next_look and self.alive and not self.stopping and serving:
                    continue  # returned for callbacks: nothing else to look at
                next_look = now + self.tick
                if self.stopping:  # TERM: the loop's next turn takes the queue
                    self.loop.drain()  # (a no-op once drained)
                    if cancel_at is None:
                        graceful = self.config.graceful_timeout
                        cancel_at = now + graceful - min(CANCEL_LEAD, graceful / 10)
                    elif now >= cancel_at and aio.cancel_tasks():
                        self.log.warning("graceful stop: tasks still running cancelled")
                        cancel_at = float("inf")
                self.collect_stats()
                if not self.alive and not self.loop.accepting and not self.loop.recycled:
                    self.stop_accepting()  # drained: let go
                if self.alive and self.loop.recycled:  # max_accepts reached
                    self.recycle()
                if not self.parent_alive():
                    self.log.warning("master is gone; worker exiting")
                    return
                if self.loop.resource_errors != reported_errors:  # at most once a tick
                    self.log.error(
                        "accept: out of file descriptors (%d times); pausing accepts",
                        self.loop.resource_errors - reported_errors,
                    )
                    reported_errors = self.loop.resource_errors
                self.report_access_log_drops(self.loop.access_log_dropped)
                self.report_udp_refusals(self.loop.udp_refused_from)
                self.report_limit_refusals(self.loop.limit_refused_from)
        finally:
            aio.detach()
            self.loop.close()
            self.collect_stats()

    def protocol_factory(self) -> Any:
        """What makes each connection's protocol: the handler's own, or, for
        an ``async def handle(reader, writer)``, asyncio's streams around it."""
        stream = self.handler.stream
        if stream is not None:
            return lambda: StreamHandlerProtocol(stream, self.stream_failed)
        return self.handler.protocol_factory

    def tls_protocol_factory(self) -> Any:
        """TLS around the handler's protocol (a built-in service as a Python
        protocol), and on a worker that also has plain listeners, the plain
        protocol for theirs."""
        assert self.tls is not None
        builtin = self.handler.builtin
        app = STREAM_SERVICES[builtin] if builtin is not None else self.protocol_factory()
        secure = tls_factory(app, self.tls, self.config.tls_handshake_timeout)
        streams = [lst for lst in self.listeners if not lst.datagram]
        if all(lst.tls for lst in streams):
            return secure
        return mixed_factory(streams, app, secure)

    def collect_stats(self) -> None:
        """Copy the loop's counters out and publish them (once a tick)."""
        assert self.loop is not None
        for name in LOOP_COUNTERS:  # the loops keep the slot's counters under its names
            setattr(self, name, getattr(self.loop, name))
        self.handler_errors += self.stream_errors  # raised in tasks, out of the loop's sight
        self.publish()

    def recycle_listeners(self) -> None:
        """Keep them: the loop stopped accepting by itself (max_accepts), and
        the listeners stay open, undrained, until the worker ends. With
        --reuse-port this worker's position queues for its replacement
        meanwhile; if a stop comes first (TTOU retiring the position), the
        drain takes that queue at once, rather than the master forking a
        worker to take it after this one has gone."""
