"""A line-based chat room: what one client says, every other client reads.

    prefork serve -w 1 --handler examples.chat:Chat

Run it with one worker: the room lives in the worker's memory, so clients
served by different workers would sit in different rooms. Each line a client
sends is shown to the others as ``<name> line``; ``/nick NAME`` changes the
name. Lines are limited to ``MAX_LINE`` bytes; a client that sends longer
ones is disconnected.
"""

from __future__ import annotations

import itertools
from typing import Any

MAX_LINE = 1024
_guest_numbers = itertools.count(1)


class Chat:
    room: set[Chat] = set()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.name = f"guest-{next(_guest_numbers)}"
        self.partial = b""
        self.room.add(self)
        transport.write(f"* you are {self.name}\n".encode())
        self.broadcast(f"* {self.name} joined\n".encode())

    def data_received(self, data: bytes) -> None:
        *lines, self.partial = (self.partial + data).split(b"\n")
        if len(self.partial) > MAX_LINE or any(len(line) > MAX_LINE for line in lines):
            self.transport.write(b"* line too long; bye\n")
            self.transport.close()
            return
        for line in lines:
            self.said(line.rstrip(b"\r"))

    def said(self, line: bytes) -> None:
        if line.startswith(b"/nick "):
            new = line[6:].strip().decode(errors="replace")[:32] or self.name
            self.broadcast(f"* {self.name} is now {new}\n".encode())
            self.name = new
        elif line:
            self.broadcast(b"<" + self.name.encode() + b"> " + line + b"\n")

    def broadcast(self, message: bytes) -> None:
        for member in list(self.room):
            if member is not self:
                member.transport.write(message)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.room.discard(self)
        self.broadcast(f"* {self.name} left\n".encode())
