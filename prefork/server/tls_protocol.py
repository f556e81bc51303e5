"""TLS on the event worker: asyncio's TLS protocol on the worker's own loop.

A TLS connection's protocol is ``asyncio.sslproto.SSLProtocol``: the
state machine over ``ssl.MemoryBIO`` that asyncio's loops run, here driven
by the event worker's loop (an asyncio loop for the code it runs, compiled
or the twin). The loop hands it the bytes read (it is a BufferedProtocol)
and writes what it encrypts; it hands the handler's protocol plaintext and a
transport with asyncio's whole TLS contract (``ssl_object``, ``peercert``,
``cipher``, flow control, close_notify on close, the handshake timeout).
The built-in services run over it as Python protocols
(``handlers.STREAM_SERVICES``).

The built-in services do not come here: the loop serves them over TLS
itself (``native_tls``), OpenSSL on the socket, but with ``--sni`` (Python's
SNI callback needs its own ssl socket on each connection). A worker whose
listeners are not all TLS picks the protocol at ``connection_made`` by the
address the client reached (``ByListener``), so its plain listeners serve
Python protocols too.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from asyncio import sslproto
from collections.abc import Callable
from typing import Any

from prefork.server.listeners import Listener

ProtocolFactory = Callable[[], Any]


def native_tls(builtin: str | None, context: ssl.SSLContext | None) -> bool:
    """Whether the loop itself serves TLS (OpenSSL on the socket, the built-in
    services in the loop): for the built-in services, unless the context has
    an SNI callback (Python's needs its own ssl socket on each connection)."""
    return builtin is not None and context is not None and context.sni_callback is None


_WILDCARDS = ("0.0.0.0", "::")


class ServerTLSProtocol(sslproto.SSLProtocol):
    """asyncio's TLS protocol, answering ``get_extra_info("selected_alpn_protocol")``
    too (asyncio's transports answer ``ssl_object``, ``peercert``, ``cipher``
    and ``compression``)."""

    def _get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "selected_alpn_protocol":
            ssl_object = super()._get_extra_info("ssl_object")
            return default if ssl_object is None else ssl_object.selected_alpn_protocol()
        return super()._get_extra_info(name, default)


def tls_factory(
    app_factory: ProtocolFactory, context: ssl.SSLContext, handshake_timeout: float
) -> ProtocolFactory:
    """Each connection's protocol: TLS around the handler's."""

    def make() -> ServerTLSProtocol:
        # No waiter: nobody awaits the handshake (typeshed says a Future is
        # required and the timeout an int; asyncio checks for None and takes seconds).
        return ServerTLSProtocol(
            asyncio.get_running_loop(),
            app_factory(),
            context,
            None,  # type: ignore[arg-type]
            server_side=True,
            ssl_handshake_timeout=handshake_timeout,  # type: ignore[arg-type]
        )

    return make


def _local_key(name: Any) -> tuple[Any, ...]:
    if isinstance(name, str):  # a UNIX socket's path
        return ("unix", name)
    return (name[0], name[1])


class ListenerMap:
    """Which listener a connection came in on, by the address the client
    reached (``sockname``): exactly, or by port on a wildcard listener."""

    def __init__(self, listeners: list[Listener]) -> None:
        self.exact: dict[tuple[Any, ...], bool] = {}
        self.by_port: dict[int, bool] = {}
        for listener in listeners:
            if listener.datagram:
                continue
            name = listener.sock.getsockname()
            if listener.sock.family != socket.AF_UNIX and name[0] in _WILDCARDS:
                self.by_port[name[1]] = listener.tls
            else:
                self.exact[_local_key(name)] = listener.tls

    def is_tls(self, sockname: Any) -> bool:
        if sockname is None:
            return False
        key = _local_key(sockname)
        if key in self.exact:
            return self.exact[key]
        return self.by_port.get(key[1], False) if key[0] != "unix" else False


class ByListener(asyncio.Protocol):
    """A protocol for one moment: at ``connection_made`` it puts the TLS
    protocol or the plain one in its place (``transport.set_protocol``) and
    hands it the connection."""

    def __init__(self, choose: Callable[[Any], Any]) -> None:
        self._choose = choose

    def connection_made(self, transport: Any) -> None:
        protocol = self._choose(transport)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)


def mixed_factory(
    listeners: list[Listener], plain: ProtocolFactory, secure: ProtocolFactory
) -> ProtocolFactory:
    """For a worker with TLS and plain listeners."""
    where = ListenerMap(listeners)

    def choose(transport: Any) -> Any:
        return (secure if where.is_tls(transport.get_extra_info("sockname")) else plain)()

    return lambda: ByListener(choose)
