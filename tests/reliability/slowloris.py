"""A slowloris peer, run as its own process so its work does not disturb the
test's latency measurements (no shared GIL).

    python slowloris.py HOST PORT COUNT HOLD

Opens COUNT connections: the even ones trickle one byte a second each (and
read the echo), the odd ones send nothing. Prints ``ready`` once all are
open, holds them for HOLD seconds, then prints one JSON line: how long each
silent connection lived until the server closed it, how many trickling ones
the server closed (it must not: they are not idle), and how many trickled
bytes came back.
"""

from __future__ import annotations

import json
import selectors
import socket
import sys
import time


def main() -> None:
    host, port, count, hold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    socks = []
    opened = []
    for _ in range(count):
        socks.append(socket.create_connection((host, port), timeout=10))
        opened.append(time.monotonic())
    for sock in socks:
        sock.setblocking(False)
    trickling = [i for i in range(count) if i % 2 == 0]
    sel = selectors.DefaultSelector()
    for i, sock in enumerate(socks):
        sel.register(sock, selectors.EVENT_READ, i)
    print("ready", flush=True)

    silent_lived: list[float] = []
    trickle_closed = 0
    echoed = 0
    step = 1.0 / max(1, len(trickling))  # every trickler once a second
    next_send = time.monotonic()
    turn = 0
    deadline = time.monotonic() + hold
    while time.monotonic() < deadline:
        now = time.monotonic()
        while trickling and now >= next_send:
            i = trickling[turn % len(trickling)]
            turn += 1
            next_send += step
            try:
                socks[i].send(b".")
            except OSError:
                pass  # seen as closed by the read side below
        wait = min(deadline, next_send if trickling else deadline) - time.monotonic()
        for key, _ in sel.select(max(0.0, wait)):
            i = key.data
            try:
                data = socks[i].recv(4096)
            except OSError:
                data = b""
            if data:
                echoed += len(data)
                continue
            sel.unregister(socks[i])
            if i % 2:
                silent_lived.append(time.monotonic() - opened[i])
            else:
                trickle_closed += 1
                trickling.remove(i)
    print(
        json.dumps(
            {"silent_lived": silent_lived, "trickle_closed": trickle_closed, "echoed": echoed}
        ),
        flush=True,
    )
    for sock in socks:
        sock.close()


if __name__ == "__main__":
    main()
