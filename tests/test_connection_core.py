"""The ``-k asyncio`` worker's per-message path (``ConnectionCore``,
``counted_write``, ``StreamCounts``), compiled and pure, on a real asyncio
loop over real socket pairs: what the loop calls for each read, what the
user's protocol calls for each write, and what they count."""

from __future__ import annotations

import array
import asyncio
import socket
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def connection(impl: ModuleType, counts: Any, inner: Any) -> Any:
    """A stream connection built on ``impl``'s core, as the worker builds one."""

    class Transport(asyncio.Transport):
        __slots__ = ("_conn",)
        write = impl.counted_write

        def close(self) -> None:  # as the worker's: the flag, then the loop's close
            self._conn.closing = True
            self._conn.transport.close()

    class Connection(impl.ConnectionCore, asyncio.Protocol):
        __slots__ = ("failures",)
        data_received = impl.ConnectionCore.stream_received

        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            app = Transport()
            app._conn = self
            self.inner.connection_made(app)

        def fail(self, exc: BaseException) -> None:
            self.failures.append(exc)
            self.error = exc
            self.transport.abort()

        def connection_lost(self, exc: Any) -> None:
            self.inner.connection_lost(exc)

    conn = Connection(counts, inner)
    conn.failures = []
    return conn


class Script(asyncio.Protocol):
    """Replies to each read with what ``reply(data)`` gives (a list of
    buffers, written one by one); may raise."""

    def __init__(self, reply) -> None:
        self.reply = reply
        self.lost = asyncio.get_event_loop_policy().get_event_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        for chunk in self.reply(data):
            self.transport.write(chunk)

    def connection_lost(self, exc: Any) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


def attach(loop: asyncio.AbstractEventLoop, conn: Any) -> socket.socket:
    """Serve ``conn`` on one end of a socket pair; the other end is returned."""
    ours, theirs = socket.socketpair()
    loop.run_until_complete(loop.connect_accepted_socket(lambda: conn, ours))
    return theirs


def exchange(loop: asyncio.AbstractEventLoop, peer: socket.socket, data: bytes, want: int) -> bytes:
    peer.setblocking(False)

    async def talk() -> bytes:
        await loop.sock_sendall(peer, data)
        got = b""
        while len(got) < want:
            chunk = await asyncio.wait_for(loop.sock_recv(peer, 65536), 5)
            if not chunk:
                break
            got += chunk
        return got

    return loop.run_until_complete(talk())


def test_reads_and_writes_are_counted_and_mark_the_connection_active(impl, loop):
    counts = impl.StreamCounts()
    asyncio.set_event_loop(loop)
    conn = connection(impl, counts, Script(lambda data: [data, bytearray(b"!")]))
    peer = attach(loop, conn)
    assert (conn.active, conn.nin, conn.nout) == (False, 0, 0)
    assert exchange(loop, peer, b"hello", 6) == b"hello!"
    assert (counts.bytes_in, counts.bytes_out) == (5, 6)
    assert (conn.nin, conn.nout, conn.active) == (5, 6, True)
    conn.active = False  # what the idle sweep does
    assert exchange(loop, peer, b"x" * 1000, 1001) == b"x" * 1000 + b"!"
    assert (counts.bytes_in, counts.bytes_out, conn.active) == (1005, 1007, True)
    peer.close()


def test_a_buffer_is_counted_by_its_bytes_not_its_items(impl, loop):
    counts = impl.StreamCounts()
    asyncio.set_event_loop(loop)
    words = array.array("I", [1, 2, 3])  # 3 items, 12 bytes
    conn = connection(impl, counts, Script(lambda data: [memoryview(words)]))
    peer = attach(loop, conn)
    assert exchange(loop, peer, b"?", 12) == words.tobytes()
    assert (counts.bytes_out, conn.nout) == (12, 12)
    peer.close()


def test_writes_after_close_are_not_counted(impl, loop):
    counts = impl.StreamCounts()
    asyncio.set_event_loop(loop)

    def reply(data: bytes) -> list[bytes]:
        script.transport.write(b"last")
        script.transport.close()
        return [b"dropped"]  # the loop drops it: so do the counts

    script = Script(reply)
    conn = connection(impl, counts, script)
    peer = attach(loop, conn)
    assert exchange(loop, peer, b"go", 100) == b"last"
    assert (counts.bytes_out, conn.nout) == (4, 4)
    peer.close()


def test_a_handler_that_raises_ends_only_its_connection(impl, loop):
    counts = impl.StreamCounts()
    asyncio.set_event_loop(loop)

    def reply(data: bytes) -> list[bytes]:
        if data.startswith(b"boom"):
            raise ValueError("boom")
        return [data]

    bad = connection(impl, counts, Script(reply))
    good = connection(impl, counts, Script(reply))
    bad_peer, good_peer = attach(loop, bad), attach(loop, good)
    assert exchange(loop, bad_peer, b"boom", 1) == b""  # aborted
    assert [type(exc) for exc in bad.failures] == [ValueError]
    assert exchange(loop, good_peer, b"fine", 4) == b"fine"
    assert good.failures == [] and counts.bytes_in == 8
    bad_peer.close()
    good_peer.close()


def test_buffered_updates_count_and_stop_after_a_failure(impl):
    class Inner:
        def __init__(self) -> None:
            self.updates: list[int] = []

        def buffer_updated(self, nbytes: int) -> None:
            if nbytes == 13:
                raise RuntimeError("unlucky")
            self.updates.append(nbytes)

    class Connection(impl.ConnectionCore):
        __slots__ = ("failures",)

        def fail(self, exc: BaseException) -> None:
            self.failures.append(exc)
            self.error = exc

    counts = impl.StreamCounts()
    inner = Inner()
    conn = Connection(counts, inner)
    conn.failures = []
    conn.buffered_update(7)
    assert (counts.bytes_in, conn.nin, conn.active, inner.updates) == (7, 7, True, [7])
    conn.buffered_update(13)
    assert [type(exc) for exc in conn.failures] == [RuntimeError]
    conn.buffered_update(5)  # the connection is failing: read into a stand-in, not counted
    assert (counts.bytes_in, inner.updates) == (20, [7])


def test_a_core_without_fail_says_so(impl):
    class Raises:
        def data_received(self, data: bytes) -> None:
            raise ValueError("x")

    core = impl.ConnectionCore(impl.StreamCounts(), Raises())
    with pytest.raises(NotImplementedError):
        core.stream_received(b"a")
