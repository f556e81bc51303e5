"""The event worker's loop, as asyncio sees it from the user's code.

While the event worker runs, ``asyncio.get_running_loop()`` (and so every
asyncio primitive: ``asyncio.sleep``, ``wait_for``, ``Queue``, ``Event``,
``Lock``, ``gather``, tasks) returns an ``EventWorkerLoop``: the asyncio
face of ``fastio.EventLoop``, which keeps doing the I/O (accept, read, write,
backpressure) without the GIL.

How it works: callbacks (``call_soon``) wait in a ready queue and timers
(``call_later``, ``call_at``) in a heap, as in asyncio's own loop. The worker
alternates ``fastio.EventLoop.run(timeout)`` with ``run_once``, which runs
the timers that are due and the callbacks that are ready. The timeout is 0
while callbacks wait and otherwise reaches no further than the next timer,
so the I/O loop's ``epoll_wait`` honours the timers. A callback or timer
scheduled from inside the I/O loop (in ``data_received``, say) asks it to
return at the end of its current batch (``EventLoop.return_soon``) rather
than wait for the tick; from another thread, ``call_soon_threadsafe`` also
writes to the worker's wake-up pipe.

Descriptors user code waits on (``add_reader``, ``add_writer``, the
``sock_*`` coroutines, and the connections it opens with
``create_connection`` or ``asyncio.open_connection``: workers/event_transport.py)
live in a selector of this loop's own, whose epoll descriptor the I/O loop
watches (``EventLoop.watch``): the I/O loop returns when one is ready, and
``run_once`` runs their callbacks with the others.

What user code cannot use here raises NotImplementedError naming the method
(``-k asyncio`` runs a complete asyncio loop instead).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import errno
import functools
import logging
import os
import selectors
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from prefork import fastio
from prefork._fastio_common import fileno_of
from prefork.server.workers.event_transport import SocketTransport, set_done

# Methods the asyncio API has and this loop does not implement: each raises
# NotImplementedError naming itself (asyncio's abstract ones name nothing).
UNSUPPORTED = (
    "run_forever",
    "run_until_complete",
    "stop",
    "shutdown_asyncgens",
    "shutdown_default_executor",
    "create_server",
    "sendfile",
    "start_tls",
    "create_unix_connection",
    "create_unix_server",
    "connect_accepted_socket",
    "create_datagram_endpoint",
    "connect_read_pipe",
    "connect_write_pipe",
    "subprocess_shell",
    "subprocess_exec",
    "sock_recvfrom",
    "sock_recvfrom_into",
    "sock_sendto",
    "sock_sendfile",
    "add_signal_handler",
    "remove_signal_handler",
)


def _unsupported(name: str) -> Callable[..., Any]:
    def method(self: EventWorkerLoop, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f"loop.{name}() is not available in prefork's event worker; "
            "-k asyncio runs a complete asyncio loop"
        )

    method.__name__ = name
    return method


class EventWorkerLoop(asyncio.AbstractEventLoop):
    """asyncio's loop API over one ``fastio.EventLoop`` (see the module)."""

    def __init__(self, wake_fd: int = -1) -> None:
        self.io: fastio.EventLoop | None = None  # set by attach()
        self._ready: deque[asyncio.Handle] = deque()
        # Compiled (fastio.TimerQueue): TimerHandle.cancel() calls the
        # queue's own count, through _timer_handle_cancelled below.
        self._timers = fastio.TimerQueue()
        self._timer_handle_cancelled = self._timers.cancelled
        # When the I/O loop returns at the latest (what timeout() gave it): a
        # timer due later needs no wake-up.
        self._deadline = float("inf")
        self._wake_fd = wake_fd
        self._thread_id = threading.get_ident()
        self._closed = False
        self._running = False
        self._exception_handler: Callable[..., Any] | None = None
        self._task_factory: Callable[..., Any] | None = None
        self._executor: concurrent.futures.Executor | None = None
        self._debug = False
        self.log = logging.getLogger("prefork")
        # What add_reader/add_writer watch: fd -> (reader, writer) handles.
        self._selector = selectors.EpollSelector()

    # -- driving it (the worker) ----------------------------------------------------

    def attach(self, io: fastio.EventLoop) -> None:
        """Serve with ``io`` and be the running loop of this thread from now on."""
        self.io = io
        io.watch(self._selector.fileno())
        self._running = True
        asyncio.events._set_running_loop(self)

    def watched_fd(self) -> int:
        """The descriptor that is readable while a watched one is ready (for
        a worker that waits without the I/O loop)."""
        return self._selector.fileno()

    def timeout(self, longest: float) -> float:
        """How long the I/O loop may wait: 0 while callbacks are ready,
        else until the next timer, at most ``longest``."""
        now = self.time()
        if self._ready:
            wait = 0.0
        else:
            wait = max(0.0, min(longest, self._timers.next_when() - now))
        self._deadline = now + wait
        return wait

    def busy(self) -> bool:
        """Callbacks or unfinished tasks remain: what keeps a worker that has
        no connection left. A bare timer does not (a periodic call_later
        would keep it until the KILL); a task sleeping on one does."""
        return bool(self._ready) or any(not task.done() for task in asyncio.all_tasks(self))

    def run_once(self) -> None:
        """Run the timers that are due, then the callbacks ready now (not
        those they schedule: they wait for the next turn, as in asyncio)."""
        if self._selector.get_map():
            for key, mask in self._selector.select(0):
                reader, writer = key.data
                if mask & selectors.EVENT_READ and reader is not None:
                    self._ready.append(reader)
                if mask & selectors.EVENT_WRITE and writer is not None:
                    self._ready.append(writer)
        self._timers.pop_due(self.time(), self._ready)
        if not self._ready:
            return
        # What the callbacks write to the worker's connections is held and
        # sent when they are done: a task that writes several times before
        # it waits again sends once (fastio.EventLoop.hold_writes).
        io = self.io
        if io is not None:
            io.hold_writes(True)
        try:
            popleft = self._ready.popleft
            for _ in range(len(self._ready)):
                handle = popleft()
                if not handle._cancelled:  # cancelled(), without its frame
                    handle._run()  # an exception goes to call_exception_handler
        finally:
            if io is not None:
                io.hold_writes(False)

    def cancel_tasks(self) -> int:
        """Cancel every unfinished task (the end of a graceful stop)."""
        tasks = [task for task in asyncio.all_tasks(self) if not task.done()]
        for task in tasks:
            task.cancel()
        return len(tasks)

    def detach(self) -> None:
        self._running = False
        asyncio.events._set_running_loop(None)
        self._selector.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def _wake(self) -> None:
        if self.io is not None:
            self.io.return_soon()

    # -- time and callbacks ---------------------------------------------------------

    def time(self) -> float:
        return time.monotonic()

    def call_soon(  # type: ignore[override]  # typeshed's generic signature
        self, callback: Callable[..., Any], *args: Any, context: contextvars.Context | None = None
    ) -> asyncio.Handle:
        # _check_closed and _wake inlined: a task waiting on a read comes here
        # per message (its future's wake-up), and each Python frame counts.
        if self._closed:
            raise RuntimeError("Event loop is closed")
        handle = asyncio.Handle(callback, args, self, context)
        self._ready.append(handle)
        io = self.io
        if io is not None:
            io.return_soon()
        return handle

    def call_soon_threadsafe(  # type: ignore[override]  # typeshed's generic signature
        self, callback: Callable[..., Any], *args: Any, context: contextvars.Context | None = None
    ) -> asyncio.Handle:
        handle = self.call_soon(callback, *args, context=context)
        if self._wake_fd >= 0 and threading.get_ident() != self._thread_id:
            try:
                os.write(self._wake_fd, b"\0")  # the I/O loop returns: a signal's pipe
            except BlockingIOError:
                pass  # full: it will wake anyway
        return handle

    def call_later(  # type: ignore[override]  # typeshed's generic signature
        self,
        delay: float,
        callback: Callable[..., Any],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        # call_at and time() inlined: a protocol that re-arms its timeout per
        # message comes here per message, and each Python frame counts.
        if self._closed:
            raise RuntimeError("Event loop is closed")
        when = time.monotonic() + delay
        timer = asyncio.TimerHandle(when, callback, args, self, context=context)
        self._timers.push(timer)
        if when < self._deadline:
            self._wake()
        return timer

    def call_at(  # type: ignore[override]  # typeshed's generic signature
        self,
        when: float,
        callback: Callable[..., Any],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        self._check_closed()
        timer = asyncio.TimerHandle(when, callback, args, self, context=context)
        # Cancelled timers leave the queue once they are half of it: a protocol
        # re-arming its timeout per message cancels one per message, and the
        # I/O loop may serve thousands of messages between two run_once.
        self._timers.push(timer)
        if when < self._deadline:
            self._wake()  # the I/O loop's wait must end by then
        return timer

    # -- futures, tasks, threads ----------------------------------------------------

    def create_future(self) -> asyncio.Future[Any]:
        return asyncio.Future(loop=self)

    def create_task(self, coro: Any, *, name: str | None = None, context: Any = None) -> Any:
        self._check_closed()
        if self._task_factory is not None:
            task = self._task_factory(self, coro)
            if name is not None:
                task.set_name(name)
            return task
        return asyncio.Task(coro, loop=self, name=name, context=context)

    def set_task_factory(self, factory: Callable[..., Any] | None) -> None:
        self._task_factory = factory

    def get_task_factory(self) -> Callable[..., Any] | None:
        return self._task_factory

    def run_in_executor(  # type: ignore[override]  # typeshed's generic signature
        self, executor: Any, func: Callable[..., Any], *args: Any
    ) -> Any:
        self._check_closed()
        if executor is None:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    thread_name_prefix="prefork-executor"
                )
            executor = self._executor
        return asyncio.wrap_future(executor.submit(func, *args), loop=self)

    def set_default_executor(self, executor: Any) -> None:
        self._executor = executor

    # -- descriptors and sockets of the user's own ----------------------------------

    def _watch(self, fd: Any, event: int, handle: asyncio.Handle | None) -> bool:
        """Set (or, with None, clear) the reader or writer of ``fd``; whether
        one was set before."""
        self._check_closed()
        fd = fileno_of(fd)
        try:
            key = self._selector.get_key(fd)
        except KeyError:
            key = None
        reader, writer = key.data if key is not None else (None, None)
        before = reader if event == selectors.EVENT_READ else writer
        if before is not None:
            before.cancel()
        if event == selectors.EVENT_READ:
            reader = handle
        else:
            writer = handle
        events = (selectors.EVENT_READ if reader else 0) | (selectors.EVENT_WRITE if writer else 0)
        if key is None:
            if events:
                self._selector.register(fd, events, (reader, writer))
        elif events:
            self._selector.modify(fd, events, (reader, writer))
        else:
            self._selector.unregister(fd)
        return before is not None

    def add_reader(  # type: ignore[override]  # typeshed's generic signature
        self, fd: Any, callback: Callable[..., Any], *args: Any
    ) -> None:
        self._watch(fd, selectors.EVENT_READ, asyncio.Handle(callback, args, self))

    def remove_reader(self, fd: Any) -> bool:
        return self._watch(fd, selectors.EVENT_READ, None)

    def add_writer(  # type: ignore[override]  # typeshed's generic signature
        self, fd: Any, callback: Callable[..., Any], *args: Any
    ) -> None:
        self._watch(fd, selectors.EVENT_WRITE, asyncio.Handle(callback, args, self))

    def remove_writer(self, fd: Any) -> bool:
        return self._watch(fd, selectors.EVENT_WRITE, None)

    async def _wait_ready(self, fd: int, writing: bool) -> None:
        """Wait until ``fd`` is readable (or writable)."""
        future = self.create_future()
        if writing:
            self.add_writer(fd, set_done, future)
        else:
            self.add_reader(fd, set_done, future)
        try:
            await future
        finally:
            if writing:
                self.remove_writer(fd)
            else:
                self.remove_reader(fd)

    async def _retry(self, sock: socket.socket, writing: bool, attempt: Callable[[], Any]) -> Any:
        """``attempt()``, again each time ``sock`` is ready, until it does not
        raise BlockingIOError: its result."""
        while True:
            try:
                return attempt()
            except (BlockingIOError, InterruptedError):
                await self._wait_ready(sock.fileno(), writing)

    async def sock_recv(self, sock: socket.socket, nbytes: int) -> bytes:
        return await self._retry(sock, False, lambda: sock.recv(nbytes))  # type: ignore[no-any-return]

    async def sock_recv_into(self, sock: socket.socket, buf: Any) -> int:
        return await self._retry(sock, False, lambda: sock.recv_into(buf))  # type: ignore[no-any-return]

    async def sock_sendall(self, sock: socket.socket, data: Any) -> None:
        view = memoryview(data).cast("B")
        while view:
            sent = await self._retry(sock, True, functools.partial(sock.send, view))
            view = view[sent:]

    async def sock_accept(self, sock: socket.socket) -> tuple[socket.socket, Any]:
        conn, address = await self._retry(sock, False, sock.accept)
        conn.setblocking(False)
        return conn, address

    async def sock_connect(self, sock: socket.socket, address: Any) -> None:
        """Connect a non-blocking socket: wait until it is writable, then
        read SO_ERROR, as asyncio does."""
        code = sock.connect_ex(address)
        if code in (errno.EINPROGRESS, errno.EAGAIN, errno.EALREADY):
            await self._wait_ready(sock.fileno(), True)
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code not in (0, errno.EISCONN):
            raise OSError(code, f"Connect call failed {address}")

    async def create_connection(
        self,
        protocol_factory: Callable[[], Any],
        host: str | None = None,
        port: int | None = None,
        *,
        ssl: Any = None,
        family: int = 0,
        proto: int = 0,
        flags: int = 0,
        sock: socket.socket | None = None,
        local_addr: Any = None,
        server_hostname: str | None = None,
        ssl_handshake_timeout: float | None = None,
        ssl_shutdown_timeout: float | None = None,
        happy_eyeballs_delay: float | None = None,
        interleave: int | None = None,
        all_errors: bool = False,
    ) -> tuple[asyncio.Transport, Any]:
        """A TCP (or UNIX, with ``sock``) connection from this worker, as
        asyncio's: every address of ``host`` tried in turn; TLS is not
        available on this loop (-k asyncio has it)."""
        if ssl or server_hostname is not None:
            raise NotImplementedError(
                "loop.create_connection(ssl=...) is not available in prefork's event worker; "
                "-k asyncio runs a complete asyncio loop"
            )
        if sock is None:
            if host is None and port is None:
                raise ValueError("host and port was not specified and no sock specified")
            sock = await self._connect_any(host, port, family, proto, flags, local_addr, all_errors)
        elif host is not None or port is not None:
            raise ValueError("host/port and sock can not be specified at the same time")
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as asyncio
        protocol = protocol_factory()
        transport = SocketTransport(self, sock, protocol)
        waiter = self.create_future()
        transport.start(waiter)
        try:
            await waiter
        except BaseException:
            transport.close()
            raise
        return transport, protocol

    async def _connect_any(
        self,
        host: str | None,
        port: int | None,
        family: int,
        proto: int,
        flags: int,
        local_addr: Any,
        all_errors: bool,
    ) -> socket.socket:
        infos = await self.getaddrinfo(
            host, port, family=family, type=socket.SOCK_STREAM, proto=proto, flags=flags
        )
        if not infos:
            raise OSError("getaddrinfo() returned empty list")
        errors: list[OSError] = []
        for af, kind, number, _, address in infos:
            sock = socket.socket(af, kind, number)
            try:
                sock.setblocking(False)
                if local_addr is not None:
                    sock.bind(local_addr)
                await self.sock_connect(sock, address)
                return sock
            except OSError as exc:
                sock.close()
                errors.append(exc)
            except BaseException:
                sock.close()
                raise
        if all_errors and sys.version_info >= (3, 11):
            raise ExceptionGroup("create_connection failed", errors)  # noqa: F821  # 3.11+
        if len(errors) == 1:
            raise errors[0]
        if len({str(exc) for exc in errors}) == 1:
            raise errors[0]
        raise OSError("Multiple exceptions: {}".format(", ".join(str(exc) for exc in errors)))

    async def getaddrinfo(self, *args: Any, **kwargs: Any) -> Any:
        import socket

        return await self.run_in_executor(None, lambda: socket.getaddrinfo(*args, **kwargs))

    async def getnameinfo(self, sockaddr: Any, flags: int = 0) -> Any:
        import socket

        return await self.run_in_executor(None, socket.getnameinfo, sockaddr, flags)

    # -- errors ---------------------------------------------------------------------

    def get_exception_handler(self) -> Callable[..., Any] | None:
        return self._exception_handler

    def set_exception_handler(self, handler: Callable[..., Any] | None) -> None:
        self._exception_handler = handler

    def default_exception_handler(self, context: dict[str, Any]) -> None:
        """Log one event: the message, the object it concerns, and the
        exception's traceback."""
        message = context.get("message") or "unhandled exception in a callback"
        about = [
            f"{key}={context[key]!r}"
            for key in ("task", "future", "handle", "transport")
            if key in context
        ]
        exc = context.get("exception")
        self.log.error(
            "%s%s",
            message,
            f" ({', '.join(about)})" if about else "",
            exc_info=(type(exc), exc, exc.__traceback__) if exc is not None else None,
        )

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        if self._exception_handler is None:
            self.default_exception_handler(context)
            return
        try:
            self._exception_handler(self, context)
        except Exception as exc:  # the handler's own failure must not stop the loop
            self.default_exception_handler(
                {"message": "the loop's exception handler failed", "exception": exc}
            )

    # -- state ----------------------------------------------------------------------

    def get_debug(self) -> bool:
        return self._debug

    def set_debug(self, enabled: bool) -> None:
        self._debug = enabled

    def is_running(self) -> bool:
        return self._running

    def is_closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """User code may not close the worker's loop; the worker does."""
        if self._running:
            raise RuntimeError("the event worker's loop is closed by the worker, not by user code")
        self._closed = True
        self._ready.clear()
        self._timers.clear()  # as asyncio's: the handles no longer keep the loop

    def _check_closed(self) -> None:
        if self._closed:
            raise RuntimeError("Event loop is closed")


for _name in UNSUPPORTED:
    setattr(EventWorkerLoop, _name, _unsupported(_name))
del _name
