"""The classic upper-casing server, two ways.

    prefork serve --handler examples.upper:Upper              # any worker class
    prefork serve -k sync --handler examples.upper:handle     # sync / thread workers

Try it:  printf 'hello\\n' | nc -q1 127.0.0.1 7007   ->  HELLO
"""

from __future__ import annotations

import socket
from typing import Any


class Upper:
    """asyncio-style protocol: every byte comes back upper-cased."""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data.upper())

    def eof_received(self) -> bool:
        return False  # close once everything is sent back

    def connection_lost(self, exc: Exception | None) -> None:
        pass


def handle(sock: socket.socket, address: Any) -> None:
    """socketserver-style blocking handler, as the socket tutorials write it."""
    while data := sock.recv(65536):
        sock.sendall(data.upper())
