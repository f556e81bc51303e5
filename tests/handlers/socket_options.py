"""Handlers that report their connection's TCP_NODELAY, then close."""

from __future__ import annotations

import socket
from typing import Any


def _no_delay(sock: Any) -> bytes:
    return str(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)).encode()


class NoDelay:
    def connection_made(self, transport: Any) -> None:
        transport.write(_no_delay(transport.get_extra_info("socket")))
        transport.close()

    def data_received(self, data: bytes) -> None:
        pass


def no_delay_handle(sock: socket.socket, address: Any) -> None:
    sock.sendall(_no_delay(sock))
