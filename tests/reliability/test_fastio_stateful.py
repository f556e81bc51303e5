"""Stateful differential fuzzing: hypothesis drives the compiled EventLoop and
its pure-Python twin through the same arbitrary sequence of calls and peer
behaviours, over real sockets, and requires the same observable results.

tests/test_fastio_property.py checks one blocking call per scenario; this
checks sequences: clients connect, send arbitrary chunks, stop reading and
resume, half-close, close, reset; the loop runs in slices and stops
accepting. After every step both loops are run until nothing changes any
more, then compared: every client's received bytes, end-of-file and reset
seen, and the loop's counters. The model checks both against what echo and
discard must do.

PREFORK_SOAK=1 runs many more examples.
"""

from __future__ import annotations

import socket
import struct
import time

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from prefork import _fastio_py, fastio

from harness import BLOCK, scaled

pytestmark = pytest.mark.timeout(scaled(120, 1800))

LINGER_ZERO = struct.pack("ii", 1, 0)
# A client that is not reading may be owed at most this much: comfortably
# inside the kernel's default socket buffers, so what each side accepts never
# depends on timing.
MAX_OUTSTANDING = 32 * 1024
# Sizes from every range that matters: tiny, around a segment, past a read.
SIZES = st.one_of(
    st.integers(1, 100),
    st.integers(1000, 20_000),
    st.sampled_from([1, 511, 512, 513, 1448, 4096, 16384, 20_000]),
)


def payload_at(offset: int, size: int) -> bytes:
    return (BLOCK[offset:] + BLOCK)[:size]


class Client:
    """One logical client, with a socket in each implementation's loop."""

    def __init__(self, socks: list[socket.socket]) -> None:
        self.socks = socks
        self.sent = bytearray()
        self.received = [bytearray() for _ in socks]
        self.eof = [False for _ in socks]
        self.reset = [False for _ in socks]
        self.reading = True
        self.shut = False  # we half-closed
        self.closed = False  # we closed or reset: nothing more to observe

    def outstanding(self) -> int:
        return max(len(self.sent) - min(len(r) for r in self.received), 0)


class Side:
    """One implementation's loop on its own listener."""

    def __init__(self, module, service: str, max_buffer: int) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.listener.setblocking(False)
        self.loop = module.EventLoop(
            [self.listener], service, max_buffer=max_buffer, idle_timeout=0
        )

    def counters(self) -> tuple[int, ...]:
        loop = self.loop
        return (loop.accepted, loop.active, loop.bytes_in, loop.bytes_out, int(loop.accepting))

    def close(self) -> None:
        self.loop.close()
        self.listener.close()


class EventLoopsAgree(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        compiled = fastio.load_compiled()
        if compiled is None:
            pytest.skip("prefork._fastio is not built: nothing to compare the twin against")
        self.modules = [compiled, _fastio_py]
        self.sides: list[Side] = []
        self.clients: list[Client] = []
        self.exact = True  # false once bytes were lost to a close or reset in flight

    @initialize(
        service=st.sampled_from(["echo", "discard"]),
        max_buffer=st.sampled_from([512, 4096, 65536, 256 * 1024]),
        clients=st.integers(1, 3),
    )
    def start(self, service: str, max_buffer: int, clients: int) -> None:
        self.service = service
        self.sides = [Side(module, service, max_buffer) for module in self.modules]
        for _ in range(clients):
            self.connect()

    def teardown(self) -> None:
        for client in self.clients:
            for sock in client.socks:
                sock.close()
        for side in self.sides:
            side.close()

    # -- settling: run both loops until nothing changes ------------------------------

    def _drain(self, client: Client) -> None:
        for i, sock in enumerate(client.socks):
            if client.closed or client.eof[i] or client.reset[i] or not client.reading:
                continue
            while True:
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    break
                except ConnectionResetError:
                    client.reset[i] = True
                    break
                if not data:
                    client.eof[i] = True
                    break
                client.received[i] += data

    def _snapshot(self) -> tuple:
        return tuple(side.counters() for side in self.sides) + tuple(
            (len(c.received[0]), len(c.received[1]), tuple(c.eof), tuple(c.reset))
            for c in self.clients
        )

    def _echo_owed(self) -> bool:
        """An accepted, reading echo client has not had all its echo yet."""
        if self.service != "echo":
            return False
        accepted = self.sides[0].loop.accepted
        return any(
            client.reading
            and not client.closed
            and n < accepted
            and any(
                len(r) < len(client.sent) and not (e or x)
                for r, e, x in zip(client.received, client.eof, client.reset, strict=True)
            )
            for n, client in enumerate(self.clients)
        )

    def settle(self) -> None:
        """Run both loops until nothing changes and no echo is still owed.

        The server does not set TCP_NODELAY, so an echo written while an
        earlier one is unacknowledged can wait for the client's delayed ACK
        (40 ms on loopback): "nothing changed for three turns" alone is not
        settled while echo is owed."""
        stable = 0
        last = None
        deadline = time.monotonic() + 10
        while (stable < 3 or self._echo_owed()) and time.monotonic() < deadline:
            for side in self.sides:
                side.loop.run(0.001)
            for client in self.clients:
                self._drain(client)
            snapshot = self._snapshot()
            stable = stable + 1 if snapshot == last else 0
            last = snapshot
        assert stable >= 3 and not self._echo_owed(), "the loops never settled"

    # -- rules -----------------------------------------------------------------------------

    @precondition(lambda self: len(self.clients) < 12)
    @rule()
    def connect(self) -> None:
        socks = []
        for side in self.sides:
            sock = socket.create_connection(side.listener.getsockname(), timeout=5)
            sock.setblocking(False)
            socks.append(sock)
        self.clients.append(Client(socks))
        self.settle()

    @rule(data=st.data(), size=SIZES, offset=st.integers(0, len(BLOCK) - 1))
    def send(self, data, size: int, offset: int) -> None:
        chunk = payload_at(offset, size)
        open_clients = [c for c in self.clients if not (c.shut or c.closed)]
        if not open_clients:
            return
        client = data.draw(st.sampled_from(open_clients))
        if self.service == "echo" and client.outstanding() + len(chunk) > MAX_OUTSTANDING:
            return  # keep within what the kernel is sure to hold
        for sock in client.socks:
            view = memoryview(chunk)
            deadline = time.monotonic() + 10
            while view and time.monotonic() < deadline:
                try:
                    view = view[sock.send(view) :]
                except BlockingIOError:
                    self.settle()
            assert not view, "could not send within the outstanding budget"
        client.sent += chunk
        self.settle()

    @rule(data=st.data())
    def toggle_reading(self, data) -> None:
        """A client stops reading, or reads again (and catches up)."""
        if self.clients:
            client = data.draw(st.sampled_from(self.clients))
            client.reading = not client.reading
            self.settle()

    @rule(data=st.data())
    def half_close(self, data) -> None:
        candidates = [c for c in self.clients if not (c.shut or c.closed)]
        if candidates:
            client = data.draw(st.sampled_from(candidates))
            for sock in client.socks:
                sock.shutdown(socket.SHUT_WR)
            client.shut = True
            self.settle()

    @rule(data=st.data(), abort=st.booleans())
    def close(self, data, abort: bool) -> None:
        """Close (FIN) or reset (SO_LINGER 0) a client."""
        candidates = [c for c in self.clients if not c.closed]
        if not candidates:
            return
        client = data.draw(st.sampled_from(candidates))
        if client.outstanding():
            self.exact = False  # what was in flight is lost, by design
        for sock in client.socks:
            if abort:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
            sock.close()
        client.closed = True
        self.settle()

    @rule()
    def stop_accepting(self) -> None:
        for side in self.sides:
            side.loop.stop_accepting()
        self.settle()

    @rule(seconds=st.sampled_from([0.0, 0.001, 0.01]))
    def run_slice(self, seconds: float) -> None:
        for side in self.sides:
            side.loop.run(seconds)
        self.settle()

    # -- what both must show -------------------------------------------------------------

    @invariant()
    def same_observations(self) -> None:
        if not self.sides:
            return
        a, b = (side.counters() for side in self.sides)
        if self.exact:
            assert a == b, f"counters differ: compiled {a}, twin {b}"
        else:  # accepted, active and accepting still agree
            assert (a[0], a[1], a[4]) == (b[0], b[1], b[4]), (a, b)
        for n, client in enumerate(self.clients):
            if client.closed:
                continue
            assert client.received[0] == client.received[1], f"client {n}: bytes differ"
            assert client.eof[0] == client.eof[1], f"client {n}: end of file differs"
            assert client.reset[0] == client.reset[1], f"client {n}: reset differs"

    @invariant()
    def matches_the_model(self) -> None:
        if not self.sides:
            return
        accepted, _, bytes_in, bytes_out, _ = self.sides[0].counters()
        for n, client in enumerate(self.clients):
            if client.closed:
                continue
            got = bytes(client.received[0])
            if self.service == "discard":
                assert got == b""
            else:
                assert client.sent.startswith(got), "echo is not a prefix of what was sent"
                if client.reading and n < accepted:  # accepted in connect order
                    assert got == client.sent, f"client {n}: echo incomplete after settling"
            assert not client.reset[0], "the server reset a client that behaved"
        if self.exact:
            served = sum(len(c.sent) for c in self.clients[:accepted])
            assert bytes_in == served, (bytes_in, served)
            assert bytes_out == (served if self.service == "echo" else 0), (bytes_out, served)


EventLoopsAgree.TestCase.settings = settings(
    max_examples=scaled(60, 1000),
    stateful_step_count=scaled(20, 50),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestEventLoopsAgree = EventLoopsAgree.TestCase
