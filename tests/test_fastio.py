"""The hot loop, over real socket pairs, against both implementations."""

from __future__ import annotations

import errno
import os
import signal
import socket
import struct
import threading
import time

import pytest

from prefork.server.handlers import chargen_pattern
from prefork.server.workers.sync import bound_blocking_waits

from support import tcp_pair

pytestmark = pytest.mark.timeout(30)


def serve_in_thread(func, conn, arg, pass_fd=False):
    """Run ``func(conn, arg)`` in a thread, then half-close ``conn``."""
    result: dict = {}

    def target() -> None:
        try:
            result["value"] = func(conn.fileno() if pass_fd else conn, arg)
        except BaseException as exc:
            result["error"] = exc
        finally:
            try:
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


def drive(client: socket.socket, payload: bytes) -> bytes:
    """Send all of payload from a thread, half-close, read until EOF."""
    client.settimeout(20)
    sender = threading.Thread(
        target=lambda: (client.sendall(payload), client.shutdown(socket.SHUT_WR)), daemon=True
    )
    sender.start()
    received = bytearray()
    while chunk := client.recv(1 << 16):
        received += chunk
    sender.join(20)
    return bytes(received)


# -- echo ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "bufsize"),
    [(1, 1), (1000, 1), (65536, 7), (1000, 65536), (65536, 65536), (1 << 20, 7), (1 << 20, 65536)],
)
def test_echo_is_byte_exact_and_counts(impl, size, bufsize):
    payload = os.urandom(size)
    client, server = socket.socketpair()
    with client, server:
        thread, result = serve_in_thread(impl.echo, server, bytearray(bufsize))
        assert drive(client, payload) == payload
        thread.join(20)
    assert result == {"value": (size, size)}


def test_echo_over_tcp_with_fd_argument(impl):
    payload = os.urandom(300_000)
    client, server = tcp_pair()
    with client, server:
        thread, result = serve_in_thread(impl.echo, server, bytearray(4096), pass_fd=True)
        assert drive(client, payload) == payload
        thread.join(20)
    assert result == {"value": (len(payload), len(payload))}


def test_echo_of_nothing_returns_zero(impl):
    client, server = socket.socketpair()
    with client, server:
        client.shutdown(socket.SHUT_WR)
        assert impl.echo(server, bytearray(16)) == (0, 0)


def test_echo_accepts_memoryview_buffer(impl):
    client, server = socket.socketpair()
    with client, server:
        client.sendall(b"abc")
        client.shutdown(socket.SHUT_WR)
        assert impl.echo(server, memoryview(bytearray(2))) == (3, 3)
        assert client.recv(10) == b"abc"


# -- discard, chargen, sendall --------------------------------------------------------


def test_discard_reads_everything_and_sends_nothing(impl):
    client, server = socket.socketpair()
    with client, server:
        thread, result = serve_in_thread(impl.discard, server, bytearray(1000))
        assert drive(client, b"x" * 123_456) == b""
        thread.join(20)
    assert result == {"value": (123_456, 0)}


def test_chargen_sends_the_rotating_stream_until_peer_closes(impl):
    pattern = chargen_pattern(periods=1)
    client, server = socket.socketpair()
    with server:
        thread, result = serve_in_thread(impl.chargen, server, pattern)
        received = bytearray()
        client.settimeout(10)
        while len(received) < 3 * len(pattern) + 100:
            received += client.recv(65536)
        client.close()
        thread.join(20)
    periods = len(received) // len(pattern) + 1
    assert bytes(received) == (pattern * periods)[: len(received)]
    assert "error" not in result
    nin, nout = result["value"]
    assert nin == 0 and nout >= len(received)


def test_chargen_ends_normally_on_reset(impl):
    client, server = tcp_pair()
    with server:
        thread, result = serve_in_thread(impl.chargen, server, b"ab")
        client.settimeout(10)
        assert client.recv(2) in (b"a", b"ab")
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        thread.join(20)
    assert result["value"][0] == 0


@pytest.mark.parametrize("data", [b"", b"hello", bytearray(b"x" * 200_000), memoryview(b"mv")])
def test_sendall_sends_everything(impl, data):
    client, server = socket.socketpair()
    with client, server:
        thread, result = serve_in_thread(impl.sendall, server, data)
        assert drive(client, b"") == bytes(data)
        thread.join(20)
    assert result == {"value": len(data)}


# -- accept ---------------------------------------------------------------------------


def test_accept_returns_none_when_nothing_waits(impl):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        assert impl.accept(listener) is None


def test_accept_returns_a_blocking_cloexec_descriptor(impl):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        with socket.create_connection(listener.getsockname()) as client:
            fd = None
            deadline = time.monotonic() + 5
            while fd is None and time.monotonic() < deadline:
                fd = impl.accept(listener.fileno())
            assert isinstance(fd, int)
            try:
                assert os.get_blocking(fd)
                assert not os.get_inheritable(fd)
                client.sendall(b"ping")
                client.shutdown(socket.SHUT_WR)
                assert impl.echo(fd, bytearray(64)) == (4, 4)
                assert client.recv(16) == b"ping"
            finally:
                os.close(fd)


def test_accept_blocks_on_a_blocking_listener(impl):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        timer = threading.Timer(0.2, lambda: socket.create_connection(listener.getsockname()))
        timer.start()
        fd = impl.accept(listener)
        timer.join()
        assert isinstance(fd, int)
        os.close(fd)


def test_accept_reports_other_errors(impl):
    with socket.socket() as unbound:  # not listening: EINVAL
        with pytest.raises(OSError) as info:
            impl.accept(unbound)
    assert info.value.errno == errno.EINVAL


# -- argument and descriptor errors ----------------------------------------------------


def _call(impl, name, fd):
    args = {
        "echo": bytearray(8),
        "discard": bytearray(8),
        "chargen": b"x",
        "sendall": b"data",
    }
    if name == "accept":
        return impl.accept(fd)
    return getattr(impl, name)(fd, args[name])


NAMES = ["accept", "echo", "discard", "chargen", "sendall"]


@pytest.mark.parametrize("name", NAMES)
def test_bad_descriptor_raises_ebadf(impl, name):
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(OSError) as info:
        _call(impl, name, r)
    assert type(info.value) is OSError and info.value.errno == errno.EBADF


@pytest.mark.parametrize("name", NAMES)
def test_non_socket_descriptor_raises_enotsock(impl, name):
    r, w = os.pipe()
    try:
        with pytest.raises(OSError) as info:
            _call(impl, name, r)
        assert info.value.errno == errno.ENOTSOCK
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("name", NAMES)
def test_negative_descriptor_is_a_value_error(impl, name):
    with pytest.raises(ValueError, match="negative file descriptor"):
        _call(impl, name, -1)


@pytest.mark.parametrize("name", ["echo", "discard"])
def test_buffer_must_be_writable_and_not_empty(impl, name):
    func = getattr(impl, name)
    with pytest.raises(ValueError, match="must not be empty"):
        func(999_999, bytearray(0))  # checked before the descriptor
    with pytest.raises(TypeError, match="writable"):
        func(999_999, b"read-only")


def test_chargen_pattern_must_not_be_empty(impl):
    with pytest.raises(ValueError):
        impl.chargen(999_999, b"")


# -- peers that misbehave --------------------------------------------------------------


def test_peer_reset_raises_connection_reset(impl):
    client, server = tcp_pair()
    with server:
        client.sendall(b"hello")
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # The server echoes "hello", then blocks; the reset arrives while it waits.
        thread, result = serve_in_thread(impl.echo, server, bytearray(64))
        client.settimeout(10)
        assert client.recv(5) == b"hello"
        client.close()
        thread.join(20)
    assert isinstance(result["error"], ConnectionResetError)


def test_peer_closed_before_reading_raises_broken_pipe(impl):
    client, server = socket.socketpair()
    with server:
        client.sendall(b"never read back")
        client.close()
        with pytest.raises(BrokenPipeError):
            impl.echo(server, bytearray(64))


def test_non_blocking_socket_raises_blocking_io_error(impl):
    client, server = socket.socketpair()
    with client, server:
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            impl.echo(server, bytearray(64))


# -- signals ----------------------------------------------------------------------------


def _blocked_sender(client: socket.socket, payload: bytes, delay: float) -> threading.Thread:
    """A sender thread that cannot take SIGALRM, so EINTR hits the main thread."""

    def send() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(delay)
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def test_signals_interrupting_the_loop_run_handlers_and_resume(impl):
    calls = []
    old = signal.signal(signal.SIGALRM, lambda *_: calls.append(1))
    client, server = socket.socketpair()
    try:
        sender = _blocked_sender(client, b"z" * 5000, delay=0.5)
        signal.setitimer(signal.ITIMER_REAL, 0.02, 0.02)
        result = impl.echo(server, bytearray(100))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    sender.join(10)
    assert result == (5000, 5000)
    assert len(calls) >= 5
    client.settimeout(5)
    received = bytearray()
    while len(received) < 5000:
        received += client.recv(65536)
    assert received == b"z" * 5000
    client.close()
    server.close()


class Stop(Exception):
    pass


def test_exception_from_a_signal_handler_leaves_the_loop(impl):
    def handler(*_):
        raise Stop

    old = signal.signal(signal.SIGALRM, handler)
    client, server = socket.socketpair()
    try:
        sender = _blocked_sender(client, b"late", delay=3.0)
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        started = time.monotonic()
        with pytest.raises(Stop):
            impl.echo(server, bytearray(100))
        assert time.monotonic() - started < 2.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    sender.join(10)
    client.close()
    server.close()


def _signal_elsewhere(signum: int, delay: float, client: socket.socket) -> threading.Thread:
    """A thread that takes ``signum`` itself: CPython's C handler runs there
    and marks the Python handler pending, but the main thread's blocking
    call is not interrupted, as when the signal lands between two of the
    loop's calls. If the loop still runs after 5 s, the thread closes the
    client, which ends it without the handler (so the test fails)."""

    def run() -> None:
        time.sleep(delay)
        signal.pthread_kill(threading.get_ident(), signum)
        time.sleep(5)
        client.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("service", ["echo", "discard", "chargen"])
def test_a_pending_signal_runs_its_handler_when_the_wait_times_out(impl, service):
    def handler(*_):
        raise Stop

    old = signal.signal(signal.SIGUSR2, handler)
    client, server = socket.socketpair()
    try:
        bound_blocking_waits(server.fileno(), 0.05)
        thread = _signal_elsewhere(signal.SIGUSR2, 0.2, client)
        with pytest.raises(Stop):
            if service == "chargen":  # the client never reads: the send blocks
                impl.chargen(server, chargen_pattern())
            else:
                getattr(impl, service)(server, bytearray(100))
    finally:
        signal.signal(signal.SIGUSR2, old)
        client.close()
        server.close()
    thread.join(10)


def test_an_expired_timeout_without_a_signal_keeps_waiting_and_loses_nothing(impl):
    client, server = socket.socketpair()
    with client, server:
        # A small send buffer and a client that reads late: sends time out
        # with part of a chunk sent, receives time out while it sleeps.
        server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        bound_blocking_waits(server.fileno(), 0.02)
        payload = os.urandom(300_000)
        received = bytearray()

        def talk() -> None:
            time.sleep(0.2)
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)

        def read() -> None:
            time.sleep(0.3)
            client.settimeout(10)
            while chunk := client.recv(65536):
                received.extend(chunk)

        threads = [threading.Thread(target=f, daemon=True) for f in (talk, read)]
        for thread in threads:
            thread.start()
        result = impl.echo(server, bytearray(65536))
        server.shutdown(socket.SHUT_WR)
        for thread in threads:
            thread.join(10)
    assert result == (len(payload), len(payload))
    assert bytes(received) == payload
