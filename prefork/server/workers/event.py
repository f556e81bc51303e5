"""The event worker: one epoll loop serving many connections at once.

The whole loop (accept, read, write back, buffer what the kernel did not
take, publish the heartbeat and counters) runs inside ``fastio.EventLoop``
without the GIL; this class only starts it, wakes up every tick (a second,
or a quarter of --timeout) or at a signal to check on the master and report
trouble, and stops it gracefully.
"""

from __future__ import annotations

from prefork import fastio
from prefork.server.handlers import CHARGEN_PATTERN
from prefork.server.workers.base import Worker


class EventWorker(Worker):
    loop: fastio.EventLoop | None = None

    def run(self) -> None:
        config = self.config
        streams = [lst.sock for lst in self.listeners if not lst.datagram]
        proxied = [lst.sock for lst in self.listeners if lst.proxy and not lst.datagram]
        datagrams = [lst.sock for lst in self.listeners if lst.datagram]
        self.booted = False  # a loop that cannot be built is a boot failure (exit 3)
        self.loop = fastio.EventLoop(
            streams,
            self.handler.builtin or "protocol",
            datagram_sockets=datagrams,
            protocol_factory=self.handler.protocol_factory,
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
        )
        self.booted = True
        if self.stopping:  # TERM arrived while booting
            self.loop.drain()
        reported_errors = 0
        try:
            while self.loop.accepting or self.loop.active:
                self.loop.run(self.tick)
                if self.stopping:  # TERM: the loop's next turn takes the queue
                    self.loop.drain()  # (a no-op once drained)
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
        finally:
            self.loop.close()
            self.collect_stats()

    def collect_stats(self) -> None:
        """Copy the loop's counters out and publish them (once a tick)."""
        assert self.loop is not None
        self.accepted = self.loop.accepted
        self.active = self.loop.active
        self.bytes_in = self.loop.bytes_in
        self.bytes_out = self.loop.bytes_out
        self.idle_closed = self.loop.idle_closed
        self.max_buffer_closed = self.loop.max_buffer_closed
        self.handler_errors = self.loop.handler_errors
        self.proxy_rejected = self.loop.proxy_rejected
        self.udp_refused_loop = self.loop.udp_refused_loop
        self.udp_refused_source = self.loop.udp_refused_source
        self.publish()

    def recycle_listeners(self) -> None:
        """Keep them: the loop stopped accepting by itself (max_accepts), and
        the listeners stay open, undrained, until the worker ends. With
        --reuse-port this worker's position queues for its replacement
        meanwhile; if a stop comes first (TTOU retiring the position), the
        drain takes that queue at once, rather than the master forking a
        worker to take it after this one has gone."""
