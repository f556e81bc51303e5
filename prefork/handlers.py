"""The built-in handlers: the classic inetd services over TCP.

A handler is called as ``handler(fd, buffer)`` with a connected, blocking
socket descriptor (borrowed: the worker closes it) and the worker's reusable
buffer, and returns ``(bytes_in, bytes_out)``. Each built-in runs on the
hot-loop implementation chosen by ``prefork.fastio``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prefork import fastio

Handler = Callable[[int, Any], tuple[int, int]]


def echo(fd: int, buffer: Any) -> tuple[int, int]:
    """RFC 862: send back every byte received, until the client closes."""
    return fastio.echo(fd, buffer)


def discard(fd: int, buffer: Any) -> tuple[int, int]:
    """RFC 863: read and throw away everything, until the client closes."""
    return fastio.discard(fd, buffer)


def daytime_line(now: float | None = None) -> bytes:
    """RFC 867 leaves the format free; this is its suggested one, in UTC."""
    stamp = time.gmtime(time.time() if now is None else now)
    return time.strftime("%A, %B %d, %Y %H:%M:%S-UTC\r\n", stamp).encode("ascii")


def daytime(fd: int, buffer: Any) -> tuple[int, int]:
    """RFC 867: send the date and time as one line, then close."""
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
