"""Peers that stall, and proof that the writer's sends came up short.

A peer that reads as fast as the server writes never makes a send come up
short, so the code that handles a short send goes untested. These helpers
make the short sends happen and count them, so that a test notices when its
set-up stops producing them:

- small socket buffers on both ends (``shrink``, ``unix_pair``, ``tcp_pair``,
  ``tcp_listener``, ``tcp_client``), so that a peer that stops reading fills
  them after a few KiB;
- the kernel's own queue lengths (``unread``: SIOCINQ, ``unsent``:
  SIOCOUTQNSD) and ``writable``, to account for every byte a writer handed
  to the kernel and to see that its send queue is full;
- ``server_end``: the descriptor, in this process, of the connection an
  event loop accepted, to look at its send queue;
- ``BlockedWriter``: a blocking hot-loop call (``echo``, ``chargen``,
  ``sendall``) run in a thread. A blocking send only comes back short when a
  signal interrupts it after it queued some bytes, so ``interrupt`` waits
  until the writer sleeps in ``sendto`` (read from
  ``/proc/self/task/TID/syscall``: the call and its arguments), sends it a
  signal, and reads where it sleeps next: the same buffer moved on by ``k``
  bytes and ``k`` bytes shorter is a send that returned ``k`` short of what it
  was asked, after which the writer sent the rest. That is what
  ``Interrupts.short`` counts; ``again`` counts interrupts that found nothing
  sent yet (EINTR: the call is made again).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import select
import signal
import socket
import stat
import struct
import termios
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

SMALL = 4096  # what the tests ask for; Linux doubles it and raises it to its minimum
SIOCINQ = termios.FIONREAD
SIOCOUTQ = termios.TIOCOUTQ
SIOCOUTQNSD = 0x894B  # linux/sockios.h: bytes queued but not yet sent (TCP)
INTERRUPT = signal.SIGUSR2  # sent to a blocked writer; its Python handler does nothing
PATIENCE = 60.0  # seconds: a safety net against a hang, never a measure of speed


# -- small buffers -------------------------------------------------------------------


def shrink(sock: socket.socket, size: int = SMALL, rcvbuf: int | None = None) -> socket.socket:
    """Ask for a ``size``-byte send buffer and a ``rcvbuf``-byte (default
    ``size``) receive buffer on ``sock``."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size if rcvbuf is None else rcvbuf)
    return sock


def buffers(sock: socket.socket) -> int:
    """What the kernel gave ``sock``: its send plus its receive buffer, in bytes."""
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) + sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_RCVBUF
    )


def unix_pair(size: int = SMALL) -> tuple[socket.socket, socket.socket]:
    """A connected (client, server) UNIX stream pair with small buffers."""
    client, server = socket.socketpair()
    return shrink(client, size), shrink(server, size)


def tcp_listener(size: int = SMALL, rcvbuf: int | None = None, backlog: int = 16) -> socket.socket:
    """A non-blocking loopback listener whose connections get small buffers
    (an accepted socket inherits the listener's)."""
    listener = shrink(socket.socket(), size, rcvbuf)
    listener.bind(("127.0.0.1", 0))
    listener.listen(backlog)
    listener.setblocking(False)
    return listener


def tcp_client(address: Any, size: int = SMALL, rcvbuf: int | None = None) -> socket.socket:
    """A connection to ``address`` with small buffers, set before the
    handshake so the window it advertises is small from the start."""
    client = shrink(socket.socket(), size, rcvbuf)
    client.settimeout(PATIENCE)
    client.connect(address)
    return client


def tcp_pair(size: int = SMALL) -> tuple[socket.socket, socket.socket]:
    """A connected (client, server) pair of TCP sockets, small buffers on both."""
    with tcp_listener(size) as listener:
        client = tcp_client(listener.getsockname(), size)
        listener.setblocking(True)
        server, _ = listener.accept()
    client.settimeout(None)
    return client, server


# -- what the kernel holds -------------------------------------------------------------


def _fd(sock: Any) -> int:
    return sock if isinstance(sock, int) else sock.fileno()


def _ioctl_int(sock: Any, request: int) -> int:
    value: int = struct.unpack("i", fcntl.ioctl(_fd(sock), request, b"\0\0\0\0"))[0]
    return value


def unread(sock: Any) -> int:
    """Bytes received on ``sock`` that nobody has read yet (SIOCINQ)."""
    return _ioctl_int(sock, SIOCINQ)


def unsent(sock: Any) -> int:
    """Bytes a TCP ``sock`` holds that it has not transmitted yet (SIOCOUTQNSD)."""
    return _ioctl_int(sock, SIOCOUTQNSD)


def queued(sock: Any) -> int:
    """What ``sock``'s send queue holds (SIOCOUTQ; in-memory size for UNIX sockets)."""
    return _ioctl_int(sock, SIOCOUTQ)


def writable(sock: Any) -> bool:
    """Whether the kernel would take a send on ``sock`` right now (POLLOUT)."""
    poller = select.poll()
    poller.register(_fd(sock), select.POLLOUT)
    return any(mask & select.POLLOUT for _, mask in poller.poll(0))


def server_end(client: socket.socket) -> int:
    """The descriptor in this process of the accepted end of TCP ``client``
    (an event loop's connection): borrowed, never closed here."""
    want = (client.getpeername(), client.getsockname())
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
        except OSError:  # the directory's own descriptor, gone by now
            continue
        sock = socket.socket(fileno=fd)
        try:
            if sock.family == client.family and (sock.getsockname(), sock.getpeername()) == want:
                return fd
        except OSError:
            pass
        finally:
            sock.detach()
    raise AssertionError(f"no descriptor here is the other end of {want[1]}")


def read_available(sock: socket.socket, limit: int) -> tuple[bytes, bool]:
    """Up to ``limit`` bytes a non-blocking ``sock`` has now, and whether it
    saw end of file."""
    data = bytearray()
    while len(data) < limit:
        try:
            chunk = sock.recv(min(65536, limit - len(data)))
        except BlockingIOError:
            break
        if not chunk:
            return bytes(data), True
        data += chunk
    return bytes(data), False


# -- where a thread sleeps --------------------------------------------------------------


def sleeping_in(tid: int) -> tuple[int, ...] | None:
    """The syscall thread ``tid`` of this process sleeps in: its number and
    six arguments; None while it runs (or once it is gone)."""
    try:
        with open(f"/proc/self/task/{tid}/syscall") as f:
            fields = f.read().split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    if not fields or fields[0] in ("running", "-1"):
        return None
    return (int(fields[0]), *(int(value, 16) for value in fields[1:7]))


def _sleeping_in_call(call: Callable[[socket.socket], Any], prepare: Callable[..., Any]) -> int:
    """The syscall number a thread blocked in ``call(sock)`` sleeps in."""
    a, b = socket.socketpair()
    with a, b:
        prepare(a, b)
        done = threading.Event()
        native: list[int] = []

        def target() -> None:
            native.append(threading.get_native_id())
            call(a)
            done.set()

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        deadline = time.monotonic() + PATIENCE
        number = None
        while number is None and time.monotonic() < deadline:
            time.sleep(0.001)
            seen = sleeping_in(native[0]) if native else None
            if seen is not None and seen[1] == a.fileno():
                number = seen[0]
        b.setblocking(False)
        while not done.is_set() and time.monotonic() < deadline:  # let the call finish
            with contextlib.suppress(BlockingIOError):
                if call is _recv_one:
                    b.send(b"x")
                else:
                    b.recv(1 << 20)
            time.sleep(0.001)
        thread.join(PATIENCE)
    assert number is not None, "cannot read /proc/self/task/*/syscall here"
    return number


def _recv_one(sock: socket.socket) -> None:
    sock.recv(1)


def _send_lots(sock: socket.socket) -> None:
    sock.sendall(b"x" * 65536)


def _fill(a: socket.socket, b: socket.socket) -> None:
    shrink(a)
    a.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        for _ in range(10_000):  # a few KiB of buffers: EAGAIN long before
            a.send(b"x" * 4096)
    a.setblocking(True)


@functools.cache
def socket_calls() -> tuple[int, int]:
    """The numbers of the syscalls a thread blocked in ``send`` and in ``recv``
    sleeps in (``sendto`` and ``recvfrom`` on Linux), measured here once."""
    return (
        _sleeping_in_call(_send_lots, _fill),
        _sleeping_in_call(_recv_one, lambda a, b: None),
    )


# -- a blocking writer, interrupted ------------------------------------------------------


@dataclass
class Interrupts:
    """What interrupting a writer blocked in ``send`` showed."""

    short: int = 0  # the send returned short; the writer sent the rest from where it stopped
    again: int = 0  # nothing queued by that call yet: EINTR, and the same send again
    other: int = 0  # the call finished meanwhile (a reader freed room): nothing to tell
    sizes: list[int] = field(default_factory=list)  # bytes each short send had queued

    def note(self, before: tuple[int, ...], after: tuple[int, ...] | None, send: int) -> None:
        """Classify two sightings of a writer sleeping in ``send`` (syscall
        number), ``before`` and ``after`` the send it was in came back."""
        if after is not None and after[0] == send == before[0] and after[1] == before[1]:
            moved = after[2] - before[2]
            if moved == 0 and after[3] == before[3]:
                self.again += 1
                return
            if 0 < moved < before[3] and before[3] - after[3] == moved:
                self.short += 1
                self.sizes.append(moved)
                return
        self.other += 1


@contextlib.contextmanager
def interrupt_handler() -> Iterator[list[float]]:
    """A Python handler for ``INTERRUPT`` that only records when it ran. The
    C-level handler Python installs has no SA_RESTART, so the signal ends the
    syscall it interrupts."""
    calls: list[float] = []
    old = signal.signal(INTERRUPT, lambda *_: calls.append(time.monotonic()))
    try:
        yield calls
    finally:
        signal.signal(INTERRUPT, old)


class BlockedWriter:
    """``func(sock, arg)`` run in a thread, on a blocking ``sock``; the test
    is its peer. ``result`` holds the return value or the exception; ``sock``
    is half-closed once ``func`` returns, so the peer sees end of file."""

    def __init__(self, func: Callable[[Any, Any], Any], sock: socket.socket, arg: Any) -> None:
        self.fd = sock.fileno()
        self.result: dict[str, Any] = {}
        self.interrupts = Interrupts()
        self._started = threading.Event()
        self._native = 0
        self.send_call, self.recv_call = socket_calls()

        def target() -> None:
            self._native = threading.get_native_id()
            self._started.set()
            try:
                self.result["value"] = func(sock, arg)
            except BaseException as exc:  # the test reads it
                self.result["error"] = exc
            finally:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()
        self._started.wait(PATIENCE)

    def sleeping(self) -> tuple[int, ...] | None:
        """Once the writer sleeps in a send or receive on its socket: that
        call (number, fd, buffer, length, ...), seen twice alike; None once it
        has returned."""
        deadline = time.monotonic() + PATIENCE
        last = None
        while time.monotonic() < deadline:
            if not self.thread.is_alive():
                return None
            seen = sleeping_in(self._native)
            if (
                seen is not None
                and seen[0] in (self.send_call, self.recv_call)
                and seen[1] == self.fd
            ):
                if seen == last:
                    return seen
                last = seen
            else:
                last = None
            time.sleep(0.0005)
        raise AssertionError(f"the writer never settled in a socket call: {self.thread}")

    def interrupt(self) -> bool:
        """If the writer sleeps in a send, interrupt it with a signal and
        record what it does next (``interrupts``). False when it sleeps in a
        receive (it wants input) or has returned."""
        before = self.sleeping()
        if before is None or before[0] != self.send_call:
            return False
        assert self.thread.ident is not None
        signal.pthread_kill(self.thread.ident, INTERRUPT)
        # The kernel woke it for the signal before pthread_kill returned, so
        # where it sleeps now is the call it made next.
        self.interrupts.note(before, self.sleeping(), self.send_call)
        return True

    def join(self) -> Any:
        self.thread.join(PATIENCE)
        assert not self.thread.is_alive(), "the writer did not return"
        if "error" in self.result:
            raise self.result["error"]
        return self.result["value"]


class LaggingReader:
    """Reads ``sock`` to its end in bursts, in a thread that cannot take
    SIGALRM (so a timer's signals interrupt the writer), stalling between
    bursts until the writer (native thread id ``tid``) sleeps in a send on
    ``fd``. Each stall notes that send's buffer and length twice, two
    milliseconds apart; two sightings in a row of the same buffer moved on by
    ``k`` bytes and ``k`` shorter mean the first send returned ``k`` bytes
    short (a signal interrupted it) and the writer sent the rest: that is
    what ``interrupts.short`` counts. Call ``writer_returned`` once the
    writer's call is over, so that the reader stops looking for it."""

    def __init__(
        self,
        sock: socket.socket,
        tid: int,
        fd: int,
        burst: int = 16384,
        limit: int | None = None,
    ) -> None:
        """``limit``: close ``sock`` once that many bytes are read, instead of
        reading to the end (for chargen, which has none)."""
        self.sock = sock
        self.limit = limit
        self.tid = tid
        self.fd = fd
        self.burst = burst
        self.received = bytearray()
        self.interrupts = Interrupts()
        self.send_call, self.recv_call = socket_calls()
        self.errors: list[BaseException] = []
        self._returned = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def writer_returned(self) -> None:
        self._returned.set()

    def _sighting(self) -> tuple[int, ...] | None:
        """The send the writer sleeps in; None if it sleeps in a receive
        (it wants input) or never settles in a socket call."""
        for _ in range(20_000):  # 10 s at most, more on a loaded machine
            if self._returned.is_set():
                return None
            seen = sleeping_in(self.tid)
            if seen is not None and seen[1] == self.fd:
                if seen[0] == self.send_call:
                    return seen
                if seen[0] == self.recv_call:
                    return None
            time.sleep(0.0005)
        return None

    def _run(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        last = None
        try:
            while chunk := self.sock.recv(self.burst):
                self.received += chunk
                if self.limit is not None and len(self.received) >= self.limit:
                    self.sock.close()
                    return
                for pause in (0.002, 0):
                    seen = self._sighting()
                    if seen is not None and last is not None and seen != last:
                        self.interrupts.note(last, seen, self.send_call)
                    last = seen
                    time.sleep(pause)
        except BaseException as exc:  # reported by join
            self.errors.append(exc)

    def join(self, timeout: float = PATIENCE) -> bytes:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the reader did not finish"
        if self.errors:
            raise self.errors[0]
        return bytes(self.received)
