"""kill -9 of the master under load.

What a user is owed: no orphaned workers serving a port nobody supervises.
Every worker is gone within a second (PR_SET_PDEATHSIG, plus a parent check
once a second), including workers inside the hot loop with a client, and the
port is free again for the next server to bind.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import threading
import time

import pytest

from harness import EchoLoad, payload, timeout
from support import WORKER_CLASS_ARGS, exchange, pid_alive

WITHIN = 1.0  # seconds from the master's death to the last worker's


@pytest.mark.parametrize("worker_class", list(WORKER_CLASS_ARGS))
@timeout(60, 60)
def test_workers_follow_a_killed_master_and_the_port_is_released(server_factory, worker_class):
    server = server_factory("-w", "3", *WORKER_CLASS_ARGS[worker_class])
    workers = server.wait_workers(3)
    host, port = server.tcp()
    load = EchoLoad((host, port), threads=8, duration=30).start()
    # A large echo in flight: one worker is inside the hot loop with a client.
    large = server.connect()
    data = payload(random.Random(2), 1 << 20)

    def send_large() -> None:
        try:
            exchange(large, data * 64, timeout=10)
        except OSError:  # the worker died with the master: expected here
            pass

    sender = threading.Thread(target=send_large, daemon=True)
    sender.start()
    try:
        time.sleep(0.5)
        assert load.completed > 0 and not load.failures
        os.kill(server.pid, signal.SIGKILL)
        killed = time.monotonic()
        server.wait(5)
        while any(pid_alive(p) for p in workers) and time.monotonic() - killed < 5:
            time.sleep(0.005)
        gone_after = time.monotonic() - killed
    finally:
        load.stop()
        large.close()
        sender.join(10)
    assert not any(pid_alive(p) for p in workers), [p for p in workers if pid_alive(p)]
    assert gone_after <= WITHIN, f"the last worker left {gone_after:.2f}s after the master died"
    # The port is free. SO_REUSEADDR as every server sets it (prefork too):
    # the closed connections' TIME_WAIT entries do not hold a port, a
    # listening socket would.
    with socket.socket() as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind((host, port))
        again.listen(1)
    print(f"\n{worker_class}: workers gone {gone_after * 1e3:.0f} ms after the master")
