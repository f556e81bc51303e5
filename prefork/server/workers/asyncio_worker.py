"""The asyncio worker (``-k asyncio``): a standard asyncio or uvloop loop per worker.

For code that needs the whole of asyncio (subprocesses, ``getaddrinfo``,
database drivers and HTTP clients that assume a standard loop), while the
master keeps the process model. The loop is the stock one (``--loop``);
prefork only wraps each connection, to count its bytes and to apply the
master's rules, and keeps these guarantees:

- **Accepting**: the worker accepts on the listeners it inherited itself (a
  reader on each, ``ACCEPT_BATCH`` per wake-up) and hands every socket to
  ``loop.connect_accepted_socket``, so it can stop reading a listener at
  ``--max-connections`` (the connection waits in the backlog for another
  worker), at ``--max-requests`` (recycling: the listeners stay open) and on
  TERM. On TERM it first takes what is queued (a listener's last close would
  reset it), as room allows, then closes the listeners.
- **Graceful stop**: TERM waits for open connections and running tasks
  until ``--graceful-timeout`` minus ``cancel_lead`` (so that the
  cancellation runs before the master's KILL), then aborts the connections
  and cancels the tasks, and waits a moment for them to finish.
- **Heartbeat**: a loop timer (``_tick``) beats into the scoreboard every
  tick and publishes the counters; a loop blocked by user code stops beating,
  and the master's watchdog dumps its stacks and kills it. A drain beats on.
- **Per connection** (``Connection``): bytes in and out, ``--idle-timeout``
  (a sweep on the tick), ``--max-buffer`` as the transport's high-water mark
  (reading from the client pauses while its output is backed up, and the
  protocol gets ``pause_writing``), the PROXY protocol header read before
  the protocol exists, and a handler's exception logged, counted and closing
  that connection only.

Signals keep the base class's meanings (``workers/base.py``): the handlers
only record, then wake the loop with ``call_soon_threadsafe``; QUIT and INT
leave at once.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import random
import socket
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

from prefork import fastio, proxy
from prefork._fastio_common import (
    ACCEPT_BATCH,
    CHARGEN_DATAGRAM_MAX,
    DRAIN_MAX,
    EMFILE_PAUSE,
    SWEEP_INTERVAL,
    check_rate_args,
    datagram_loop_ports,
    datagram_refusal,
    daytime_line,
    format_client,
    rate_key,
    table_lock_fd,
)
from prefork.server.handlers import (
    CHARGEN_PATTERN,
    STREAM_SERVICES,
    Discard,
    StreamHandlerProtocol,
)
from prefork.server.listeners import Listener
from prefork.server.log import plural
from prefork.server.workers.base import Worker
from prefork.settings import udp_rate_of

if TYPE_CHECKING:  # the spec's class: the compiled one has the same interface
    from prefork._fastio_py import ConnectionCore as _ConnectionCore
else:
    _ConnectionCore = fastio.ConnectionCore

_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
CANCEL_LEAD = 1.0  # at most this long before the master's KILL, cancel what is left
HEADER_READ = 65536  # bytes read at a time while a PROXY header is incomplete


def new_event_loop(name: str) -> tuple[asyncio.AbstractEventLoop, str]:
    """A fresh loop for ``--loop`` (auto: uvloop when it imports) and its
    name for the log. The settings checked that ``uvloop`` imports."""
    if name in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if name == "uvloop":
                raise
        else:
            version = getattr(uvloop, "__version__", "")
            return uvloop.new_event_loop(), f"uvloop {version}".strip()
    return asyncio.new_event_loop(), "asyncio"


# -- the built-in services over UDP (over TCP: handlers.STREAM_SERVICES) -------------


class DatagramService(asyncio.DatagramProtocol):
    """The built-ins over UDP: one reply datagram per datagram, to its sender."""

    transport: asyncio.DatagramTransport

    def __init__(self, service: str) -> None:
        self.service = service

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.service == "echo":
            reply = data
        elif self.service == "daytime":
            reply = daytime_line()
        elif self.service == "chargen":
            reply = CHARGEN_PATTERN[: random.randrange(CHARGEN_DATAGRAM_MAX + 1)]
        else:
            return  # discard
        self.transport.sendto(reply, addr)


# -- what wraps every connection --------------------------------------------------------


def _nbytes(data: Any) -> int:
    return len(data) if isinstance(data, bytes) else memoryview(data).nbytes


class Connection(_ConnectionCore):
    """What the loop sees for one connection (as ``StreamConnection`` or
    ``BufferedConnection``); the user's protocol (``inner``) sees
    ``ConnectionTransport``. Counts, times and guards each callback: per
    message in ``ConnectionCore`` (compiled; its fields ``inner``,
    ``transport``, ``nin``, ``nout``, ``active``, ``last_active``, ``closing`` and ``error`` are
    this class's too), the rest here."""

    __slots__ = (
        "worker",
        "client",
        "first",
        "app_transport",
        "user_paused",
        "backed_up",
        "held",
        "started",
        "end",
        "peer_eof",
    )

    def __init__(self, worker: AsyncioWorker, inner: Any, client: Any, first: bytes) -> None:
        super().__init__(worker.counts, inner)
        self.worker = worker
        self.client = client  # the PROXY header's source address, if any
        self.first = first  # bytes read with the PROXY header, for the protocol
        # self.transport: the loop's (uvloop's are not asyncio.Transport)
        self.app_transport: ConnectionTransport | None = None
        self.user_paused = False  # the protocol paused reading
        self.backed_up = False  # the client does not read: so we do not either
        self.held: Any = None  # its client's key in the per-client count, to release
        # For the access log: when it was accepted, its bytes (nin, nout), and
        # why it ended when the server decided (else connection_lost works it out).
        self.started = time.monotonic()
        self.end: str | None = None
        self.peer_eof = False

    def peer(self) -> Any:
        if self.client is not None:
            return self.client
        return None if self.transport is None else self.transport.get_extra_info("peername")

    def fail(self, exc: BaseException) -> None:
        """A handler raised: log it, count it, close this connection only."""
        if self.error is None:
            self.error = exc
            self.end = "handler-error"
            self.worker.handler_errors += 1
            self.worker.log.error(
                "handler failed; connection from %s closed", self.peer(), exc_info=exc
            )
        self.abort()

    def abort(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=self.worker.config.max_buffer)
        self.app_transport = ConnectionTransport(self)
        try:
            self.inner.connection_made(self.app_transport)
        except Exception as exc:
            self.fail(exc)
            return
        if self.first and not transport.is_closing():
            first, self.first = self.first, b""
            self.received(first)

    received = _ConnectionCore.stream_received

    def eof_received(self) -> bool | None:
        self.peer_eof = True
        try:
            keep_open = bool(self.inner.eof_received())
        except Exception as exc:
            self.fail(exc)
            return None
        # The loop closes the transport unless the protocol keeps it open;
        # over TLS it closes it whatever the protocol says.
        if not keep_open or self.transport.get_extra_info("ssl_object") is not None:
            self.closing = True
        return keep_open

    def pause_writing(self) -> None:
        self.set_backed_up(True, "pause_writing")

    def resume_writing(self) -> None:
        self.set_backed_up(False, "resume_writing")

    def set_backed_up(self, backed_up: bool, method: str) -> None:
        """Follow the transport's flow control, then pass it on to the inner
        protocol if it has ``method``."""
        self.backed_up = backed_up
        self.apply_reading()
        callback = getattr(self.inner, method, None)
        if callback is not None:
            try:
                callback()
            except Exception as exc:
                self.fail(exc)

    def apply_reading(self) -> None:
        """Read unless the protocol paused reading or the client's output is
        backed up past --max-buffer."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        want = not (self.user_paused or self.backed_up)
        if want != transport.is_reading():
            if want:
                transport.resume_reading()
            else:
                transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self.worker.access_log is not None:
            end = self.end
            if end is None:
                closed = "eof" if self.peer_eof else "closed"
                end = "reset" if isinstance(exc, OSError) else closed
            self.worker.log_access(self.peer(), self.started, self.nin, self.nout, end)
        self.worker.connection_ended(self)
        try:
            self.inner.connection_lost(exc if exc is not None else self.error)
        except Exception:
            self.worker.log.exception("handler failed in connection_lost")


class StreamConnection(Connection, asyncio.Protocol):
    """``Connection`` for an ``asyncio.Protocol``."""

    __slots__ = ()

    data_received = _ConnectionCore.stream_received


class BufferedConnection(Connection, asyncio.BufferedProtocol):
    """``Connection`` for an ``asyncio.BufferedProtocol``: the loop reads
    straight into the protocol's buffer. Not an ``asyncio.Protocol`` too:
    uvloop would then call ``data_received``."""

    __slots__ = ()

    def get_buffer(self, sizehint: int) -> Any:
        try:
            return self.inner.get_buffer(sizehint)
        except Exception as exc:
            self.fail(exc)
            return bytearray(1)  # read into nothing: the connection is closing

    buffer_updated = _ConnectionCore.buffered_update

    def received(self, data: bytes) -> None:
        """Bytes read with the PROXY header, copied into the protocol's buffer."""
        view = memoryview(data)
        while view and self.error is None:
            buffer = memoryview(self.get_buffer(len(view))).cast("B")
            n = min(len(buffer), len(view))
            buffer[:n] = view[:n]
            self.buffer_updated(n)
            view = view[n:]


class ConnectionTransport(asyncio.Transport):
    """The transport a user's protocol gets: asyncio's, counted. Everything
    is the loop's transport's, but for ``peername`` behind the PROXY protocol
    (the client's; the balancer's is ``proxy_peername``) and reading, which
    stays paused while the client's output is backed up."""

    __slots__ = ("_conn", "_transport", "_worker")

    def __init__(self, conn: Connection) -> None:
        super().__init__()
        assert conn.transport is not None
        self._conn = conn
        self._transport: Any = conn.transport
        self._worker = conn.worker

    write = fastio.counted_write  # type: ignore[assignment]  # counted, compiled: no frame

    def writelines(self, list_of_data: Any) -> None:
        chunks = list(list_of_data)
        for chunk in chunks:
            self.write(chunk)

    def write_eof(self) -> None:
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return bool(self._transport.can_write_eof())

    def close(self) -> None:
        self._conn.closing = True
        self._transport.close()

    def abort(self) -> None:
        self._conn.closing = True
        self._transport.abort()

    def is_closing(self) -> bool:
        return bool(self._transport.is_closing())

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        client = self._conn.client
        if client is not None:
            if name == "peername":
                return client
            if name == "proxy_peername":
                return self._transport.get_extra_info("peername", default)
        if name == "selected_alpn_protocol":  # asyncio's and uvloop's TLS transports lack it
            ssl_object = self._transport.get_extra_info("ssl_object")
            return default if ssl_object is None else ssl_object.selected_alpn_protocol()
        return self._transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._conn.user_paused = True
        self._conn.apply_reading()

    def resume_reading(self) -> None:
        self._conn.user_paused = False
        self._conn.apply_reading()

    def is_reading(self) -> bool:
        return not self._conn.user_paused and not bool(self._transport.is_closing())

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return int(self._transport.get_write_buffer_size())

    def get_write_buffer_limits(self) -> tuple[int, int]:
        high, low = self._transport.get_write_buffer_limits()
        return int(high), int(low)

    def get_protocol(self) -> asyncio.BaseProtocol:
        inner: asyncio.BaseProtocol = self._conn.inner
        return inner

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        buffered = isinstance(protocol, asyncio.BufferedProtocol)
        if buffered != isinstance(self._conn, BufferedConnection):
            raise NotImplementedError(
                "set_protocol: switching between Protocol and BufferedProtocol "
                "is not supported by -k asyncio"
            )
        self._conn.inner = protocol


class DatagramEndpoint(asyncio.DatagramProtocol):
    """The protocol the loop sees for one datagram socket: counts, and
    contains a handler's exception to the datagram that raised it."""

    def __init__(self, worker: AsyncioWorker, inner: Any, sock: socket.socket) -> None:
        self.worker = worker
        self.inner = inner
        self.sock = sock

    def connection_made(self, transport: Any) -> None:
        self.worker.datagram_transports.append(transport)
        self.inner.connection_made(CountedDatagramTransport(transport, self.worker, self.sock))

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.worker.bytes_in += len(data)
        if self.worker.refuse_datagram(addr):
            return  # no reply: it could feed a loop or reflect
        try:
            self.inner.datagram_received(data, addr)
        except Exception as exc:
            self.worker.handler_errors += 1
            self.worker.log.error("handler failed on a datagram from %s", addr, exc_info=exc)

    def error_received(self, exc: Exception) -> None:
        method = getattr(self.inner, "error_received", None)
        if method is not None:
            method(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        method = getattr(self.inner, "connection_lost", None)
        if method is not None:
            method(exc)


class CountedDatagramTransport(asyncio.DatagramTransport):
    """A datagram transport whose ``sendto`` is counted, and sends an empty
    datagram: UDP has them (a chargen reply may hold 0 characters), but
    the transports of asyncio (Python 3.11) and uvloop drop one silently."""

    __slots__ = ("_transport", "_worker", "_sock")

    def __init__(self, transport: Any, worker: AsyncioWorker, sock: socket.socket) -> None:
        super().__init__()
        self._transport = transport
        self._worker = worker
        self._sock = sock

    def sendto(self, data: Any, addr: Any = None) -> None:
        size = _nbytes(data)
        self._worker.bytes_out += size
        if size or self._transport.is_closing():
            self._transport.sendto(data, addr)
            return
        try:
            self._sock.sendto(b"", addr)
        except OSError:  # full (EAGAIN) or refused: UDP may drop a datagram
            pass

    def close(self) -> None:
        self._transport.close()

    def abort(self) -> None:
        self._transport.abort()

    def is_closing(self) -> bool:
        return bool(self._transport.is_closing())

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)


# -- the worker ---------------------------------------------------------------------------


class AsyncioWorker(Worker):
    loop: asyncio.AbstractEventLoop | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Before the base's __init__, which zeroes bytes_in and bytes_out (kept here).
        self.counts = fastio.StreamCounts()
        super().__init__(*args, **kwargs)
        self.conns: set[Connection] = set()
        self.opening: set[socket.socket] = set()  # accepted, PROXY header not read yet
        self.datagram_transports: list[Any] = []
        self.accepting = True  # taking new connections (false once stopped or recycled)
        self.armed = False  # readers on the stream listeners
        self.draining: list[Listener] = []  # TERM: listeners whose queue is still to take
        self.drained = 0
        self.orphaned = False
        self.term_at = 0.0  # time.monotonic() of the TERM
        self.waker: asyncio.Future[None] | None = None
        self.last_emfile_log = 0.0
        self.stream_listeners = [lst for lst in self.listeners if not lst.datagram]
        # The UDP guard's ports: every UDP service of this server.
        self.udp_loop_ports = datagram_loop_ports(
            [lst.sock.fileno() for lst in self.listeners if lst.datagram], ()
        )
        self.udp_refused_from = {"loop": "", "source": "", "rate": ""}
        self.rate_table: memoryview | None = None  # the UDP rate limit's, set in serve()
        self.rate_lock_fd = -1
        self.rate_interval = self.rate_tolerance = 0
        graceful = self.config.graceful_timeout
        # Cancel this long before the master's KILL, so that cancellation runs.
        self.cancel_lead = min(CANCEL_LEAD, graceful / 10)
        idle = self.config.idle_timeout
        self.sweep_interval = min(SWEEP_INTERVAL, idle / 2) if idle > 0 else SWEEP_INTERVAL
        self.interval = min(self.tick, self.sweep_interval)
        self.next_sweep = 0.0
        self.factory = self.protocol_factory()

    # The scoreboard's byte counts are the ones every connection adds to in
    # its compiled per-message path (``fastio.StreamCounts``).
    @property
    def bytes_in(self) -> int:
        return int(self.counts.bytes_in)

    @bytes_in.setter
    def bytes_in(self, value: int) -> None:
        self.counts.bytes_in = value

    @property
    def bytes_out(self) -> int:
        return int(self.counts.bytes_out)

    @bytes_out.setter
    def bytes_out(self, value: int) -> None:
        self.counts.bytes_out = value

    def protocol_factory(self) -> Callable[[], Any]:
        """What each connection's protocol comes from, by the handler's kind."""
        handler = self.handler
        if handler.builtin is not None:
            return STREAM_SERVICES[handler.builtin]
        if handler.stream is not None:
            stream = handler.stream
            return lambda: StreamHandlerProtocol(stream, self.stream_failed)
        if handler.protocol_factory is not None:
            return handler.protocol_factory
        return Discard  # a DatagramProtocol: check_fit allows no stream listener with it

    def datagram_endpoint(self, make: Callable[[], Any], sock: socket.socket) -> DatagramEndpoint:
        return DatagramEndpoint(self, make(), sock)

    def datagram_factory(self) -> Callable[[], Any]:
        handler = self.handler
        if handler.datagram_factory is not None:
            return handler.datagram_factory
        assert handler.builtin is not None
        builtin = handler.builtin
        return lambda: DatagramService(builtin)

    def refuse_datagram(self, addr: Any) -> bool:
        """The UDP guard (``_fastio_common.datagram_refusal``), for built-ins
        and user DatagramProtocols alike: count and remember a sender whose
        datagram must go unanswered, and say so."""
        reason = datagram_refusal(addr, self.udp_loop_ports, self.config.udp_allow_low_ports)
        if reason is None and self.rate_table is not None and self.handler.builtin != "discard":
            key = rate_key(addr, *self.config.udp_rate_prefix)
            if key is not None:
                admitted, evicted = fastio.rate_admit(
                    self.rate_table,
                    key,
                    time.monotonic_ns(),
                    self.rate_interval,
                    self.rate_tolerance,
                    self.rate_lock_fd,
                )
                self.udp_rate_evictions += evicted
                reason = None if admitted else "rate"
        if reason is None:
            return False
        if reason == "loop":
            self.udp_refused_loop += 1
        elif reason == "source":
            self.udp_refused_source += 1
        else:
            self.udp_refused_rate += 1
        self.udp_refused_from[reason] = format_client(addr)
        return True

    @property
    def active_count(self) -> int:
        return len(self.conns) + len(self.opening)

    # -- running ------------------------------------------------------------------------

    def run(self) -> None:
        self.booted = False  # a loop that cannot be built is a boot failure (exit 3)
        loop, name = new_event_loop(self.config.loop)
        self.loop = loop
        asyncio.set_event_loop(loop)
        self.log.debug("worker %d: %s loop", self.age, name)
        try:
            loop.run_until_complete(self.serve())
        except RuntimeError:
            if self.quitting:  # handle_quit stopped the loop
                return
            raise
        if self.quitting:
            return
        # Left normally: nothing of ours is pending; close what user code left.
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self.on_loop_error)
        loop.add_reader(self.wakeup_r, self.drain_wakeup)
        factory = (
            self.datagram_factory() if len(self.stream_listeners) < len(self.listeners) else None
        )
        if factory is not None:
            shared = self.scoreboard.rate_table()
            self.rate_table, self.rate_interval, self.rate_tolerance, _, _ = check_rate_args(
                udp_rate_of(self.config),
                self.config.udp_burst,
                self.config.udp_rate_prefix,
                shared,
            )
            self.rate_lock_fd = table_lock_fd(shared)
            make = factory
            for listener in self.listeners:
                if listener.datagram:
                    await loop.create_datagram_endpoint(
                        functools.partial(self.datagram_endpoint, make, listener.sock),
                        sock=listener.sock,
                    )
        await self.warm_up()
        self.booted = True
        self.arm()
        self.tick_once()
        try:
            await self.supervise()
        finally:
            loop.remove_reader(self.wakeup_r)
            self.disarm()

    async def warm_up(self) -> None:
        """Have the loop open what it opens for its first connection (uvloop:
        a spare descriptor on /dev/null), so that the worker holds as many
        descriptors before it serves as after."""
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        with theirs:
            ours.setblocking(False)
            transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
            transport.abort()
        await asyncio.sleep(0)  # the abort's connection_lost

    async def supervise(self) -> None:
        """Until it is time to go: act on TERM, recycling, the deadline."""
        while True:
            if self.orphaned:
                return
            if self.stopping and not self.term_at:
                self.term_at = time.monotonic()
                self.begin_drain()
            deadline = self.term_at + self.config.graceful_timeout - self.cancel_lead
            if not self.accepting and not self.draining:
                if self.term_at and time.monotonic() >= deadline:
                    await self.cancel_everything()
                    return
                if not self.active_count:
                    tasks = self.other_tasks()
                    if not tasks:
                        return
                    wait = self.interval
                    if self.term_at:
                        wait = max(0.0, min(wait, deadline - time.monotonic()))
                    await asyncio.wait(tasks, timeout=wait)
                    continue
            wait = self.interval
            if self.term_at:
                wait = max(0.0, min(wait, deadline - time.monotonic()))
            await self.sleep_until_woken(wait)

    async def sleep_until_woken(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        waker: asyncio.Future[None] = loop.create_future()
        self.waker = waker
        timer = loop.call_later(timeout, self.wake)
        try:
            await waker
        finally:
            timer.cancel()
            self.waker = None

    def wake(self) -> None:
        """Have ``supervise`` look again now."""
        waker = self.waker
        if waker is not None and not waker.done():
            waker.set_result(None)

    def other_tasks(self) -> set[asyncio.Task[Any]]:
        """Tasks still running besides this worker's own: user code's."""
        current = asyncio.current_task()
        return {task for task in asyncio.all_tasks() if task is not current}

    async def cancel_everything(self) -> None:
        conns = list(self.conns)
        tasks = self.other_tasks()
        self.log.warning(
            "worker %d: --graceful-timeout: aborting %s, cancelling %s",
            self.age,
            plural(len(conns) + len(self.opening), "connection"),
            plural(len(tasks), "task"),
        )
        for sock in list(self.opening):
            sock.close()
        self.opening.clear()
        for conn in conns:
            conn.end = "shutdown"
            conn.abort()
        for task in tasks:
            task.cancel()
        # Let the cancellations and connection_lost calls run, briefly.
        await asyncio.sleep(0)
        if tasks:
            await asyncio.wait(tasks, timeout=max(self.cancel_lead / 2, 0.05))

    def tick_once(self) -> None:
        """The heartbeat: beat, publish, sweep idle connections, check on the
        master; again in ``interval`` seconds. A blocked loop skips it."""
        assert self.loop is not None
        now = time.monotonic()
        self.notify()
        self.publish_counts()
        self.report_udp_refusals(self.udp_refused_from)
        self.report_limit_refusals(self.limit_refused_from)
        if self.config.idle_timeout > 0 and now >= self.next_sweep:
            self.next_sweep = now + self.sweep_interval
            limit = now - self.config.idle_timeout
            idle = []
            for conn in self.conns:
                if conn.active:  # read or wrote since the last sweep: active as of now
                    conn.active = False
                    conn.last_active = now
                elif conn.last_active <= limit:
                    idle.append(conn)
            for conn in idle:
                self.idle_closed += 1
                conn.end = "idle-timeout"
                conn.abort()
        if not self.parent_alive():
            self.log.warning("master is gone; worker exiting")
            self.orphaned = True
            self.wake()
        if self.stopping and not self.term_at:
            self.wake()
        self.loop.call_later(self.interval, self.tick_once)

    def publish_counts(self) -> None:
        self.active = self.active_count
        self.publish()

    def on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """asyncio's exception handler: into our log, one event per line."""
        exc = context.get("exception")
        self.log.error("asyncio: %s", context.get("message", "error"), exc_info=exc)

    # -- signals --------------------------------------------------------------------------

    def handle_term(self, signum: int, frame: FrameType | None) -> None:
        super().handle_term(signum, frame)
        self.poke()

    def handle_quit(self, signum: int, frame: FrameType | None) -> None:
        """Fast stop, by stopping the loop rather than by raising here: a
        SystemExit raised inside a transport's callback is caught by uvloop
        as a fatal error of that transport. A repeat (the master sends QUIT
        every half second) means the loop did not get there, stuck in user
        code: then raise, which interrupts it."""
        loop = self.loop
        if self.quitting or loop is None or loop.is_closed() or not loop.is_running():
            self.quitting = True
            self.alive = False
            sys.exit(0)
        self.quitting = True
        self.alive = False
        loop.call_soon_threadsafe(loop.stop)

    def poke(self) -> None:
        """From a signal handler: wake ``supervise`` through the loop."""
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.wake)

    def recycle_listeners(self) -> None:
        """Keep them open (see EventWorker.recycle_listeners): a TERM still
        takes what queued meanwhile."""

    def stop_accepting(self) -> None:
        """Let go of every listener (after the drain took their queues)."""
        self.disarm()
        super().stop_accepting()

    # -- accepting ------------------------------------------------------------------------

    def arm(self) -> None:
        if self.armed or not self.accepting or self.loop is None:
            return
        if self.active_count >= self.config.max_connections:
            return
        for listener in self.stream_listeners:
            self.loop.add_reader(listener.fileno(), self.accept, listener)
        self.armed = True

    def disarm(self) -> None:
        if self.armed and self.loop is not None:
            for listener in self.stream_listeners:
                if listener.sock.fileno() >= 0:
                    self.loop.remove_reader(listener.sock.fileno())
        self.armed = False

    def accept(self, listener: Listener) -> None:
        for _ in range(ACCEPT_BATCH):
            if not self.accepting:
                return
            if self.active_count >= self.config.max_connections:
                self.disarm()  # the backlog waits for the other workers
                return
            try:
                sock, _ = listener.sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno not in _RESOURCE_ERRORS:
                    raise
                self.out_of_descriptors(exc)
                return
            self.open(sock, listener)
            if self.max_requests and self.accepted >= self.max_requests:
                self.accepting = False
                self.disarm()
                self.recycle()
                self.wake()
                return

    def out_of_descriptors(self, exc: OSError) -> None:
        """EMFILE and kin: the connection stays queued; pause, log once a second."""
        now = time.monotonic()
        if now - self.last_emfile_log >= 1.0:
            self.last_emfile_log = now
            self.log.error("accept: %s; pausing accepts", exc.strerror)
        self.disarm()
        assert self.loop is not None
        self.loop.call_later(EMFILE_PAUSE, self.arm)

    def begin_drain(self) -> None:
        """TERM: no new connections; take what is queued, then let go of the
        listeners. UDP stops at once."""
        self.accepting = False
        self.disarm()
        for transport in self.datagram_transports:
            transport.close()
        self.draining = [lst for lst in self.stream_listeners if lst.sock.fileno() >= 0]
        self.drain()

    def drain(self) -> None:
        """Take queued connections as room allows; close each listener once
        its queue is empty (at most DRAIN_MAX in all)."""
        for listener in list(self.draining):
            while self.active_count < self.config.max_connections and self.drained < DRAIN_MAX:
                try:
                    sock, _ = listener.sock.accept()
                except BlockingIOError:
                    self.draining.remove(listener)
                    break
                except ConnectionAbortedError:
                    continue
                except OSError:  # EMFILE and kin: again when a connection ends
                    return
                self.drained += 1
                self.open(sock, listener)
        if self.drained >= DRAIN_MAX:
            self.draining.clear()
        if not self.draining:
            self.stop_accepting()
            self.wake()

    def open(self, sock: socket.socket, listener: Listener) -> None:
        sock.setblocking(False)
        self.accepted += 1
        assert self.loop is not None
        if listener.proxy:
            self.opening.add(sock)
            self.loop.create_task(self.open_proxied(sock, listener.tls))
        else:
            self.connect(sock, None, b"", listener.tls)
        self.publish_counts()

    def connect(self, sock: socket.socket, client: Any, first: bytes, secure: bool) -> None:
        """Apply the per-client limits, make the protocol and hand the socket
        to the loop (which does the TLS handshake, if ``secure``, before the
        protocol's ``connection_made``)."""
        held = None
        if self.client_limits.enabled:  # by the PROXY header's source, if any
            admitted, held = self.admit_client(client if client is not None else _peer(sock))
            if not admitted:
                self.log_access(client or _peer(sock), time.monotonic(), 0, 0, "limit-refused")
                sock.close()  # before any byte is served
                return
        try:
            inner = self.factory()
        except Exception as exc:
            self.handler_errors += 1
            self.log.error(
                "handler failed; connection from %s closed", client or _peer(sock), exc_info=exc
            )
            sock.close()
            self.client_limits.release(held)
            return
        buffered = isinstance(inner, asyncio.BufferedProtocol)
        conn = (BufferedConnection if buffered else StreamConnection)(self, inner, client, first)
        conn.held = held
        self.conns.add(conn)
        assert self.loop is not None
        self.loop.create_task(self.attach(conn, sock, secure))

    async def attach(
        self, conn: StreamConnection | BufferedConnection, sock: socket.socket, secure: bool
    ) -> None:
        assert self.loop is not None
        tls: dict[str, Any] = {}
        if secure:
            tls = {"ssl": self.tls, "ssl_handshake_timeout": self.config.tls_handshake_timeout}
        try:
            await self.loop.connect_accepted_socket(lambda: conn, sock, **tls)
        except (OSError, asyncio.TimeoutError) as exc:  # gone, or no TLS handshake
            self.log.debug("connection lost before it started: %s", exc or "timed out")
            if conn.transport is None:
                end = "tls-failed" if secure else "reset"
                self.log_access(conn.peer() or _peer(sock), conn.started, 0, 0, end)
            sock.close()
            if conn.transport is None:
                self.connection_ended(conn)

    async def open_proxied(self, sock: socket.socket, secure: bool) -> None:
        """Read a whole PROXY header (nothing reaches the protocol before),
        from a trusted peer only; then start the connection. Before TLS, not
        a byte past the header is read: the rest is OpenSSL's to read."""
        peer = _peer(sock)
        started = False
        accepted_at, end = time.monotonic(), "reset"  # for the access log
        try:
            if not self.proxy_trusted(peer):
                self.proxy_rejected += 1
                end = "proxy-rejected"
                self.log.warning(
                    "PROXY protocol: %s is not in --forwarded-allow-ips; closing", peer
                )
                return
            try:
                header, first = await asyncio.wait_for(
                    self.read_proxy_header(sock, secure), proxy.HEADER_TIMEOUT
                )
            except (proxy.ProxyHeaderError, asyncio.TimeoutError) as exc:
                reason = exc if isinstance(exc, proxy.ProxyHeaderError) else "timed out"
                self.log.warning("PROXY header from %s: %s; closing", peer, reason)
                if isinstance(exc, proxy.ProxyHeaderClosed):  # it left: not refused
                    end = "eof"  # (as the other worker classes count it)
                    return
                self.proxy_rejected += 1
                end = "proxy-rejected"
                return
            except OSError as exc:
                self.log.debug("PROXY header from %s: %s; closing", peer, exc)
                return
            self.opening.discard(sock)
            started = True
            self.connect(sock, header.source, first, secure)
        finally:
            if not started:
                self.log_access(peer, accepted_at, 0, 0, end)
                self.opening.discard(sock)
                sock.close()
                self.connection_ended(None)

    async def read_proxy_header(
        self, sock: socket.socket, exact: bool
    ) -> tuple[proxy.ProxyHeader, bytes]:
        """The header, and what came after it in the same reads (nothing, if
        ``exact``)."""
        assert self.loop is not None
        data = b""
        while True:
            want = proxy.exact_read_size(data) if exact else HEADER_READ
            chunk = await self.loop.sock_recv(sock, want)
            if not chunk:
                raise proxy.ProxyHeaderClosed(
                    "connection closed before the end of its PROXY header"
                )
            data += chunk
            header = proxy.parse(data)
            if header is not None:
                return header, data[header.length :]

    def connection_ended(self, conn: Connection | None) -> None:
        """A connection is gone (None: one that never started): room for
        another, perhaps the drain's next."""
        if conn is not None:
            self.conns.discard(conn)
            self.client_limits.release(conn.held)
            conn.held = None
        self.publish_counts()
        if self.draining:
            self.drain()
        elif self.accepting and not self.armed:
            self.arm()
        if not self.accepting and not self.active_count:
            self.wake()


def _peer(sock: socket.socket) -> Any:
    try:
        return sock.getpeername()
    except OSError:
        return None
