"""``prefork client ADDRESS``: send lines to a server and print what comes back.

How it works: one thread runs one ``select()`` loop over standard input and
the socket, so replies are printed as they arrive, whether or not a line is
being typed. Bytes pass through untouched (standard output is written as
bytes and flushed after every chunk), and memory stays bounded both ways:
standard input is not read while a chunk of it still waits to be sent (a
server that stops reading pushes back on the terminal or the pipe), and each
chunk read from the socket is written out in full before the next read.

Streams (TCP, UNIX sockets): input goes out as it is read, so a line typed
on a terminal leaves with its newline. At the end of input (Ctrl-D, the end
of a pipe, or after ``-e TEXT``) the client shuts down its sending side and
prints what is left until the server closes, at most ``timeout`` seconds.
A server that closes first is reported in one line and is a normal end.

Datagrams (``udp://``, ``--udp``): each input line is one datagram and each
datagram received is printed as it is. At most ``WINDOW`` datagrams wait for
a reply at a time (a pipe must not flood the server), each wait bounded by
``timeout``; replies still missing at the end are an error.

Errors (refused, reset, unresolvable) raise ``ClientError``: one line, exit 1.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import sys
import time
from collections import deque
from typing import BinaryIO

from prefork._loadgen_common import MAX_DATAGRAM  # longer lines are split
from prefork.errors import EXIT_FAILURE, EXIT_OK, ClientError, ConfigError
from prefork.settings import Address, parse_address

CHUNK = 64 * 1024  # bytes per read from standard input or a stream socket
DATAGRAM_SIZE = 65536  # receive buffer: larger than any UDP payload
WINDOW = 64  # datagrams sent and not yet answered, at most
DEFAULT_TIMEOUT = 5.0

_REASONS = {
    errno.ECONNREFUSED: "connection refused",
    errno.ECONNRESET: "connection reset by peer",
    errno.ETIMEDOUT: "connection timed out",
    errno.EHOSTUNREACH: "no route to host",
    errno.ENETUNREACH: "network is unreachable",
    errno.ENOENT: "no such socket file",
    errno.EACCES: "permission denied",
}


def target_address(text: str, udp: bool = False) -> Address:
    """ADDRESS as ``-b`` spells it; ``udp`` turns HOST:PORT into a datagram address."""
    address = parse_address(text, "ADDRESS")
    if udp and address.kind == "unix":
        raise ConfigError(f"--udp: datagrams need HOST:PORT or [V6ADDR]:PORT, got {text!r}")
    if udp:
        address = Address("udp", address.host, address.port)
    if address.kind != "unix" and address.port == 0:
        raise ConfigError(f"ADDRESS: port must be a number from 1 to 65535, got {text!r}")
    return address


def _error(address: Address, exc: OSError) -> ClientError:
    if isinstance(exc, socket.gaierror):
        return ClientError(f"{address}: cannot resolve host: {exc.strerror}")
    reason = _REASONS.get(exc.errno or 0)
    if reason is None:
        text = exc.strerror or str(exc) or type(exc).__name__
        reason = text[:1].lower() + text[1:]
    return ClientError(f"{address}: {reason}")


def connect(address: Address, timeout: float | None) -> socket.socket:
    """A connected socket, or ClientError. ``timeout`` bounds TCP's handshake."""
    try:
        if address.kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(address.path)
            except BaseException:
                sock.close()
                raise
            return sock
        if address.kind == "tcp":
            sock = socket.create_connection((address.host, address.port), timeout=timeout)
            sock.settimeout(None)
            return sock
        # UDP: connect() only fixes the peer, so that an ICMP "port unreachable"
        # comes back as ECONNREFUSED and datagrams from anyone else are dropped.
        family, type_, proto, _, sockaddr = socket.getaddrinfo(
            address.host, address.port, socket.AF_UNSPEC, socket.SOCK_DGRAM
        )[0]
        sock = socket.socket(family, type_, proto)
        try:
            sock.connect(sockaddr)
        except BaseException:
            sock.close()
            raise
        return sock
    except OSError as exc:
        if isinstance(exc, TimeoutError) and exc.errno is None:  # our own timeout
            raise ClientError(f"{address}: connection timed out after {timeout:g} s") from None
        raise _error(address, exc) from None


def _say(text: str) -> None:
    print(f"prefork: {text}", file=sys.stderr, flush=True)


class _OutputClosed(Exception):
    """Whoever read our standard output went away (``| head -1``)."""


def _write(out: BinaryIO, data: bytes) -> None:
    try:
        out.write(data)
        out.flush()
    except BrokenPipeError:
        raise _OutputClosed from None


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _wait(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def talk_stream(
    sock: socket.socket,
    out: BinaryIO,
    stdin: int | None,
    message: bytes = b"",
    timeout: float | None = DEFAULT_TIMEOUT,
) -> bool:
    """Send ``message`` then standard input (the descriptor ``stdin``, or None
    for no input), printing every byte received. Returns True if the server
    closed before the input ended, False if it closed after (or did not close
    within ``timeout`` seconds of the end of input: then it says so)."""
    sock.setblocking(False)
    pending = memoryview(message)  # not yet sent: the message, then a chunk of input at most
    reading = stdin is not None
    deadline: float | None = None  # set when the sending side is shut down
    finished = False  # the sending side is shut down

    def finish() -> float | None:
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:  # already reset: the next recv() says so
            if exc.errno != errno.ENOTCONN:
                raise
        return _deadline(timeout)

    if not pending and not reading:
        deadline, finished = finish(), True
    while True:
        readers: list[int | socket.socket] = [sock]
        if reading and not pending:
            assert stdin is not None
            readers.append(stdin)
        writers = [sock] if pending else []
        ready, writable, _ = select.select(readers, writers, [], _wait(deadline))
        if not ready and not writable:
            _say(f"the server did not close within {timeout:g} s of the end of input")
            return False
        if sock in ready:
            data = sock.recv(CHUNK)
            if not data:
                return not finished
            _write(out, data)
        if writable:
            try:
                pending = pending[sock.send(pending) :]
            except BlockingIOError:  # the room select() saw is gone; wait again
                pass
        if stdin is not None and stdin in ready:
            data = os.read(stdin, CHUNK)
            if data:
                pending = memoryview(data)
            else:
                reading = False
        if not pending and not reading and not finished:
            deadline, finished = finish(), True


def _lines(buffer: bytearray) -> list[bytes]:
    """Take the complete lines (and over-long pieces) off the front of ``buffer``."""
    lines: list[bytes] = []
    while True:
        end = buffer.find(b"\n", 0, MAX_DATAGRAM)
        if end >= 0:
            size = end + 1
        elif len(buffer) >= MAX_DATAGRAM:
            size = MAX_DATAGRAM
        else:
            return lines
        lines.append(bytes(buffer[:size]))
        del buffer[:size]


def talk_datagram(
    sock: socket.socket,
    out: BinaryIO,
    stdin: int | None,
    messages: list[bytes] | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
) -> tuple[int, int]:
    """Send each of ``messages``, then each line of standard input, as one
    datagram, printing every datagram received. Returns (datagrams sent,
    replies received).

    At most ``WINDOW`` datagrams are out without a reply, so a pipe does not
    flood the server's receive buffer. Waiting for a reply is bounded by
    ``timeout`` seconds: then the ones owed count as lost, and at the end of
    input the client stops.
    """
    queue = deque(messages or [])  # lines to send: at most one chunk of input
    partial = bytearray()  # the start of a line: less than MAX_DATAGRAM bytes
    reading = stdin is not None
    sent = received = lost = 0
    deadline: float | None = None  # of the current wait for a reply
    while True:
        while queue and sent - received - lost < WINDOW:
            sock.send(queue.popleft())
            sent += 1
        owed = sent - received - lost
        if owed <= 0 and not queue and not reading:
            return sent, received
        readers: list[int | socket.socket] = [sock]
        if stdin is not None and reading and not queue:
            readers.append(stdin)
        # Only a reply can move things on: the window is full or input ended.
        waiting = owed > 0 and (bool(queue) or not reading)
        if waiting and deadline is None:
            deadline = _deadline(timeout)
        ready, _, _ = select.select(readers, [], [], _wait(deadline) if waiting else None)
        if not ready:
            if not queue:
                return sent, received
            lost, deadline = sent - received, None
        if sock in ready:
            _write(out, sock.recv(DATAGRAM_SIZE))
            received += 1
            deadline = None
        if stdin is not None and stdin in ready:
            data = os.read(stdin, CHUNK)
            partial += data
            queue.extend(_lines(partial))
            if not data:
                reading = False
                if partial:
                    queue.append(bytes(partial))


def run(
    text: str,
    udp: bool = False,
    send: str | None = None,
    newline: bool = True,
    timeout: float | None = DEFAULT_TIMEOUT,
) -> int:
    """The ``prefork client`` command: exit 0, or raise ClientError or ConfigError."""
    address = target_address(text, udp)
    if not newline and send is None:
        raise ConfigError("-n/--no-newline: only with -e TEXT")
    message = None
    if send is not None:
        message = os.fsencode(send) + (b"\n" if newline else b"")
    stdin = None
    if message is None and sys.stdin is not None:
        stdin = sys.stdin.fileno()
    out = sys.stdout.buffer
    with connect(address, timeout) as sock:
        if stdin is not None and os.isatty(stdin):
            _say(f"connected to {address} (Ctrl-D ends the input, Ctrl-C quits)")
        try:
            if address.kind == "udp":
                sent, received = talk_datagram(
                    sock, out, stdin, None if message is None else [message], timeout
                )
                if received < sent:
                    missing = sent - received
                    raise ClientError(
                        f"{address}: no reply to {missing} of {sent} datagram(s) "
                        f"within {timeout:g} s"
                    )
            elif talk_stream(sock, out, stdin, message or b"", timeout):
                _say("connection closed by server")
        except _OutputClosed:
            # Stop quietly, and point stdout at /dev/null so that the flush at
            # interpreter exit does not fail again with a traceback.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, out.fileno())
            os.close(devnull)
            return EXIT_FAILURE
        except OSError as exc:
            raise _error(address, exc) from None
    return EXIT_OK
