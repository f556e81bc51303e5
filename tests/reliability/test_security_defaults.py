"""Security defaults, checked on the running server rather than in its log.

What a user is owed: started with no -b, the server listens on loopback only
(the kernel's socket table says 127.0.0.1, and nothing on IPv6); a UNIX
socket is never world-writable, even under umask 000; no connection's buffer
grows past --max-buffer whatever the peer does: a protocol that answers each
byte with a thousand to peers that never read owes each of them at most that,
cutting off the connections that would owe more.

Privilege drop is tested where it lives:
tests/test_operations.py::test_workers_run_as_user_and_group_with_no_way_back_to_root
(as root with --user nobody, a worker's os.setuid(0) fails and it has no
capabilities left).
"""

from __future__ import annotations

import contextlib
import os
import stat
import time

import pytest

from harness import rss_bytes, timeout
from support import exchange, handler_env, owed_memory_bound, start_server

pytestmark = timeout(60, 60)

PEERS = 20
LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def listening(table: str, inodes: set[int]) -> list[tuple[str, int]]:
    """(local address in /proc's hex, port) of the listening sockets in
    /proc/net/TABLE that belong to ``inodes``."""
    found = []
    with open(f"/proc/net/{table}") as f:
        next(f)
        for line in f:
            fields = line.split()
            address, state, inode = fields[1], fields[3], int(fields[9])
            if state == LISTEN and inode in inodes:
                host, port = address.split(":")
                found.append((host, int(port, 16)))
    return found


def test_default_bind_is_loopback_only_in_the_kernel_socket_table():
    try:
        server = start_server("-w", "1", any_port=False)
    except AssertionError as exc:
        if "address already in use" in str(exc):
            pytest.skip("port 7007, the default, is taken on this machine")
        raise
    try:
        inodes = socket_inodes(server.pid)
        for worker in server.wait_workers(1):
            inodes |= socket_inodes(worker)
        assert listening("tcp", inodes) == [("0100007F", 7007)]  # 127.0.0.1, little-endian
        assert listening("tcp6", inodes) == [], "the default listens on IPv6 too"
    finally:
        server.kill_all()


def test_unix_socket_is_not_world_writable_even_under_umask_000(server_factory, tmp_path):
    path = tmp_path / "open.sock"
    server_factory("-b", f"unix:{path}", "-w", "1", "--umask", "000")
    mode = stat.S_IMODE(os.stat(path).st_mode)
    assert not mode & 0o007, oct(mode)
    assert mode == 0o660


AMPLIFIER = """
class Amplifier:
    '''Answers every chunk with a thousand copies of it.'''
    def connection_made(self, transport):
        self.transport = transport
    def data_received(self, data):
        for _ in range(1000):  # small writes: no large transient objects
            self.transport.write(data)
    def eof_received(self):
        return False
    def connection_lost(self, exc):
        pass
"""


def test_no_connection_owes_more_than_max_buffer_whatever_the_peer_does(server_factory, tmp_path):
    (tmp_path / "amplifier.py").write_text(AMPLIFIER)
    env = handler_env(tmp_path)
    max_buffer = 64 * 1024
    server = server_factory(
        "-w", "1", "--max-buffer", str(max_buffer), "--handler", "amplifier:Amplifier", env=env
    )
    (worker,) = server.wait_workers(1)

    def readers_get_their_copies() -> None:
        """PEERS peers that read: each sends 16 bytes and reads its thousand
        copies (16 kB, which the kernel's buffers take whole: nothing is owed)."""
        socks = [server.connect() for _ in range(PEERS)]
        try:
            for sock in socks:
                sock.sendall(b"w" * 16)
            for sock in socks:
                got = b""
                while len(got) < 16 * 1000:
                    chunk = sock.recv(1 << 16)
                    assert chunk, "closed before its copies"
                    got += chunk
                assert got == b"w" * (16 * 1000)
        finally:
            for sock in socks:
                sock.close()

    readers_get_their_copies()  # warm-up: every buffer and code path a reader needs
    time.sleep(0.2)
    # The measured baseline: how far the worker's RSS moves when the same
    # number of peers make it do the same work but read (nothing stays owed).
    start = rss_bytes(worker)
    readers_get_their_copies()
    time.sleep(0.2)
    baseline = rss_bytes(worker)
    drift = max(0, baseline - start)

    peers = []
    try:
        for _ in range(PEERS):  # peers that never read, each asking for 256 MiB back
            sock = server.connect()
            sock.setblocking(False)
            sent = 0
            with contextlib.suppress(BlockingIOError, ConnectionError):
                while sent < 256 * 1024:
                    sent += sock.send(b"x" * 1024)
            peers.append(sock)
        time.sleep(1.0)
        growth = rss_bytes(worker) - baseline
    finally:
        for sock in peers:
            sock.close()
    cut = server.log.count("owed to the peer; closing")
    # Each connection owes at most max_buffer: when a write would owe more, the
    # connection is cut (logged); below that it waits, not read meanwhile.
    bound = owed_memory_bound(PEERS, max_buffer) + drift
    print(
        f"\n{PEERS} non-readers: worker RSS +{growth >> 10} KiB (bound {bound >> 10} KiB, "
        f"{drift >> 10} KiB of it measured with readers), {cut} connections cut off"
    )
    assert growth <= bound, f"worker RSS grew by {growth >> 10} KiB, bound {bound >> 10} KiB"
    assert "more than --max-buffer (65536 bytes) owed to the peer; closing" in server.log
    assert server.workers() == [worker]
    with server.connect() as sock:
        assert exchange(sock, b"") == b""  # still serving
