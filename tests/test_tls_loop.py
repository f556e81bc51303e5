"""TLS in the event loop itself (the built-in services over OpenSSL on the
socket), both implementations over real sockets: the compiled loop drives
OpenSSL without the GIL, the twin a non-blocking ``ssl.SSLSocket``.

The loop runs in a thread of this process (``run`` releases the GIL in the
compiled loop) and is stopped by a flag it looks at between two runs; its
counters are read once it has stopped.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from prefork.server.handlers import CHARGEN_PATTERN
from prefork.tls import TLSSettings, server_context

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def context(certs: Path) -> ssl.SSLContext:
    return server_context(TLSSettings(str(certs / "server.pem"), str(certs / "server.key")))


@pytest.fixture
def client(certs: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certs / "ca.pem"))


@contextlib.contextmanager
def serving(impl, service: str, context: ssl.SSLContext, **options) -> Iterator:
    """(loop, listener) with the loop running in a thread until the block ends."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    listener.setblocking(False)
    options.setdefault("tls_listeners", [listener])
    if options.pop("proxied", False):
        options.update(proxy_listeners=[listener], proxy_trusted=lambda peer: True)
    if service == "chargen":
        options.setdefault("pattern", CHARGEN_PATTERN)
    loop = impl.EventLoop([listener], service, tls_context=context, **options)
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            loop.run(0.05)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield loop, listener
    finally:
        stop.set()
        thread.join(10)
        loop.close()
        listener.close()


def connect(listener: socket.socket, client: ssl.SSLContext, rcvbuf: int = 0) -> ssl.SSLSocket:
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(30)
    sock.connect(listener.getsockname())
    return client.wrap_socket(sock, server_hostname="localhost")


def echo_exchange(tls: ssl.SSLSocket, payload: bytes, stall: float = 0.0) -> bytes:
    """Send while reading (one thread, select); ``stall`` seconds of not
    reading first, so that the server's sends come up short."""
    tls.setblocking(False)
    pending = memoryview(payload)
    received = bytearray()
    deadline = time.monotonic() + 45
    stall_until = time.monotonic() + stall
    while len(received) < len(payload):
        assert time.monotonic() < deadline, f"{len(received)} of {len(payload)}"
        reading = time.monotonic() >= stall_until
        if not tls.pending():
            select.select([tls] if reading else [], [tls] if pending else [], [], 0.05)
        if pending:
            try:
                pending = pending[tls.send(pending[: 1 << 16]) :]
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                pass
        if reading:
            try:
                chunk = tls.recv(1 << 20)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                continue
            if not chunk:
                break
            received += chunk
    tls.setblocking(True)
    return bytes(received)


@pytest.mark.parametrize("size", [1, 1000, 65537, 3 * 1024 * 1024 + 5])
def test_echo_over_tls_is_byte_exact_and_counted(impl, context, client, size):
    payload = os.urandom(size)
    with serving(impl, "echo", context) as (loop, listener):
        with connect(listener, client) as tls:
            assert echo_exchange(tls, payload) == payload
        assert wait_for(lambda: loop.active == 0)
    assert (loop.accepted, loop.bytes_in, loop.bytes_out) == (1, size, size)  # plaintext


def test_a_read_size_smaller_than_a_record_still_echoes_the_whole_record(impl, context, client):
    """--max-buffer 512 reads 512 plaintext bytes at a time; a 16 KiB record
    is decrypted whole, and the rest OpenSSL holds has no epoll event: the
    loop must read all of it before it waits again."""
    payload = os.urandom(16 * 1024)
    with serving(impl, "echo", context, max_buffer=512) as (loop, listener):
        with connect(listener, client) as tls:
            for _ in range(3):  # ping-pong: the client waits for each echo
                assert echo_exchange(tls, payload) == payload
        assert wait_for(lambda: loop.active == 0)
    assert (loop.bytes_in, loop.bytes_out) == (3 * len(payload), 3 * len(payload))


def test_echo_to_a_stalled_small_buffered_reader_loses_nothing(impl, context, client):
    """Small buffers and a reader that waits: the server's TLS writes come up
    short (WANT_WRITE) and what OpenSSL did not take is offered again."""
    payload = os.urandom(2 * 1024 * 1024)
    with serving(impl, "echo", context) as (loop, listener):
        with connect(listener, client, rcvbuf=4096) as tls:
            assert echo_exchange(tls, payload, stall=0.5) == payload
        assert wait_for(lambda: loop.active == 0)
    assert (loop.bytes_in, loop.bytes_out) == (len(payload), len(payload))


def test_chargen_over_tls_is_the_pattern_through_short_sends(impl, context, client):
    """The stream a slow reader gets is exactly the pattern, cycle after
    cycle: a short TLS send must not restart or skip it."""
    want = 3 * len(CHARGEN_PATTERN) + 12345
    with serving(impl, "chargen", context) as (loop, listener):
        with connect(listener, client, rcvbuf=4096) as tls:
            time.sleep(0.3)  # let the server fill everything and come up short
            received = bytearray()
            while len(received) < want:
                chunk = tls.recv(min(1000, want - len(received)))  # slowly
                assert chunk
                received += chunk
    cycle = CHARGEN_PATTERN * 4
    assert bytes(received) == cycle[:want]


def test_daytime_over_tls_sends_its_line_then_close_notify(impl, context, client):
    with serving(impl, "daytime", context) as (loop, listener):
        with connect(listener, client) as tls:
            line = tls.recv(100)
            assert line.endswith(b"\r\n") and b"UTC" in line
            assert tls.recv(100) == b""  # close_notify: a clean end, not a reset


def test_a_silent_client_is_closed_at_the_handshake_timeout_and_others_are_served(
    impl, context, client
):
    timeout = 1.0
    with serving(impl, "echo", context, tls_handshake_timeout=timeout) as (loop, listener):
        opened = time.monotonic()  # before the connect: the server's deadline is later
        silent = socket.create_connection(listener.getsockname(), timeout=30)
        with connect(listener, client) as tls:
            assert echo_exchange(tls, b"served meanwhile") == b"served meanwhile"
        assert silent.recv(1) == b""
        assert time.monotonic() - opened >= timeout
        silent.close()


@pytest.mark.parametrize(
    "attack",
    [b"GET / HTTP/1.0\r\n\r\n", bytes(range(256)) * 8, b"\x16\x03\x01\x02\x00\x01"],
    ids=["plaintext", "bytes", "truncated"],
)
def test_garbage_ends_only_its_connection(impl, context, client, attack):
    with serving(impl, "echo", context) as (loop, listener):
        with socket.create_connection(listener.getsockname(), timeout=30) as bad:
            try:
                bad.sendall(attack)
                bad.shutdown(socket.SHUT_WR)
                while bad.recv(4096):
                    pass
            except OSError as exc:
                # The server may refuse and close (a reset: unread bytes) before
                # the client is done sending: any step may meet the gone connection.
                assert exc.errno in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN), exc
        with connect(listener, client) as tls:
            assert echo_exchange(tls, b"still here") == b"still here"


def test_a_proxy_header_then_tls(impl, context, client):
    """The header is read exactly: the ClientHello after it is OpenSSL's."""
    payload = os.urandom(50_000)
    with serving(impl, "echo", context, proxied=True) as (loop, listener):
        sock = socket.create_connection(listener.getsockname(), timeout=30)
        sock.sendall(b"PROXY TCP4 192.0.2.1 127.0.0.1 4000 443\r\n")
        with client.wrap_socket(sock, server_hostname="localhost") as tls:
            assert echo_exchange(tls, payload) == payload
        assert wait_for(lambda: loop.active == 0)
    assert (loop.bytes_in, loop.bytes_out) == (len(payload), len(payload))


def test_bad_tls_arguments_are_refused(impl, context):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    with listener:
        with pytest.raises(ValueError, match="built-in services"):
            impl.EventLoop(
                [listener], "protocol", protocol_factory=object, tls_context=context,
                tls_listeners=[listener],
            )  # fmt: skip
        with pytest.raises(TypeError, match="SSLContext"):
            impl.EventLoop([listener], "echo", tls_context=object(), tls_listeners=[listener])
        client_side = ssl.create_default_context()
        with pytest.raises(ValueError, match="server context"):
            impl.EventLoop([listener], "echo", tls_context=client_side, tls_listeners=[listener])
        context.sni_callback = lambda *args: None
        with pytest.raises(ValueError, match="sni_callback"):
            impl.EventLoop([listener], "echo", tls_context=context, tls_listeners=[listener])
        context.sni_callback = None
        with pytest.raises(ValueError, match="> 0"):
            impl.EventLoop(
                [listener], "echo", tls_context=context, tls_listeners=[listener],
                tls_handshake_timeout=0,
            )  # fmt: skip


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_handshakes_per_turn_are_bounded(impl, context, client):
    """A flood of ClientHellos: one turn of the loop takes at most
    TLS_HANDSHAKES_PER_TURN handshake steps (each costs a signature), the
    others wait for the next turns; every one is answered in the end."""
    from prefork._fastio_common import TLS_HANDSHAKES_PER_TURN

    count = 3 * TLS_HANDSHAKES_PER_TURN
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(count)
    listener.setblocking(False)
    loop = impl.EventLoop([listener], "echo", tls_context=context, tls_listeners=[listener])
    socks = []
    try:
        for _ in range(count):
            socks.append(socket.create_connection(listener.getsockname(), timeout=30))
        assert wait_for(lambda: (loop.run(0.01), loop.active)[1] == count)
        for sock in socks:  # a real ClientHello on each, all at once
            bio_in, bio_out = ssl.MemoryBIO(), ssl.MemoryBIO()
            hello = client.wrap_bio(bio_in, bio_out, server_hostname="localhost")
            with pytest.raises(ssl.SSLWantReadError):
                hello.do_handshake()
            sock.sendall(bio_out.read())
        time.sleep(0.2)  # every hello has arrived
        loop.return_soon()  # exactly one turn: return after its events
        loop.run(10)

        def answered() -> int:
            readable, _, _ = select.select(socks, [], [], 0.2)
            return len(readable)

        assert 1 <= answered() <= TLS_HANDSHAKES_PER_TURN
        assert wait_for(lambda: (loop.run(0.01), answered())[1] == count)
    finally:
        for sock in socks:
            sock.close()
        loop.close()
        listener.close()
