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
import socket
import ssl
import struct
import time
from collections import deque
from types import FrameType
from typing import Any

from prefork import fastio, proxy
from prefork.fastio import peer_of_fd
from prefork.server.handlers import BlockingHandler
from prefork.server.listeners import Listener
from prefork.server.tls_blocking import HandshakeFailed, close_tls, handshake, tls_handler
from prefork.server.workers.base import Worker

BUFFER_SIZE = 64 * 1024  # one buffer per worker, reused by every connection

# Errors that belong to one connection: close it, keep the worker.
CONNECTION_ERRORS = frozenset(
    {errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ETIMEDOUT, errno.EHOSTUNREACH}
)
# Out of descriptors: the connection stays queued; back off instead of spinning.
DESCRIPTOR_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
DRAIN_MAX = 4096  # connections a leaving worker takes from a listener's queue
EMFILE_BACKOFF = 0.1  # seconds


# struct tcp_info (linux/tcp.h): tcpi_state at 0, tcpi_bytes_received at 128,
# tcpi_notsent_bytes at 144, tcpi_bytes_sent and tcpi_bytes_retrans at 200
# (Linux 4.19+).
_TCP_INFO_SIZE = 216
# States reached once the peer's FIN came (CLOSE_WAIT, LAST_ACK, TIME_WAIT,
# CLOSING, CLOSE; tcp_states.h): the kernel counts that FIN as a byte received.
_PEER_FIN_STATES = frozenset({8, 9, 6, 11, 7})


def kernel_byte_counts(conn: int) -> tuple[int, int] | None:
    """Bytes a TCP connection received and its server wrote, as the kernel
    counted them (a user handle(sock, address) reads and writes as it likes,
    so only the kernel knows): received (less the peer's FIN); sent less
    what was sent again, plus what still waits to be sent. None for other
    sockets."""
    sock = socket.socket(fileno=conn)
    try:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return None
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
    except OSError:
        return None
    finally:
        sock.detach()
    if len(info) < _TCP_INFO_SIZE:  # a kernel older than 4.19
        return None
    (received,) = struct.unpack_from("=Q", info, 128)
    if info[0] in _PEER_FIN_STATES:
        received = max(0, received - 1)
    (notsent,) = struct.unpack_from("=I", info, 144)
    sent, retransmitted = struct.unpack_from("=QQ", info, 200)
    return received, sent - retransmitted + notsent


# How late a signal that lands between two calls of a compiled blocking loop
# may run its handler (the wait's timeout; see bound_blocking_waits): well
# inside the second in which a worker exits after its master's death (the
# parent-death QUIT). A few wake-ups a second of an idle client cost nothing.
PENDING_SIGNAL_BOUND = 0.25


def bound_blocking_waits(conn: int, seconds: float) -> None:
    """Give the connection's blocking recv and send a timeout (SO_RCVTIMEO,
    SO_SNDTIMEO): the compiled built-in loops then wake every ``seconds``
    while the client is idle and run the signal handlers a signal left
    pending between two of their calls (see ``prefork._fastio``), so TERM
    closes the listeners within that bound, not when the client next acts."""
    whole = int(seconds)
    value = struct.pack("@ll", whole, int((seconds - whole) * 1_000_000))
    sock = socket.socket(fileno=conn)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
    finally:
        sock.detach()


class ProxyRefused(Exception):
    """The PROXY header was refused (logged and counted): close the connection."""


# How a connection ends, for the access log, when the handler returns: the
# built-ins return at the peer's end of file, but daytime closes first and
# chargen runs until the peer is gone; a protocol ends at the peer's end of
# file, a handle() function when it likes.
NORMAL_ENDS = {"echo": "eof", "discard": "eof", "daytime": "closed", "chargen": "reset"}


def peer_of(conn: int, client: Any) -> Any:
    """Who a connection is from, for logs: the PROXY header's client if any."""
    return client or peer_of_fd(conn)


class SyncWorker(Worker):
    # One thread: the heartbeat follows the connection (see serve). The
    # thread worker's main thread beats for the whole process instead.
    beats_per_connection = True
    # Its one thread serves connections and runs the signal handlers (a
    # thread worker's connection threads do not).
    serves_in_signal_thread = True
    # When EMFILE was last logged: one clock for the worker, not one per
    # thread, so a thread worker logs it once a second however many threads.
    last_emfile_log = 0.0

    # Connections taken from the queues on the way out, served before exit:
    # (fd, the listener it came from). Threads share it.
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tls_handler = tls_handler(self.handler)
        self.held: deque[tuple[int, Listener]] = deque()

    def run(self) -> None:
        if self.alive:  # else TERM arrived while booting: the listeners are closed
            self.accept_loop(self.wakeup_r, drain=True)
        self.serve_held()

    def handle_term(self, signum: int, frame: FrameType | None) -> None:
        """The one handler that acts (see workers/base.py): it takes the
        queue and closes the listeners itself. This worker's only thread may
        be inside a connection (``fastio.echo``, or a handler's blocking
        ``recv``, which PEP 475 resumes after this returns) for as long as
        the client likes. If the listeners stayed open until the loop saw
        the flag, new clients would be neither served nor refused meanwhile:
        on a graceful stop the master's SYN filter drops their SYNs, and they
        retransmit into a socket nobody accepts on. Closing needs the queue
        taken first, or the last close resets it. Both steps are non-blocking
        system calls and a deque append."""
        super().handle_term(signum, frame)
        self.stop_accepting()

    def stop_accepting(self) -> None:
        """Take what is queued on the listeners (it is served before this
        worker exits: a listener's last close would reset it), then close
        them. Runs in the TERM handler, even while a connection is served."""
        for listener in self.listeners:
            for _ in range(DRAIN_MAX):
                try:
                    fd = fastio.accept(listener.sock)
                except (OSError, ValueError):  # EMFILE and kin, or already closed
                    break
                if fd is None:
                    break
                self.held.append((fd, listener))
        super().stop_accepting()

    def serve_held(self) -> None:
        buffer = bytearray(BUFFER_SIZE)
        handler = self.handler.for_blocking_workers()
        while self.held:
            try:
                fd, listener = self.held.popleft()
            except IndexError:  # another thread took the last one
                return
            self.serve(fd, buffer, handler, listener.proxy, listener.tls)

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
            fd = listener.fileno()
            try:
                poller.register(fd, select.POLLIN)
            except ValueError:  # fd -1: TERM closed the listener before we got here
                return
            by_fd[fd] = listener
        while self.alive:
            if not self.parent_alive():
                self.log.warning("master is gone; worker exiting")
                return
            if self.beats_per_connection:
                self.notify()
            events = poller.poll(self.tick * 1000)
            if self.client_limits.enabled:
                with self.stats_lock:
                    self.report_limit_refusals(self.limit_refused_from)
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
                    self.serve(conn, buffer, handler, by_fd[fd].proxy, by_fd[fd].tls)

    def serve_tls(self, conn: int, buffer: bytearray, client: Any) -> tuple[bool, int, int]:
        """The TLS handshake, then the handler on the TLS socket; whether the
        handshake succeeded, and the plaintext bytes in and out."""
        assert self.tls is not None
        if self.beats_per_connection:
            self.waiting_on_peer()  # the handshake waits on the client
        try:
            tls = handshake(self.tls, conn, self.config.tls_handshake_timeout)
        except HandshakeFailed as exc:
            self.log.debug("TLS handshake from %s failed: %s", peer_of(conn, client), exc)
            return False, 0, 0
        try:
            if self.beats_per_connection and self.handler.builtin is None:
                self.notify()  # user code is timed
            nin, nout = self.tls_handler(tls, buffer, client)
            return True, nin, nout
        finally:
            close_tls(tls)

    def count_close(self, counter: str) -> None:
        """One more connection ended for this reason (a scoreboard field)."""
        with self.stats_lock:  # threads of a ThreadWorker share the counters
            setattr(self, counter, getattr(self, counter) + 1)

    def read_proxy_header(self, conn: int) -> proxy.ProxyHeader | None:
        """The PROXY header (its ``source`` None: keep the socket's peer), or
        None if the peer left before it was whole; raises ProxyRefused if
        the peer may not send one or sent a malformed one."""
        sock = socket.socket(fileno=conn)
        try:
            peer = sock.getpeername()
            if not self.proxy_trusted(peer):
                self.log.warning(
                    "PROXY protocol: %s is not in --forwarded-allow-ips; closing", peer
                )
                self.count_close("proxy_rejected")
                raise ProxyRefused
            if self.beats_per_connection:
                self.waiting_on_peer()
            try:
                header = proxy.read_header(sock)
            except (proxy.ProxyHeaderError, TimeoutError) as exc:
                reason = exc if isinstance(exc, proxy.ProxyHeaderError) else "timed out"
                self.log.warning("PROXY header from %s: %s; closing", peer, reason)
                if isinstance(exc, proxy.ProxyHeaderClosed):  # it left: not refused
                    return None
                self.count_close("proxy_rejected")
                raise ProxyRefused from None
            return header
        finally:
            sock.detach()

    def serve(
        self,
        conn: int,
        buffer: bytearray,
        handler: BlockingHandler,
        proxied: bool = False,
        secure: bool = False,
    ) -> None:
        """Run the handler on one connection, then close it, whatever happened.
        On a PROXY listener the header is read first, and must be whole; on
        a TLS listener the handshake comes next (``serve_tls``)."""
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
        client: Any = None
        header_length = 0
        held = None  # its client's key in the per-client count
        handled = False  # the handler ran: what the kernel counted is its
        # For the access log: a QUIT (SystemExit) leaves "shutdown" in place.
        started, end = time.monotonic(), "shutdown"
        peer = peer_of_fd(conn) if self.access_log is not None else None
        try:
            header = self.read_proxy_header(conn) if proxied else None
            if header is not None:
                client, header_length = header.source, header.length
            ready = header is not None or not proxied  # else it left before its header
            admitted = True
            if ready and self.client_limits.enabled:
                admitted, held = self.admit_client(client or peer or peer_of_fd(conn))
            if not admitted:
                end = "limit-refused"  # closed before any byte is served
            elif ready:
                if secure:
                    handled, nin, nout = self.serve_tls(conn, buffer, client)
                else:
                    handled = True
                    if self.serves_in_signal_thread and self.handler.builtin is not None:
                        bound_blocking_waits(conn, min(self.tick, PENDING_SIGNAL_BOUND))
                    nin, nout = handler(conn, buffer, client)
                end = NORMAL_ENDS.get(str(self.handler.builtin), "closed")
                if not handled:
                    end = "tls-failed"
                elif self.handler.protocol_factory is not None:
                    end = "eof"
            else:
                end = "eof"  # left before its PROXY header was whole
        except ProxyRefused:
            end = "proxy-rejected"
        except OSError as exc:
            end = "reset"
            if exc.errno in CONNECTION_ERRORS or isinstance(exc, ssl.SSLError):
                self.log.debug("connection from %s closed: %s", peer_of(conn, client), exc)
            elif self.handler.builtin is None:  # user code: where it failed matters
                self.log.exception(
                    "handler failed; connection from %s closed", peer_of(conn, client)
                )
                self.count_close("handler_errors")
                end = "handler-error"
            else:
                self.log.error("connection from %s: %s", peer_of(conn, client), exc)
        except Exception:
            self.log.exception("handler failed; connection from %s closed", peer_of(conn, client))
            self.count_close("handler_errors")
            end = "handler-error"
        finally:
            if handled and self.handler.handle is not None:  # user code does its own I/O
                counts = kernel_byte_counts(conn)
                if counts is not None:  # the PROXY header is not the handler's
                    nin, nout = max(0, counts[0] - header_length), counts[1]
            # The line goes out before the close: a client that saw its end
            # and connected again finds the lines in the order it saw them
            # (threads of a ThreadWorker would otherwise race to write).
            self.log_access(client or peer, started, nin, nout, end)
            os.close(conn)
            self.client_limits.release(held)
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
