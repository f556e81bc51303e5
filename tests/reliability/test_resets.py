"""Clients that reset (SO_LINGER 0) in the middle of a large echo, many times.

What a user is owed: a reset belongs to one connection. The same workers
serve before and after (none died), each worker's descriptor count comes back
to where it was (nothing leaked), nothing is logged as an error, and the next
client is served byte-exact.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time

import pytest

from harness import fd_count, payload, scaled, timeout
from support import WORKER_CLASS_ARGS, exchange, wait_until

RESETS = scaled(200, 1000)
THREADS = 4
LARGE = 1 << 20  # what each client means to echo; it resets long before the end
LINGER_ZERO = struct.pack("ii", 1, 0)


def reset_mid_echo(address: tuple[str, int], rng: random.Random) -> bool:
    """Send part of a large payload, read part of the echo, then reset.
    Returns whether the server still owed echo when the reset went out."""
    data = payload(rng, LARGE)
    with socket.create_connection(address, timeout=10) as sock:
        sock.setblocking(False)
        sent = 0
        target = rng.randint(64 * 1024, LARGE)  # stop sending somewhere in the middle
        deadline = time.monotonic() + 5
        while sent < target and time.monotonic() < deadline:
            try:
                sent += sock.send(data[sent:target])
            except BlockingIOError:
                break  # the server is pushing back: the echo is in full flow
        sock.settimeout(10)
        echoed = sock.recv(rng.randint(1, 65536))
        assert echoed and data.startswith(echoed)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
    return sent > len(echoed)


@pytest.mark.parametrize("worker_class", list(WORKER_CLASS_ARGS))
@timeout(60, 300)
def test_resets_mid_echo_leave_workers_and_descriptors_as_they_were(server_factory, worker_class):
    server = server_factory("-w", "2", *WORKER_CLASS_ARGS[worker_class])
    workers = server.wait_workers(2)
    for _ in range(4):  # every worker has served once: lazily made things exist
        with server.connect() as sock:
            assert exchange(sock, b"warm-up") == b"warm-up"
    time.sleep(0.3)
    baseline = {pid: fd_count(pid) for pid in workers}

    errors: list[BaseException] = []
    owed: list[bool] = []

    def client(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(RESETS // THREADS):
                owed.append(reset_mid_echo(server.tcp(), rng))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(scaled(50, 280))
    assert not any(t.is_alive() for t in threads), "reset clients hang"
    assert not errors, errors
    assert sum(owed) >= 0.9 * RESETS, f"only {sum(owed)} of {RESETS} resets hit an echo in flow"

    assert server.workers() == workers, "a worker died of a reset"
    counts = lambda: {pid: fd_count(pid) for pid in workers}  # noqa: E731
    assert wait_until(lambda: counts() == baseline, 5), (baseline, counts())
    with server.connect() as sock:
        data = payload(random.Random(1), LARGE)
        assert exchange(sock, data) == data
    assert "[ERROR]" not in server.log and "Traceback" not in server.log, server.log
