"""Handlers of every kind the event and asyncio workers run (and some they
refuse), for tests/test_asyncio_worker.py and tests/test_event_asyncio.py."""

from __future__ import annotations

import asyncio
import functools
import socketserver
import sys
import time
from typing import Any


class DocsEcho(asyncio.Protocol):
    """In the style of the CPython docs' TCP echo server protocol: print,
    echo the first data, close."""

    def connection_made(self, transport: Any) -> None:
        print(f"Connection from {transport.get_extra_info('peername')}", file=sys.stderr)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        message = data.decode()
        print(f"Data received: {message!r}", file=sys.stderr)
        self.transport.write(data)
        self.transport.close()


async def upper_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A stream handler: upper-cases lines until the end of input."""
    while line := await reader.readline():
        writer.write(line.upper())
        await writer.drain()
    writer.close()
    await writer.wait_closed()


async def docs_handle_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The CPython docs' TCP echo server using streams, its handle_echo as
    written there (print to standard error: our log)."""
    data = await reader.read(100)
    message = data.decode()
    addr = writer.get_extra_info("peername")

    print(f"Received {message!r} from {addr!r}", file=sys.stderr)

    print(f"Send: {message!r}", file=sys.stderr)
    writer.write(data)
    await writer.drain()

    print("Close the connection", file=sys.stderr)
    writer.close()
    await writer.wait_closed()


async def failing_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers one line, then raises on the next."""
    writer.write(b"first " + await reader.readline())
    await writer.drain()
    await reader.readline()
    raise ValueError("failing_stream fails on its second line")


async def slow_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads a line, works on it for a second (awaiting), then answers."""
    line = await reader.readline()
    await asyncio.sleep(1.0)
    writer.write(b"done " + line)
    await writer.drain()


async def stubborn_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Never finishes on its own; says so when it is cancelled."""
    await reader.readline()
    writer.write(b"waiting\n")
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        print("stubborn_stream cancelled", file=sys.stderr, flush=True)
        raise


class Greeter(asyncio.Protocol):
    """Takes its greeting as a constructor argument: needs a factory."""

    def __init__(self, greeting: bytes) -> None:
        self.greeting = greeting

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(self.greeting)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


def make_greeter() -> Greeter:
    return Greeter(b"hello from a factory\n")


partial_greeter = functools.partial(Greeter, b"hello from a partial\n")


class LaterEcho(asyncio.Protocol):
    """Uses the running loop: echoes each chunk from a task, after a sleep."""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        asyncio.get_running_loop().create_task(self.later(data))

    async def later(self, data: bytes) -> None:
        await asyncio.sleep(0.01)
        self.transport.write(data)

    def eof_received(self) -> bool:
        asyncio.get_running_loop().call_later(0.2, self.transport.close)
        return True


class UdpUpper(asyncio.DatagramProtocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.transport.sendto(data.upper(), addr)


class Sleeper(asyncio.Protocol):
    """Blocks the loop in its first data_received: the watchdog's business."""

    def data_received(self, data: bytes) -> None:
        time.sleep(3600)


def blocking_handle(sock: Any, address: Any) -> None:
    sock.sendall(sock.recv(100))


class RequestHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.sendall(self.request.recv(100))


class BufferedEcho(asyncio.BufferedProtocol):
    """Echo through asyncio.BufferedProtocol: the loop reads into our buffer."""

    def __init__(self) -> None:
        self.buffer = bytearray(4096)

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.transport.write(bytes(self.buffer[:nbytes]))


# -- what detection takes for another kind: --handler-type says which ---------------


def handle_with_defaults(sock: Any = None, address: Any = None) -> None:
    """A blocking handle(sock, address) whose parameters have defaults:
    detected as a protocol factory (it can be called with no argument)."""
    while data := sock.recv(65536):
        sock.sendall(data.upper())


def stream_by_wrapper(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Any:
    """A stream handler that is a plain function returning the coroutine (a
    decorator's wrapper, say): detected as a blocking handle(sock, address)."""
    return upper_stream(reader, writer)
