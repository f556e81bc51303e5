"""The transport of a connection the event worker's user code opens itself.

``loop.create_connection`` (and so ``asyncio.open_connection``) on the event
worker's loop (``EventWorkerLoop``) connects a non-blocking socket and hands
it to a ``SocketTransport``: asyncio's stream transport, written over the
loop's ``add_reader``/``add_writer``. Connections that clients make are not
served here: the compiled loop owns those; this is the way out, to a
backend, a database or another service, from a handler on the same loop.

It keeps asyncio's contract: ``connection_made`` once connected,
``data_received`` (or ``get_buffer``/``buffer_updated`` for a
``BufferedProtocol``), ``eof_received`` (a true return keeps the sending
side open), ``connection_lost`` once; ``write`` sends at once what the
kernel takes and buffers the rest, ``pause_writing`` past the high-water
mark and ``resume_writing`` at the low one (64 KiB and 16 KiB by default,
as asyncio's); ``close`` after flushing, ``abort`` at once, ``write_eof``.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from prefork._fastio_common import write_buffer_limits

READ_SIZE = 256 * 1024  # bytes read per readiness, as asyncio's selector transport


class SocketTransport(asyncio.Transport):
    """A connected non-blocking socket under ``protocol``, on ``loop``."""

    def __init__(self, loop: Any, sock: socket.socket, protocol: Any) -> None:
        super().__init__({"socket": sock})
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        self._buffer = bytearray()  # written, not yet taken by the kernel
        self._closing = False  # close() or abort(): no more writes
        self._eof = False  # write_eof(): shut the sending side once flushed
        self._lost = False  # connection_lost has been scheduled
        self._reading = True
        self._protocol_paused = False
        self._high, self._low = write_buffer_limits()
        self._extra: dict[str, Any]  # asyncio.BaseTransport's, set by its __init__
        self._extra.update(peername=_name(sock.getpeername), sockname=_name(sock.getsockname))

    def start(self, waiter: asyncio.Future[None]) -> None:
        """As asyncio starts its transports: connection_made, then reading,
        then ``waiter`` (what create_connection awaits) done."""
        self._loop.call_soon(self._protocol.connection_made, self)
        self._loop.call_soon(self._start_reading)
        self._loop.call_soon(set_done, waiter)

    def _start_reading(self) -> None:
        if self._reading and not self._closing:
            self._loop.add_reader(self._fd, self._read_ready)

    # -- reading ----------------------------------------------------------------------

    def _read_ready(self) -> None:
        try:
            if isinstance(self._protocol, asyncio.BufferedProtocol):
                buffer = self._protocol.get_buffer(-1)
                n = self._sock.recv_into(buffer)
                if n:
                    self._protocol.buffer_updated(n)
                    return
            else:
                data = self._sock.recv(READ_SIZE)
                if data:
                    self._protocol.data_received(data)
                    return
        except (BlockingIOError, InterruptedError):
            return
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal(exc)
            return
        self._end_of_input()

    def _end_of_input(self) -> None:
        self._loop.remove_reader(self._fd)
        try:
            keep_open = self._protocol.eof_received()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal(exc)
            return
        if not keep_open:
            self.close()

    def pause_reading(self) -> None:
        if self._reading and not self._closing:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if not self._reading and not self._closing:
            self._reading = True
            self._loop.add_reader(self._fd, self._read_ready)

    def is_reading(self) -> bool:
        return self._reading and not self._closing

    # -- writing ----------------------------------------------------------------------

    def write(self, data: Any) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data argument must be a bytes-like object, not {type(data).__name__}")
        if self._eof:
            raise RuntimeError("Cannot call write() after write_eof()")
        if self._closing or not data:
            return  # asyncio drops what is written after close()
        if not self._buffer:
            try:
                sent = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal(exc)
                return
            data = memoryview(data)[sent:]
            if not data:
                return
            self._loop.add_writer(self._fd, self._write_ready)
        self._buffer += data
        self._check_high_water()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def _write_ready(self) -> None:
        try:
            sent = self._sock.send(self._buffer)
        except (BlockingIOError, InterruptedError):
            return
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._loop.remove_writer(self._fd)
            self._buffer.clear()
            self._fatal(exc)
            return
        del self._buffer[:sent]
        self._check_low_water()
        if self._buffer:
            return
        self._loop.remove_writer(self._fd)
        if self._closing:
            self._connection_lost(None)
        elif self._eof:
            self._sock.shutdown(socket.SHUT_WR)

    def _check_high_water(self) -> None:
        if not self._protocol_paused and len(self._buffer) > self._high:
            self._protocol_paused = True
            self._call_protocol("pause_writing")

    def _check_low_water(self) -> None:
        if self._protocol_paused and len(self._buffer) <= self._low:
            self._protocol_paused = False
            self._call_protocol("resume_writing")

    def _call_protocol(self, method: str) -> None:
        try:
            getattr(self._protocol, method)()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._loop.call_exception_handler(
                {
                    "message": f"protocol.{method}() failed",
                    "exception": exc,
                    "transport": self,
                    "protocol": self._protocol,
                }
            )

    def write_eof(self) -> None:
        if self._closing or self._eof:
            return
        self._eof = True
        if not self._buffer:
            self._sock.shutdown(socket.SHUT_WR)

    def can_write_eof(self) -> bool:
        return True

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high, self._low = write_buffer_limits(high, low)
        self._check_high_water()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def get_write_buffer_size(self) -> int:
        return len(self._buffer)

    # -- ending -----------------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Stop reading; connection_lost(None) once what is buffered is sent."""
        if self._closing:
            return
        self._closing = True
        self._loop.remove_reader(self._fd)
        if not self._buffer:
            self._connection_lost(None)

    def abort(self) -> None:
        """Close at once; what is buffered is dropped."""
        self._force_close(None)

    def _fatal(self, exc: BaseException) -> None:
        if not isinstance(exc, OSError):  # a protocol's callback raised: the loop says so
            self._loop.call_exception_handler(
                {
                    "message": "fatal error on a transport",
                    "exception": exc,
                    "transport": self,
                    "protocol": self._protocol,
                }
            )
        self._force_close(exc)

    def _force_close(self, exc: BaseException | None) -> None:
        if self._lost:
            return
        self._buffer.clear()
        self._loop.remove_writer(self._fd)
        self._closing = True
        self._loop.remove_reader(self._fd)
        self._connection_lost(exc)

    def _connection_lost(self, exc: BaseException | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._loop.call_soon(self._call_connection_lost, exc)

    def _call_connection_lost(self, exc: BaseException | None) -> None:
        try:
            self._protocol.connection_lost(exc)
        finally:
            self._sock.close()

    def get_protocol(self) -> Any:
        return self._protocol

    def set_protocol(self, protocol: Any) -> None:
        self._protocol = protocol


def _name(getter: Any) -> Any:
    try:
        return getter()
    except OSError:
        return None


def set_done(waiter: asyncio.Future[None]) -> None:
    """Mark ``waiter`` done, unless it is already (cancelled, say)."""
    if not waiter.done():
        waiter.set_result(None)
