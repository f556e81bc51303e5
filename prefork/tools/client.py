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

``-e TEXT`` is a request: it needs a reply. No reply within ``timeout``
(a hung handler, ``discard``), or a close without one (a handler that
raised, a worker killed), is a ``ClientError``; so is, with ``--expect``, a
reply other than the text expected (the client stops waiting as soon as the
reply is settled either way). That makes ``prefork client -e ping --expect
ping`` a health check.

TLS (``--tls``): the handshake first, within ``timeout``, verifying the
server's certificate against ``--ca-certs`` (or the system's CAs) and the
name (``--sni``, else the host), unless ``--insecure``. The end of input
half-closes the TCP connection under TLS rather than sending close_notify:
Python's ``ssl`` cannot send one and go on reading, and the replies still
have to come. Decrypted bytes OpenSSL holds are read before waiting again
(``select`` cannot see them).

Errors (refused, reset, unresolvable, no reply, the wrong reply, a failed
handshake) raise ``ClientError``: one line, exit 1.
"""

from __future__ import annotations

import argparse
import errno
import os
import select
import socket
import ssl
import sys
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any, BinaryIO

from prefork._loadgen_common import MAX_DATAGRAM  # longer lines are split
from prefork.errors import EXIT_FAILURE, EXIT_OK, ClientError, ConfigError
from prefork.settings import Address, parse_address, parse_seconds

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


def reason(exc: OSError) -> str:
    """An OSError in a few lower-case words, without its ``[Errno N]``."""
    known = _REASONS.get(exc.errno or 0)
    if known is not None:
        return known
    text = exc.strerror or str(exc) or type(exc).__name__
    return text[:1].lower() + text[1:]


def _error(address: Address, exc: OSError) -> ClientError:
    if isinstance(exc, socket.gaierror):
        return ClientError(f"{address}: cannot resolve host: {exc.strerror}")
    return ClientError(f"{address}: {reason(exc)}")


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


SHOWN = 60  # bytes of a wrong reply quoted in the error


class Reply:
    """What came back: how many bytes, and the first ``keep`` of them."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.size = 0
        self.head = bytearray()

    def add(self, data: bytes) -> None:
        self.size += len(data)
        room = self.keep - len(self.head)
        if room > 0:
            self.head += data[:room]

    def __str__(self) -> str:
        """The reply as one line of text (Python's escapes), cut short if long."""
        shown = bytes(self.head[:SHOWN])
        text = repr(shown.decode("utf-8", "backslashreplace"))
        if self.size > len(shown):
            text += f"... ({self.size:,} bytes received)"
        return text


class Expect:
    """``--expect TEXT``: the reply must be TEXT, TEXT\\n or TEXT\\r\\n."""

    def __init__(self, text: bytes) -> None:
        self.text = text
        self.lines = (text + b"\n", text + b"\r\n")

    def matches(self, reply: Reply) -> bool:
        head = bytes(reply.head)
        return reply.size == len(head) and (head == self.text or head in self.lines)

    def settled(self, reply: Reply) -> bool:
        """No need to wait for more: the reply is a whole expected line, or it
        can no longer become one."""
        head = bytes(reply.head)
        if reply.size != len(head) or reply.size > len(self.lines[1]):
            return True
        if head in self.lines:
            return True
        return not any(form.startswith(head) for form in (self.text, *self.lines))

    def keep(self) -> int:
        """Bytes of a reply to keep: enough to compare, and to quote."""
        return max(len(self.lines[1]), SHOWN) + 1


# How a stream conversation ended (``talk_stream``).
CLOSED_FIRST = "closed first"  # the server closed before the input ended


def handshake(
    sock: socket.socket,
    address: Address,
    tls: tuple[ssl.SSLContext, str | None],
    timeout: float | None,
) -> ssl.SSLSocket:
    """The TLS handshake on a connected socket, within ``timeout``, or ClientError."""
    context, name = tls
    if name is None and address.kind == "tcp":
        name = address.host
    sock.settimeout(timeout)
    try:
        wrapped = context.wrap_socket(sock, server_hostname=name)
    except ssl.SSLCertVerificationError as exc:
        raise ClientError(f"{address}: TLS: {exc.verify_message or exc.reason}") from None
    except ssl.SSLError as exc:
        raise ClientError(f"{address}: TLS handshake failed: {exc.reason or exc}") from None
    except OSError as exc:
        if isinstance(exc, TimeoutError) and exc.errno is None:
            raise ClientError(f"{address}: TLS handshake timed out after {timeout:g} s") from None
        raise _error(address, exc) from None
    wrapped.settimeout(None)
    return wrapped


CLOSED = "closed"  # the server closed after the end of input
TIMED_OUT = "timed out"  # the server did not close within ``timeout`` of the end of input
SETTLED = "settled"  # ``settled()`` said the reply needs no more waiting


def talk_stream(
    sock: socket.socket,
    out: BinaryIO,
    stdin: int | None,
    message: bytes = b"",
    timeout: float | None = DEFAULT_TIMEOUT,
    reply: Reply | None = None,
    settled: Callable[[], bool] | None = None,
) -> str:
    """Send ``message`` then standard input (the descriptor ``stdin``, or None
    for no input), printing every byte received (and adding it to ``reply``).
    Returns how it ended: ``CLOSED_FIRST``, ``CLOSED``, ``TIMED_OUT`` (no
    close within ``timeout`` seconds of the end of input), or ``SETTLED``
    (``settled()``, asked after each chunk received, said so)."""
    sock.setblocking(False)
    pending = memoryview(message)  # not yet sent: the message, then a chunk of input at most
    reading = stdin is not None
    deadline: float | None = None  # set when the sending side is shut down
    finished = False  # the sending side is shut down

    def finish() -> float | None:
        try:
            # Under TLS too (socket.socket's, not SSLSocket's, which would
            # drop the TLS layer and leave the replies unreadable).
            socket.socket.shutdown(sock, socket.SHUT_WR)
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
        held = isinstance(sock, ssl.SSLSocket) and sock.pending() > 0
        ready, writable, _ = select.select(readers, writers, [], 0 if held else _wait(deadline))
        if held:
            ready.append(sock)
        if not ready and not writable:
            return TIMED_OUT
        if sock in ready:
            try:
                data = sock.recv(CHUNK)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                continue  # a TLS record not yet whole
            if not data:
                return CLOSED if finished else CLOSED_FIRST
            _write(out, data)
            if reply is not None:
                reply.add(data)
                if settled is not None and settled():
                    return SETTLED
        if writable:
            try:
                pending = pending[sock.send(pending) :]
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                pass  # the room select() saw is gone, or TLS wants a read first: wait again
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
    reply: Reply | None = None,
) -> tuple[int, int]:
    """Send each of ``messages``, then each line of standard input, as one
    datagram, printing every datagram received (and adding it to ``reply``).
    Returns (datagrams sent, replies received).

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
            data = sock.recv(DATAGRAM_SIZE)
            _write(out, data)
            if reply is not None:
                reply.add(data)
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


EXIT_STATUS = (
    "Exit status: 0 when the reply came (with --expect, the one expected) or, without -e, "
    "at the end of input; 1 when no reply came within --timeout, the server closed without "
    "one, the reply was not --expect's, or the connection failed (refused, reset, "
    "unresolvable); 2 for a bad command line; 130 on Ctrl-C. A health check reads 0 as "
    "healthy and 1 as not."
)


def add_parser(commands: Any) -> None:
    """The ``client`` subcommand, on ``commands`` (argparse's subparsers action)."""
    client = commands.add_parser(
        "client",
        help="send lines to a server and print the replies",
        description="Send each line of standard input (or -e TEXT) to a server and print "
        "what comes back. " + EXIT_STATUS,
    )
    client.add_argument(
        "address", metavar="ADDRESS", help="HOST:PORT, [V6ADDR]:PORT, unix:PATH or udp://HOST:PORT"
    )
    client.add_argument(
        "-u", "--udp", action="store_true", help="datagrams: the same as udp://HOST:PORT"
    )
    client.add_argument(
        "-e",
        "--send",
        metavar="TEXT",
        help="send TEXT and a newline, print the reply, exit; no reply is an error",
    )
    client.add_argument(
        "-n", "--no-newline", action="store_true", help="with -e: send TEXT without a newline"
    )
    client.add_argument(
        "--expect",
        metavar="TEXT",
        help="with -e: exit 1 unless the reply is TEXT (a newline or CRLF after it is allowed)",
    )
    add_tls_arguments(client)
    client.add_argument(
        "--timeout",
        metavar="S",
        default=str(DEFAULT_TIMEOUT),
        help=f"seconds to connect, and to wait for the replies after the end of input "
        f"(default {DEFAULT_TIMEOUT:g}; 0 = no limit)",
    )


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """--tls, --ca-certs, --insecure and --sni (``prefork client`` and ``prefork bench``)."""
    parser.add_argument(
        "--tls", action="store_true", help="TLS: verify the server's certificate and name"
    )
    parser.add_argument(
        "--ca-certs", metavar="FILE", help="with --tls: the CAs to trust (default: the system's)"
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="with --tls: do not verify the server's certificate (testing only)",
    )
    parser.add_argument(
        "--sni", metavar="NAME", help="with --tls: the server name to ask for and verify"
    )


def run(args: argparse.Namespace) -> int:
    """The ``prefork client`` command: its exit status, or raise ClientError or ConfigError."""
    timeout = parse_seconds(args.timeout, "--timeout") or None
    tls = client_tls(args.tls, args.ca_certs, args.insecure, args.sni)
    return talk(args.address, args.udp, args.send, not args.no_newline, timeout, args.expect, tls)


def client_tls(
    on: bool, ca_certs: str | None, insecure: bool, sni: str | None
) -> tuple[ssl.SSLContext, str | None] | None:
    """The client's TLS context and server name, or None without --tls;
    ConfigError (exit 2) for options that need --tls, ClientError (exit 1)
    for a CA file that does not load."""
    if not on:
        for option, given in (("--ca-certs", ca_certs), ("--insecure", insecure), ("--sni", sni)):
            if given:
                raise ConfigError(f"{option}: only with --tls")
        return None
    if insecure and ca_certs is not None:
        raise ConfigError("--insecure: not with --ca-certs (it would not be checked)")
    if insecure:
        # No CA is loaded: OpenSSL checks the chain against the context's
        # store even when it does not verify, and with the system's CAs
        # loaded a handshake cost the client 1.4x the CPU (measured).
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        try:
            context = ssl.create_default_context(cafile=ca_certs)
        except OSError as exc:  # ssl.SSLError too
            why = "no PEM certificate in it" if isinstance(exc, ssl.SSLError) else exc.strerror
            raise ClientError(f"--ca-certs {ca_certs}: {why or exc}") from None
    context.options |= ssl.OP_IGNORE_UNEXPECTED_EOF  # a server that closes without close_notify
    return context, sni


def talk(
    text: str,
    udp: bool = False,
    send: str | None = None,
    newline: bool = True,
    timeout: float | None = DEFAULT_TIMEOUT,
    expect_text: str | None = None,
    tls: tuple[ssl.SSLContext, str | None] | None = None,
) -> int:
    """Connect to ``text`` and talk: exit 0, or raise ClientError or ConfigError."""
    address = target_address(text, udp)
    if tls is not None and address.kind == "udp":
        raise ConfigError("--tls: TLS is for streams (no DTLS)")
    if not newline and send is None:
        raise ConfigError("-n/--no-newline: only with -e TEXT")
    if expect_text is not None and send is None:
        raise ConfigError("--expect: only with -e TEXT")
    message = None
    if send is not None:
        message = os.fsencode(send) + (b"\n" if newline else b"")
    expect = None if expect_text is None else Expect(os.fsencode(expect_text))
    reply = None if message is None else Reply(SHOWN + 1 if expect is None else expect.keep())
    stdin = None
    if message is None and sys.stdin is not None:
        stdin = sys.stdin.fileno()
    out = sys.stdout.buffer
    waited = "no limit" if timeout is None else f"{timeout:g} s"
    with connect(address, timeout) as plain:
        sock = plain if tls is None else handshake(plain, address, tls, timeout)
        if stdin is not None and os.isatty(stdin):
            _say(f"connected to {address} (Ctrl-D ends the input, Ctrl-C quits)")
        try:
            if address.kind == "udp":
                sent, received = talk_datagram(
                    sock, out, stdin, None if message is None else [message], timeout, reply
                )
                if received < sent:
                    missing = sent - received
                    raise ClientError(
                        f"{address}: no reply to {missing} of {sent} datagram(s) within {waited}"
                    )
                ended = CLOSED
            else:
                settled = None
                if expect is not None and reply is not None:
                    settled = partial(expect.settled, reply)
                ended = talk_stream(sock, out, stdin, message or b"", timeout, reply, settled)
        except _OutputClosed:
            # Stop quietly, and point stdout at /dev/null so that the flush at
            # interpreter exit does not fail again with a traceback.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, out.fileno())
            os.close(devnull)
            return EXIT_FAILURE
        except OSError as exc:
            raise _error(address, exc) from None
    if reply is not None and reply.size == 0:
        if ended == TIMED_OUT:
            raise ClientError(f"{address}: no reply within {waited}")
        raise ClientError(f"{address}: the server closed the connection without replying")
    if expect is not None and reply is not None:
        if not expect.matches(reply):
            raise ClientError(
                f"{address}: expected {expect.text.decode('utf-8', 'backslashreplace')!r}, "
                f"the reply was {reply}"
            )
        return EXIT_OK
    if ended == CLOSED_FIRST:
        _say("connection closed by server")
    elif ended == TIMED_OUT:
        _say(f"the server did not close within {waited} of the end of input")
    return EXIT_OK
