"""The sync worker: one connection at a time, served by the hot loop.

The worker waits in poll() on every listener plus its signal wake-up pipe
(so TERM and a dead master are noticed while idle and several ``-b`` work),
accepts one connection, runs the handler on it until the client is done,
closes it and waits again. Idle workers all wake for a new connection; one
wins the accept and the others see EAGAIN: with a handful of workers that
costs less than it would to arbitrate.
"""

from __future__ import annotations

import errno
import os
import select
import time

from prefork import fastio
from prefork.handlers import Handler
from prefork.workers.base import Worker

BUFFER_SIZE = 64 * 1024  # one buffer per worker, reused by every connection

# Errors that belong to one connection: close it, keep the worker.
CONNECTION_ERRORS = frozenset(
    {errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ETIMEDOUT, errno.EHOSTUNREACH}
)
# Out of descriptors: the connection stays queued; back off instead of spinning.
DESCRIPTOR_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
EMFILE_BACKOFF = 0.1  # seconds


class SyncWorker(Worker):
    # One thread: the heartbeat follows the connection (see serve). The
    # thread worker's main thread beats for the whole process instead.
    beats_per_connection = True
    # When EMFILE was last logged: one clock for the worker, not one per
    # thread, so a thread worker logs it once a second however many threads.
    last_emfile_log = 0.0

    def run(self) -> None:
        self.accept_loop(self.wakeup_r, drain=True)

    def accept_loop(self, wake_fd: int, drain: bool) -> None:
        """Accept and serve one connection at a time until stopped.

        ``wake_fd`` becoming readable means "look at ``self.alive``"; it is
        drained only when ``drain`` is true (the signal pipe), not when it is
        a stop pipe that must wake several threads.
        """
        buffer = bytearray(BUFFER_SIZE)
        handler = self.handler.for_blocking_workers()
        poller = select.poll()
        poller.register(wake_fd, select.POLLIN)
        by_fd = {}
        for listener in self.listeners:
            poller.register(listener.fileno(), select.POLLIN)
            by_fd[listener.fileno()] = listener
        while self.alive:
            if not self.parent_alive():
                self.log.warning("master is gone; worker exiting")
                return
            if self.beats_per_connection:
                self.notify()
            events = poller.poll(self.tick * 1000)
            for fd, _ in events:
                if fd == wake_fd:
                    if drain:
                        self.drain_wakeup()
                    continue
                if not self.alive:
                    return
                try:
                    conn = fastio.accept(by_fd[fd].sock)
                except (OSError, ValueError) as exc:
                    if not self.alive:  # TERM closed the listener under us
                        return
                    if isinstance(exc, OSError) and exc.errno in DESCRIPTOR_ERRORS:
                        now = time.monotonic()
                        if now - self.last_emfile_log >= 1.0:
                            self.last_emfile_log = now
                            self.log.error("accept: %s; backing off", exc.strerror)
                        time.sleep(EMFILE_BACKOFF)
                        continue
                    raise
                if conn is not None:
                    self.serve(conn, buffer, handler)

    def serve(self, conn: int, buffer: bytearray, handler: Handler) -> None:
        """Run the handler on one connection, then close it, whatever happened."""
        nin = nout = 0
        with self.stats_lock:
            self.active += 1
            self.publish()
        if self.beats_per_connection:
            # The built-in loops only wait on the client; user code is timed.
            if self.handler.builtin is not None:
                self.waiting_on_peer()
            else:
                self.notify()
        try:
            nin, nout = handler(conn, buffer)
        except OSError as exc:
            if exc.errno not in CONNECTION_ERRORS:
                self.log.error("connection error: %s", exc)
            else:
                self.log.debug("connection closed by peer: %s", exc)
        except Exception:
            self.log.exception("handler failed; connection closed")
        finally:
            os.close(conn)
            if self.beats_per_connection:
                self.notify()
            with self.stats_lock:  # threads of a ThreadWorker share the counters
                self.accepted += 1
                self.active -= 1
                self.bytes_in += nin
                self.bytes_out += nout
                self.publish()
                if self.max_requests and self.accepted >= self.max_requests:
                    self.recycle()
