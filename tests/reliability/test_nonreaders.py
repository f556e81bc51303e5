"""Clients that send a lot and never read, until they finally do.

What a user is owed: backpressure instead of memory. A connection owes its
peer at most --max-buffer and is not read while it owes anything, so the
server tree's memory grows by at most clients x --max-buffer (and the
allocator's rounding, support.owed_memory_bound) however much the clients
push, beyond what it moves by anyway with the same clients reading (measured
first); and when the clients read at last, every byte comes back intact and
in order.
"""

from __future__ import annotations

import selectors
import socket
import threading
import time

from harness import Stream, rss_bytes, scaled, timeout
from support import exchange, owed_memory_bound

CLIENTS = scaled(4, 32)
WORKERS = 2
MAX_CONNECTIONS = 16
MAX_BUFFER = 64 * 1024
CLIENT_BUFFER = 64 << 10  # each way; Linux doubles it for bookkeeping


def tcp_buffer_max(name: str) -> int:
    """The autotuning ceiling of one TCP buffer (tcp_rmem / tcp_wmem, third field)."""
    with open(f"/proc/sys/net/ipv4/{name}") as f:
        return int(f.read().split()[2])


# What the kernel alone can hold of one connection's bytes, however the
# server behaves: the worker's receive queue (autotuned up to tcp_rmem's
# ceiling: 32 MiB on this machine, so it once held a whole 16 MiB share and
# the client never stalled), its send queue (up to tcp_wmem's), and the
# client's own two buffers. A share twice the sum, plus what the server may
# owe, is sure to meet the backpressure.
KERNEL_SHARE = tcp_buffer_max("tcp_rmem") + tcp_buffer_max("tcp_wmem") + 2 * 2 * CLIENT_BUFFER
SHARE = 2 * (KERNEL_SHARE + MAX_BUFFER)
SEND = 256 * 1024
READING_SHARE = 4 << 20  # per client, for the baseline: read as it comes back


def tree_rss(server) -> int:
    return rss_bytes(server.pid) + sum(rss_bytes(pid) for pid in server.workers())


class Sampler:
    """The server tree's largest RSS, sampled every 20 ms in a thread."""

    def __init__(self, server) -> None:
        self.server = server
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, tree_rss(self.server))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.peak


def open_clients(server) -> list[socket.socket]:
    socks = [server.connect(timeout=30) for _ in range(CLIENTS)]
    for sock in socks:  # small client buffers: the kernel's share must not hide the server's
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CLIENT_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_BUFFER)
    return socks


def push_without_reading(socks, streams, sent) -> bool:
    """Send until every client is stuck (no progress for 0.5 s), bounded in
    time; say whether they got stuck (rather than the time running out)."""
    for sock in socks:
        sock.setblocking(False)
    deadline = time.monotonic() + scaled(30, 60)
    last_progress = time.monotonic()
    while time.monotonic() - last_progress < 0.5:
        if time.monotonic() > deadline:
            return False
        progressed = False
        for i, sock in enumerate(socks):
            if sent[i] >= SHARE:
                continue
            try:
                n = sock.send(streams[i].at(sent[i], min(SEND, SHARE - sent[i])))
            except BlockingIOError:
                continue
            sent[i] += n
            progressed = True
        if progressed:
            last_progress = time.monotonic()
        else:
            time.sleep(0.01)
    return True


def drain(socks, streams, sent, share: int = SHARE) -> list[int]:
    """Now read: send the rest of ``share``, half-close, check everything that comes back."""
    received = [0] * len(socks)
    sel = selectors.DefaultSelector()
    for i, sock in enumerate(socks):
        sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, i)
    open_count = len(socks)
    deadline = time.monotonic() + scaled(60, 400)
    while open_count and time.monotonic() < deadline:
        for key, mask in sel.select(1.0):
            i, sock = key.data, key.fileobj
            if mask & selectors.EVENT_WRITE:
                try:
                    sent[i] += sock.send(streams[i].at(sent[i], min(SEND, share - sent[i])))
                except BlockingIOError:
                    pass
                if sent[i] >= share:
                    sock.shutdown(socket.SHUT_WR)
                    sel.modify(sock, selectors.EVENT_READ, i)
            if mask & selectors.EVENT_READ:
                try:
                    data = sock.recv(1 << 20)
                except BlockingIOError:
                    continue
                if not data:
                    sel.unregister(sock)
                    open_count -= 1
                    continue
                assert data == streams[i].at(received[i], len(data)), (
                    f"client {i}: echo differs at byte {received[i]}"
                )
                received[i] += len(data)
    sel.close()
    assert not open_count, f"{open_count} clients still waiting for their echo"
    return received


@timeout(90, 600)
def test_clients_that_never_read_get_backpressure_not_memory(server_factory):
    server = server_factory(
        "-w",
        str(WORKERS),
        "-k",
        "event",
        "--max-buffer",
        str(MAX_BUFFER),
        "--max-connections",
        str(MAX_CONNECTIONS),
    )
    server.wait_workers(WORKERS)
    for _ in range(2 * WORKERS):  # every worker has echoed a few MiB: buffers exist
        with server.connect() as sock:
            data = Stream(0).at(0, 4 << 20)
            assert exchange(sock, data) == data
    time.sleep(0.3)
    streams = [Stream(4099 * i) for i in range(CLIENTS)]
    # The measured baseline: how far the tree's RSS moves while as many
    # clients push the same way but read as they go (allocator churn, the
    # ticks' bookkeeping, what is owed for a moment between two reads).
    start = tree_rss(server)
    sampler = Sampler(server)
    readers = open_clients(server)
    try:
        assert drain(readers, streams, [0] * CLIENTS, READING_SHARE) == [READING_SHARE] * CLIENTS
    finally:
        drift = max(0, sampler.stop() - start)
        for sock in readers:
            sock.close()
    time.sleep(0.3)
    baseline = tree_rss(server)
    sampler = Sampler(server)
    socks = open_clients(server)
    sent = [0] * CLIENTS
    try:
        stuck = push_without_reading(socks, streams, sent)
        stalled = sum(n < SHARE for n in sent)
        pushed = sum(sent)
        stuck_growth = tree_rss(server) - baseline
        received = drain(socks, streams, sent)
    finally:
        peak = sampler.stop()
        for sock in socks:
            sock.close()
    bound = owed_memory_bound(CLIENTS, MAX_BUFFER) + drift
    print(
        f"\n{CLIENTS} clients pushed {pushed >> 20} MiB before they read; "
        f"{stalled} were stalled; RSS +{stuck_growth >> 10} KiB while stalled, "
        f"peak +{(peak - baseline) >> 10} KiB over {baseline >> 20} MiB (bound {bound >> 10} KiB: "
        f"{CLIENTS} x --max-buffer and rounding, + {drift >> 10} KiB measured with readers)"
    )
    assert stuck, f"the clients were still sending after {scaled(30, 60)} s: {sent}"
    assert stalled == CLIENTS, "some clients were never pushed back: the test proves nothing"
    assert peak - baseline <= bound, (baseline, peak, bound)
    assert received == [SHARE] * CLIENTS
    assert server.workers(), "a worker died"
    assert "Traceback" not in server.log, server.log
