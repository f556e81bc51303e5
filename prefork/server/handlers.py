"""Handlers: the built-in inetd services, and loading a user's handler.

``--handler`` names a built-in (``echo``, ``discard``, ``daytime``,
``chargen``) or user code as ``module:attr``, which is one of:

- a **protocol class** (it has ``data_received``), asyncio style:
  ``connection_made(transport)``, ``data_received(data)``, ``eof_received()``,
  ``connection_lost(exc)``; the transport has ``write``, ``close``,
  ``is_closing`` and ``get_extra_info('peername')``. Every worker class runs
  it (the event worker natively, the sync and thread workers over a blocking
  socket).
- a **protocol factory**: a callable taking no argument that returns a
  protocol object (a function, a lambda, a ``functools.partial``), for a
  protocol whose constructor takes arguments; run as a protocol class is.
- a **blocking callable** ``handle(sock, address)``, socketserver style, for
  the sync and thread workers.
- a **socketserver request handler** (a ``socketserver.BaseRequestHandler``
  subclass, ``StreamRequestHandler`` with its ``rfile``/``wfile`` too), for
  the sync and thread workers, run as socketserver runs it: constructed with
  ``(request, client_address, server)`` per connection (``setup``,
  ``handle``, ``finish``), then the sending side is shut down and the socket
  closed. ``server`` is a stand-in (``RequestServer``): the master owns the
  listening socket.
- an ``async def handle(reader, writer)`` **stream handler** (asyncio's
  streams, a task per connection: ``StreamHandlerProtocol``), for the event
  and asyncio workers.
- for the asyncio worker (``-k asyncio``) only: an ``asyncio.DatagramProtocol``
  class for ``udp://``.

``LoadedHandler.kind`` names which it is (``KINDS``, by ``detect_kind``);
``check_fit`` refuses, with one line and exit code 2, a kind that the chosen
worker class cannot run.

User code is imported once, in the master, before any worker is forked
(so an import error stops the server at once with exit code 3, and workers
share the loaded code).

Blocking workers call a handler as ``handler(fd, buffer)`` with a connected,
blocking socket descriptor (borrowed: the worker closes it) and the worker's
reusable buffer; it returns ``(bytes_in, bytes_out)``. Each built-in runs on
the hot-loop implementation chosen by ``prefork.fastio``.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
import socket
import socketserver
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prefork import fastio
from prefork._fastio_common import daytime_line
from prefork.errors import ConfigError, HandlerLoadError
from prefork.fastio import peer_name
from prefork.tls import describe_tls

Handler = Callable[[int, Any], tuple[int, int]]
# What the blocking workers call: (connection fd, buffer, the client's address
# from a PROXY header or None) -> (bytes in, bytes out).
BlockingHandler = Callable[[int, Any, Any], tuple[int, int]]


def echo(fd: int, buffer: Any) -> tuple[int, int]:
    """RFC 862: send back every byte received, until the client closes."""
    return fastio.echo(fd, buffer)


def discard(fd: int, buffer: Any) -> tuple[int, int]:
    """RFC 863: read and throw away everything, until the client closes."""
    return fastio.discard(fd, buffer)


def daytime(fd: int, buffer: Any) -> tuple[int, int]:
    """RFC 867: send the date and time as one line (``daytime_line``, the
    event loop's too), then close."""
    return 0, fastio.sendall(fd, daytime_line())


def chargen_pattern(periods: int = 8) -> bytes:
    """RFC 864's rotating stream: 72 printable characters and CRLF per line.

    Line ``i`` starts at printable character ``i`` (mod 95), so the stream
    repeats after 95 lines; the pattern holds whole periods so that sending
    it in a cycle is exactly the stream.
    """
    chars = bytes(range(32, 127))
    doubled = chars + chars
    lines = [doubled[i % 95 : i % 95 + 72] + b"\r\n" for i in range(95)]
    return b"".join(lines) * periods


CHARGEN_PATTERN = chargen_pattern()


def chargen(fd: int, buffer: Any) -> tuple[int, int]:
    """RFC 864: send the character stream until the client goes away."""
    return fastio.chargen(fd, CHARGEN_PATTERN)


BUILTIN: dict[str, Handler] = {
    "echo": echo,
    "discard": discard,
    "daytime": daytime,
    "chargen": chargen,
}


# -- user handlers --------------------------------------------------------------------


# What --handler can name, by the names --handler-type would use.
KINDS = (
    "built-in",
    "protocol",  # a protocol class
    "protocol-factory",  # a callable of no argument returning a protocol
    "stream",  # async def handle(reader, writer)
    "datagram",  # an asyncio.DatagramProtocol class, for udp://
    "request-handler",  # a socketserver.BaseRequestHandler subclass
    "handle",  # a blocking handle(sock, address)
)
# The kinds only the asyncio worker runs, those the event and asyncio
# workers run, and those only the blocking workers run.
ASYNCIO_ONLY_KINDS = ("datagram",)
LOOP_KINDS = ("stream",)
BLOCKING_KINDS = ("request-handler", "handle")


def detect_kind(target: Any) -> str | None:
    """Which of ``KINDS`` (built-ins aside) a loaded ``--handler`` object is,
    or None if it is none of them. Classes by what they are or have;
    callables by their signature: a coroutine function is a stream handler,
    one taking no argument a protocol factory, anything else a blocking
    ``handle(sock, address)`` (as before kinds were told apart)."""
    if isinstance(target, type):
        if issubclass(target, socketserver.BaseRequestHandler):
            return "request-handler"
        if hasattr(target, "datagram_received") and not hasattr(target, "data_received"):
            return "datagram"
        if (
            issubclass(target, asyncio.BaseProtocol)
            or hasattr(target, "data_received")
            or hasattr(target, "buffer_updated")
        ):
            return "protocol"
        return "handle"
    if not callable(target):
        return None
    if inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(type(target).__call__):
        return "stream"
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):  # some built-ins have no signature
        return "handle"
    required = [
        p
        for p in parameters
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return "protocol-factory" if not required else "handle"


@dataclass(frozen=True)
class LoadedHandler:
    """What ``--handler`` resolved to: one of ``builtin``, ``protocol_factory``
    (a protocol class or factory), ``handle`` (blocking), ``stream`` or
    ``datagram_factory`` is set."""

    spec: str
    builtin: str | None = None
    protocol_factory: Callable[[], Any] | None = None
    handle: Callable[[socket.socket, Any], Any] | None = None
    stream: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any] | None = None
    datagram_factory: Callable[[], Any] | None = None
    handler_type: str = "auto"  # --handler-type: a kind of KINDS that overrides detection

    @property
    def kind(self) -> str:
        """One of ``KINDS``."""
        if self.handler_type != "auto":
            return self.handler_type
        if self.builtin is not None:
            return "built-in"
        if self.stream is not None:
            return "stream"
        if self.datagram_factory is not None:
            return "datagram"
        if self.protocol_factory is not None:
            return "protocol" if isinstance(self.protocol_factory, type) else "protocol-factory"
        if isinstance(self.handle, type) and issubclass(
            self.handle, socketserver.BaseRequestHandler
        ):
            return "request-handler"
        return "handle"

    def for_blocking_workers(self) -> BlockingHandler:
        """The ``handler(fd, buffer, peer)`` callable the sync and thread
        workers run; ``peer`` is the client's address from a PROXY header,
        or None for the socket's own peer."""
        if self.builtin is not None:
            builtin = BUILTIN[self.builtin]
            return lambda fd, buffer, peer: builtin(fd, buffer)
        factory, handle = self.protocol_factory, self.handle
        if factory is not None:
            return lambda fd, buffer, peer: serve_protocol(fd, buffer, factory, peer)
        assert handle is not None
        if self.kind == "request-handler":
            return lambda fd, buffer, peer: serve_request_handler(fd, handle, peer)
        return lambda fd, buffer, peer: serve_handle(fd, handle, peer)


def load_handler(spec: str, handler_type: str = "auto") -> LoadedHandler:
    """Resolve ``--handler`` (already syntax-checked by the config), as the
    kind ``handler_type`` names (``--handler-type``), or as detected.

    Raises ``HandlerLoadError`` (exit code 3) with a one-line reason when
    the module does not import or lacks the attribute, and ``ConfigError``
    (exit code 2) when it cannot be of the kind ``handler_type`` names.
    """
    if spec in BUILTIN:
        if handler_type != "auto":
            raise ConfigError(
                f"--handler-type {handler_type}: --handler {spec} is a built-in service"
            )
        return LoadedHandler(spec, builtin=spec)
    module_name, _, attr_path = spec.partition(":")
    if os.getcwd() not in sys.path:  # like gunicorn: user modules live where you run it
        sys.path.insert(0, os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise HandlerLoadError(
            f"--handler {spec}: cannot import {module_name}: {type(exc).__name__}: {exc}"
        ) from None
    for name in attr_path.split("."):
        try:
            target = getattr(target, name)
        except AttributeError:
            raise HandlerLoadError(
                f"--handler {spec}: {module_name} has no attribute {attr_path!r}"
            ) from None
    kind = detect_kind(target) if handler_type == "auto" else handler_type
    if handler_type != "auto":
        check_handler_type(spec, target, handler_type)
    if kind in ("protocol", "protocol-factory"):
        return LoadedHandler(spec, protocol_factory=target, handler_type=handler_type)
    if kind == "stream":
        return LoadedHandler(spec, stream=target, handler_type=handler_type)
    if kind == "datagram":
        return LoadedHandler(spec, datagram_factory=target, handler_type=handler_type)
    if kind is not None:
        return LoadedHandler(spec, handle=target, handler_type=handler_type)
    raise HandlerLoadError(
        f"--handler {spec}: expected a protocol class or a handle(sock, address) "
        f"function, got {type(target).__name__}"
    )


def check_handler_type(spec: str, target: Any, handler_type: str) -> None:
    """Raise ConfigError unless ``target`` can be run as ``handler_type``:
    every kind is called, and a request handler is a class socketserver runs."""
    if not callable(target):
        raise ConfigError(
            f"--handler-type {handler_type}: --handler {spec} is a "
            f"{type(target).__name__}, which cannot be called"
        )
    if handler_type == "request-handler" and not (
        isinstance(target, type) and issubclass(target, socketserver.BaseRequestHandler)
    ):
        raise ConfigError(
            f"--handler-type request-handler: --handler {spec} is not a "
            "socketserver.BaseRequestHandler subclass"
        )


def check_fit(
    handler: LoadedHandler, worker_class: str, datagram: str | None, stream: str | None = None
) -> None:
    """Raise ConfigError if this handler cannot run in ``worker_class``, or
    over the datagram listener ``datagram`` or the stream listener ``stream``
    (their names, None if there is none)."""
    kind = handler.kind
    if kind in ASYNCIO_ONLY_KINDS and worker_class != "asyncio":
        raise ConfigError(
            f"--handler {handler.spec} is a DatagramProtocol class: it needs -k asyncio"
        )
    if kind in LOOP_KINDS and worker_class not in ("event", "asyncio"):
        raise ConfigError(
            f"--handler {handler.spec} is an async stream handler: it needs -k event or -k asyncio"
        )
    if worker_class == "asyncio" and kind in BLOCKING_KINDS:
        what = (
            "a socketserver request handler"
            if kind == "request-handler"
            else (f"{describe_callable(handler.handle)}, a blocking handle(sock, address)")
        )
        raise ConfigError(
            f"--handler {handler.spec} is {what}: -k asyncio runs protocols, protocol "
            "factories and async stream handlers; use -k sync or -k thread"
        )
    if datagram is not None and worker_class not in ("event", "asyncio"):
        raise ConfigError(
            f"-b {datagram}: datagram listeners need the event worker (-k event) or -k asyncio"
        )
    if datagram is not None and kind not in ("built-in", "datagram"):
        raise ConfigError(
            f"-b {datagram}: datagram listeners serve the built-in handlers only, "
            "or a DatagramProtocol class under -k asyncio"
        )
    if stream is not None and kind == "datagram":
        raise ConfigError(
            f"--handler {handler.spec} is a DatagramProtocol class; -b {stream} is a stream "
            "listener: serve it on udp:// listeners only"
        )
    if worker_class == "event" and handler.kind == "request-handler":
        raise ConfigError(
            f"--handler {handler.spec} is a socketserver request handler, run by -k sync and "
            "-k thread only; the event worker runs protocol classes (classes with data_received)"
        )
    if worker_class == "event" and handler.handle is not None:
        raise ConfigError(
            f"--handler {handler.spec} is {describe_callable(handler.handle)}, run as a "
            "blocking handle(sock, address) by -k sync and -k thread only; the event worker "
            "runs protocol classes (classes with data_received)"
        )


def describe_callable(target: Any) -> str:
    """What a loaded non-protocol handler is, for check_fit's message."""
    if isinstance(target, type):
        return f"a class without data_received ({target.__name__})"
    if inspect.isfunction(target) or inspect.isbuiltin(target) or inspect.ismethod(target):
        return "a function"
    return f"a callable {type(target).__name__} object"


def reload_handler(loaded: LoadedHandler) -> LoadedHandler:
    """Import the handler's module afresh (HUP); built-ins stay as they are.

    Raises ``HandlerLoadError`` when the new code does not load.
    """
    if loaded.builtin is not None:
        return loaded
    module_name = loaded.spec.partition(":")[0]
    module = sys.modules.get(module_name)
    if module is not None:
        try:
            importlib.reload(module)
        except Exception as exc:
            raise HandlerLoadError(
                f"--handler {loaded.spec}: cannot import {module_name}: {type(exc).__name__}: {exc}"
            ) from None
    return load_handler(loaded.spec, loaded.handler_type)


class BlockingTransport:
    """The transport a protocol gets in a sync or thread worker."""

    def __init__(self, sock: socket.socket, client: Any = None) -> None:
        self._sock = sock
        self._closing = False
        self.bytes_out = 0
        peer = peer_name(sock)
        self._extra = {"peername": peer, "sockname": sock.getsockname()}
        if client is not None:  # behind a PROXY protocol balancer
            self._extra.update(peername=client, proxy_peername=peer)
        if isinstance(sock, ssl.SSLSocket):
            self._extra.update(describe_tls(sock))

    def write(self, data: Any) -> None:
        if not self._closing:
            self._sock.sendall(data)
            self.bytes_out += memoryview(data).nbytes

    def close(self) -> None:
        self._closing = True

    def is_closing(self) -> bool:
        return self._closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)


def serve_protocol(
    fd: int, buffer: Any, factory: Callable[[], Any], client: Any = None
) -> tuple[int, int]:
    """Run a protocol over the connection ``fd`` (see ``serve_protocol_on``)."""
    sock = socket.socket(fileno=fd)
    try:
        return serve_protocol_on(sock, buffer, factory, client)
    finally:
        sock.detach()


def serve_protocol_on(
    sock: socket.socket, buffer: Any, factory: Callable[[], Any], client: Any = None
) -> tuple[int, int]:
    """Run a protocol over a blocking socket (plain or TLS) until either side
    closes.

    A blocking worker cannot wait for both the peer and the protocol, so a
    connection ends at the peer's end of file whatever ``eof_received`` says.
    """
    nin = 0
    transport = BlockingTransport(sock, client)
    protocol = factory()
    error: Exception | None = None
    try:
        protocol.connection_made(transport)
        view = memoryview(buffer)
        while not transport.is_closing():
            n = sock.recv_into(view)
            if n == 0:
                protocol.eof_received()
                break
            nin += n
            protocol.data_received(bytes(view[:n]))
    except Exception as exc:  # the connection ends with it: tell the protocol why
        error = exc
        raise
    finally:
        protocol.connection_lost(error)
    return nin, transport.bytes_out


# -- the built-in services, as asyncio protocols (-k asyncio; TLS on -k event) -------


class Echo(asyncio.Protocol):
    """RFC 862: every byte back; closes after the client's end of file."""

    transport: asyncio.WriteTransport

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class Discard(asyncio.Protocol):
    """RFC 863: read and drop."""


class Daytime(asyncio.Protocol):
    """RFC 867: one line, then close."""

    def connection_made(self, transport: Any) -> None:
        transport.write(daytime_line())
        transport.close()


class Chargen(asyncio.Protocol):
    """RFC 864: the character stream, written while the transport takes it
    (``pause_writing`` stops it at the high-water mark); one pattern per
    turn of the loop, so a fast reader cannot hold the loop."""

    transport: asyncio.WriteTransport
    paused = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.generate()

    def generate(self) -> None:
        if self.paused or self.transport.is_closing():
            return
        self.transport.write(CHARGEN_PATTERN)
        if not self.paused:
            asyncio.get_running_loop().call_soon(self.generate)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.generate()

    def eof_received(self) -> bool:
        return True  # half-closed: the client still reads the stream


STREAM_SERVICES: dict[str, type[asyncio.Protocol]] = {
    "echo": Echo,
    "discard": Discard,
    "daytime": Daytime,
    "chargen": Chargen,
}


STREAM_LIMIT = 64 * 1024  # a stream handler's StreamReader buffer limit (asyncio's default)


class StreamHandlerProtocol(asyncio.StreamReaderProtocol):
    """Runs ``async def handle(reader, writer)`` as a task per connection,
    with asyncio's streams, on the running loop (the event worker's or
    -k asyncio's), and closes the connection when it returns. A handler
    that raises is reported to ``failed(exc, peer)`` (which logs and counts
    it) and its connection aborted; nothing else is touched."""

    def __init__(
        self, handle: Callable[..., Any], failed: Callable[[Exception, Any], None]
    ) -> None:
        self._reader = asyncio.StreamReader(limit=STREAM_LIMIT)
        super().__init__(self._reader)
        self._handle = handle
        self._failed = failed

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        loop = asyncio.get_running_loop()
        writer = asyncio.StreamWriter(transport, self, self._reader, loop)
        loop.create_task(self._run(writer))

    async def _run(self, writer: asyncio.StreamWriter) -> None:
        try:
            await self._handle(self._reader, writer)
        except Exception as exc:
            self._failed(exc, writer.get_extra_info("peername"))
            writer.transport.abort()
        finally:
            writer.close()


class RequestServer:
    """What a socketserver request handler sees as ``self.server``. The
    master owns the listening socket and the workers serve, so there is no
    ``socketserver.BaseServer`` here: this stand-in carries what handlers
    read of one (``server_address``, ``RequestHandlerClass``, ``timeout``);
    ``shutdown()`` is refused (stop the master with a signal)."""

    timeout = None

    def __init__(self, server_address: Any, handler_class: type) -> None:
        self.server_address = server_address
        self.RequestHandlerClass = handler_class

    def shutdown(self) -> None:
        raise NotImplementedError("prefork's master stops the server: send it TERM")


def serve_request_handler(fd: int, handler_class: Any, client: Any = None) -> tuple[int, int]:
    """Run a ``socketserver.BaseRequestHandler`` subclass on one connection as
    socketserver does: ``handler_class(request, client_address, server)``,
    whose constructor runs ``setup``, ``handle`` and ``finish``; then, as
    ``TCPServer.shutdown_request`` does, shut the sending side down and close.
    The request is a duplicate of the worker's descriptor (the worker closes
    the original). Returns (0, 0): the worker reads a TCP connection's byte
    counts from the kernel, as for ``serve_handle``."""
    with socket.socket(fileno=os.dup(fd)) as request:
        try:
            return serve_request_handler_on(request, handler_class, client)
        finally:
            try:
                request.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the peer has gone: nothing to tell it


def serve_request_handler_on(
    request: socket.socket, handler_class: Any, client: Any = None
) -> tuple[int, int]:
    """``handler_class(request, client_address, server)`` on a socket (plain
    or TLS) that the caller shuts down and closes."""
    server = RequestServer(request.getsockname(), handler_class)
    handler_class(request, peer_name(request) if client is None else client, server)
    return 0, 0


def serve_handle(
    fd: int, handle: Callable[[socket.socket, Any], Any], client: Any = None
) -> tuple[int, int]:
    """Call ``handle(sock, address)`` on a socket of its own.

    The handler gets a duplicate descriptor, so it may close its socket (or
    not) as it likes; the worker closes the original. Returns (0, 0): the
    worker takes a TCP connection's byte counts from the kernel
    (``workers.sync.kernel_byte_counts``); a UNIX one's are not counted.
    """
    with socket.socket(fileno=os.dup(fd)) as sock:
        return serve_handle_on(sock, handle, client)


def serve_handle_on(
    sock: socket.socket, handle: Callable[[socket.socket, Any], Any], client: Any = None
) -> tuple[int, int]:
    """``handle(sock, address)`` on a socket (plain or TLS) the caller closes."""
    handle(sock, peer_name(sock) if client is None else client)
    return 0, 0
