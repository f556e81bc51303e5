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

What user code cannot use here raises NotImplementedError naming the method
(``-k asyncio`` runs a complete asyncio loop instead).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import heapq
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from prefork import fastio

# Methods the asyncio API has and this loop does not implement: each raises
# NotImplementedError naming itself (asyncio's abstract ones name nothing).
UNSUPPORTED = (
    "run_forever",
    "run_until_complete",
    "stop",
    "shutdown_asyncgens",
    "shutdown_default_executor",
    "create_connection",
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
    "add_reader",
    "remove_reader",
    "add_writer",
    "remove_writer",
    "sock_recv",
    "sock_recv_into",
    "sock_recvfrom",
    "sock_recvfrom_into",
    "sock_sendall",
    "sock_sendto",
    "sock_connect",
    "sock_accept",
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
        self._timers: list[asyncio.TimerHandle] = []
        self._cancelled_timers = 0
        self._wake_fd = wake_fd
        self._thread_id = threading.get_ident()
        self._closed = False
        self._running = False
        self._exception_handler: Callable[..., Any] | None = None
        self._task_factory: Callable[..., Any] | None = None
        self._executor: concurrent.futures.Executor | None = None
        self._debug = False
        self.log = logging.getLogger("prefork")

    # -- driving it (the worker) ----------------------------------------------------

    def attach(self, io: fastio.EventLoop) -> None:
        """Serve with ``io`` and be the running loop of this thread from now on."""
        self.io = io
        self._running = True
        asyncio.events._set_running_loop(self)

    def timeout(self, longest: float) -> float:
        """How long the I/O loop may wait: 0 while callbacks are ready,
        else until the next timer, at most ``longest``."""
        if self._ready:
            return 0.0
        if self._timers:
            return max(0.0, min(longest, self._timers[0].when() - self.time()))
        return longest

    def busy(self) -> bool:
        """Callbacks or unfinished tasks remain: what keeps a worker that has
        no connection left. A bare timer does not (a periodic call_later
        would keep it until the KILL); a task sleeping on one does."""
        return bool(self._ready) or any(not task.done() for task in asyncio.all_tasks(self))

    def run_once(self) -> None:
        """Run the timers that are due, then the callbacks ready now (not
        those they schedule: they wait for the next turn, as in asyncio)."""
        if self._cancelled_timers > len(self._timers) // 2 and self._cancelled_timers > 50:
            self._timers = [t for t in self._timers if not t.cancelled()]
            heapq.heapify(self._timers)
            self._cancelled_timers = 0
        now = self.time()
        while self._timers and self._timers[0].when() <= now:
            timer = heapq.heappop(self._timers)
            if timer.cancelled():
                self._cancelled_timers -= 1
                continue
            timer._scheduled = False  # type: ignore[attr-defined]  # as asyncio's loop does
            self._ready.append(timer)
        for _ in range(len(self._ready)):
            handle = self._ready.popleft()
            if not handle.cancelled():
                handle._run()  # an exception goes to call_exception_handler

    def cancel_tasks(self) -> int:
        """Cancel every unfinished task (the end of a graceful stop)."""
        tasks = [task for task in asyncio.all_tasks(self) if not task.done()]
        for task in tasks:
            task.cancel()
        return len(tasks)

    def detach(self) -> None:
        self._running = False
        asyncio.events._set_running_loop(None)
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
        self._check_closed()
        handle = asyncio.Handle(callback, args, self, context=context)
        self._ready.append(handle)
        self._wake()
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
        return self.call_at(self.time() + delay, callback, *args, context=context)

    def call_at(  # type: ignore[override]  # typeshed's generic signature
        self,
        when: float,
        callback: Callable[..., Any],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        self._check_closed()
        timer = asyncio.TimerHandle(when, callback, args, self, context=context)
        heapq.heappush(self._timers, timer)
        timer._scheduled = True  # type: ignore[attr-defined]  # as asyncio's loop does
        self._wake()  # the I/O loop's wait must end by then
        return timer

    def _timer_handle_cancelled(self, handle: asyncio.TimerHandle) -> None:
        """Called by TimerHandle.cancel(): drop it from the heap lazily."""
        if getattr(handle, "_scheduled", False):
            self._cancelled_timers += 1

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

    def _check_closed(self) -> None:
        if self._closed:
            raise RuntimeError("Event loop is closed")


for _name in UNSUPPORTED:
    setattr(EventWorkerLoop, _name, _unsupported(_name))
del _name
