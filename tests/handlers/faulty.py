"""Handlers that misbehave on purpose, for the tests."""

from __future__ import annotations

import socket
from typing import Any


class RaiseOnBoom:
    """Echoes, but raises when a message contains b"boom"."""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if b"boom" in data:
            raise RuntimeError("boom requested")
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        pass


def handle_boom(sock: socket.socket, address: Any) -> None:
    while data := sock.recv(65536):
        if b"boom" in data:
            raise RuntimeError("boom requested")
        sock.sendall(data)


class Peer:
    """Replies with the peer address it was given, then closes."""

    def connection_made(self, transport: Any) -> None:
        transport.write(repr(transport.get_extra_info("peername")).encode())
        transport.close()

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        pass


def peer_handle(sock: socket.socket, address: Any) -> None:
    sock.sendall(repr(address).encode())
    sock.close()  # the worker must cope with a handler closing its socket


not_callable = 42


class CrashOnConnect:
    """Takes the whole worker down with each connection: a crash loop."""

    def connection_made(self, transport: Any) -> None:
        import os

        os._exit(70)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        pass


class HangOnData:
    """Stuck for good in its first data_received: the watchdog's business."""

    def connection_made(self, transport: Any) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        import time

        time.sleep(3600)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        pass


def hang_handle(sock: socket.socket, address: Any) -> None:
    import time

    sock.recv(1)
    time.sleep(3600)
