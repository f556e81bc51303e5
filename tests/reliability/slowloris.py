"""A slowloris peer, run as its own process so its work does not disturb the
test's latency measurements (no shared GIL).

    python slowloris.py HOST PORT COUNT HOLD

Opens COUNT connections: the even ones trickle one byte a second each (and
read the echo), the odd ones send nothing. Then one more, which echoes a
byte and closes: the server accepts in order, so once that echo is back
every connection before it has been accepted. Prints ``ready``, holds the
connections for HOLD seconds, then prints one JSON line: for each silent
connection the seconds from just before its connect to the close we saw
(``silent_lived``) and from the accepted-by time to that close
(``silent_after_accept``), the close times themselves (``silent_closed_at``,
monotonic); how many trickling ones the server closed (it must not: they
are not idle); how many trickled bytes came back; and how late this loop
ever got to a due send (``worst_lateness``), its own scheduling delay.
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
    connecting = []  # before the connect: earlier than the server's accept
    for _ in range(count):
        connecting.append(time.monotonic())
        socks.append(socket.create_connection((host, port), timeout=10))
    with socket.create_connection((host, port), timeout=10) as last:
        last.sendall(b"!")
        assert last.recv(1) == b"!"
        accepted_by = time.monotonic()  # after the server accepted every one of them
    for sock in socks:
        sock.setblocking(False)
    trickling = [i for i in range(count) if i % 2 == 0]
    sel = selectors.DefaultSelector()
    for i, sock in enumerate(socks):
        sel.register(sock, selectors.EVENT_READ, i)
    print("ready", flush=True)

    silent_closed_at: list[float] = []
    silent_lived: list[float] = []
    worst_lateness = 0.0
    trickle_closed = 0
    echoed = 0
    step = 1.0 / max(1, len(trickling))  # every trickler once a second
    next_send = time.monotonic()
    turn = 0
    deadline = time.monotonic() + hold
    while time.monotonic() < deadline:
        now = time.monotonic()
        while trickling and now >= next_send:
            worst_lateness = max(worst_lateness, now - next_send)
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
                closed_at = time.monotonic()
                silent_closed_at.append(closed_at)
                silent_lived.append(closed_at - connecting[i])
            else:
                trickle_closed += 1
                trickling.remove(i)
    print(
        json.dumps(
            {
                "silent_lived": silent_lived,
                "silent_after_accept": [t - accepted_by for t in silent_closed_at],
                "silent_closed_at": silent_closed_at,
                "trickle_closed": trickle_closed,
                "echoed": echoed,
                "worst_lateness": worst_lateness,
            }
        ),
        flush=True,
    )
    for sock in socks:
        sock.close()


if __name__ == "__main__":
    main()
