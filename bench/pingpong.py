"""Ping-pong over a socket pair: the compiled hot loop against its twin.

The echo side runs ``echo()`` of one implementation; the client (the same
code for both) sends one message, waits for all of it to come back, and
repeats. Two modes:

- ``process`` (default): the echo side is a forked process pinned to one
  core, the client pinned to the other. Reports round trips per second and
  the echo process's CPU time per round trip (from ``wait4``).
- ``thread``: the echo side is a thread of the client's process, as in a
  threaded worker, so the fallback competes for the GIL and the compiled
  loop does not.

Rounds are interleaved (A B, B A, ...) and the ratio is taken within each
round, then the median is quoted, because absolute figures on a shared
machine drift from minute to minute.

    python bench/pingpong.py [--mode process|thread] [--rounds 7] [--seconds 1.0]
"""

from __future__ import annotations

import argparse
import importlib
import os
import socket
import statistics
import threading
import time

IMPLEMENTATIONS = {"cython": "prefork._fastio", "python": "prefork._fastio_py"}
SIZES = {"1 B": 1, "1 KiB": 1024, "64 KiB": 65536}
BUFFER_SIZE = 65536


def pin(cpu: int) -> None:
    if len(os.sched_getaffinity(0)) >= 2:
        os.sched_setaffinity(0, {cpu})


def echo_function(implementation: str):
    return importlib.import_module(IMPLEMENTATIONS[implementation]).echo


class EchoPeer:
    """An echo process on one end of a socket pair, pinned to core 0."""

    def __init__(self, implementation: str) -> None:
        self.sock, theirs = socket.socketpair()
        self.pid = os.fork()
        if self.pid == 0:
            code = 0
            try:
                self.sock.close()
                pin(0)
                echo_function(implementation)(theirs, bytearray(BUFFER_SIZE))
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        theirs.close()

    def close(self) -> float:
        """Close the connection; return the echo process's CPU seconds."""
        self.sock.close()
        _, _, usage = os.wait4(self.pid, 0)
        return usage.ru_utime + usage.ru_stime

    def __enter__(self) -> EchoPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EchoThread:
    """An echo thread of this process on one end of a socket pair."""

    def __init__(self, implementation: str) -> None:
        self.sock, self._theirs = socket.socketpair()
        echo = echo_function(implementation)
        self._thread = threading.Thread(
            target=echo, args=(self._theirs, bytearray(BUFFER_SIZE)), daemon=True
        )
        self._thread.start()

    def close(self) -> float:
        self.sock.close()
        self._thread.join(30)
        self._theirs.close()
        return float("nan")


def round_trips(sock: socket.socket, message: bytes, reply: bytearray, count: int) -> None:
    """``count`` round trips of ``message``; ``reply`` is at least as long."""
    view = memoryview(reply)
    size = len(message)
    for _ in range(count):
        sock.sendall(message)
        got = 0
        while got < size:
            n = sock.recv_into(view[got:size])
            if n == 0:
                raise ConnectionError("echo peer closed")
            got += n


def measure(implementation: str, size: int, seconds: float, mode: str) -> tuple[float, float]:
    """(round trips per second, echo-side CPU microseconds per round trip)."""
    message = os.urandom(size)
    reply = bytearray(size)
    peer = EchoPeer(implementation) if mode == "process" else EchoThread(implementation)
    try:
        round_trips(peer.sock, message, reply, 200)  # warm up
        done = 0
        started = time.perf_counter()
        deadline = started + seconds
        while time.perf_counter() < deadline:
            round_trips(peer.sock, message, reply, 200)
            done += 200
        rate = done / (time.perf_counter() - started)
    finally:
        cpu = peer.close()
    return rate, cpu / (done + 200) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("process", "thread"), default="process")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args()
    pin(1)
    print(
        f"mode {args.mode}; medians of {args.rounds} interleaved rounds; ratio = cython/python "
        "paired within a round"
    )
    print(
        f"{'size':>7} | {'cython rt/s':>11} | {'python rt/s':>11} | {'rt/s ratio':>10} | "
        f"{'cython cpu us/rt':>16} | {'python cpu us/rt':>16} | cpu ratio"
    )
    for label, size in SIZES.items():
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in IMPLEMENTATIONS}
        rate_ratios, cpu_ratios = [], []
        for r in range(args.rounds):
            order = list(IMPLEMENTATIONS) if r % 2 == 0 else list(reversed(IMPLEMENTATIONS))
            this_round = {name: measure(name, size, args.seconds, args.mode) for name in order}
            for name, result in this_round.items():
                results[name].append(result)
            rate_ratios.append(this_round["cython"][0] / this_round["python"][0])
            cpu_ratios.append(this_round["cython"][1] / this_round["python"][1])

        def med(name: str, i: int, results: dict = results) -> float:
            return statistics.median(x[i] for x in results[name])

        cpu = "n/a (one process)"
        if args.mode == "process":
            cpu = (
                f"{med('cython', 1):>16.2f} | {med('python', 1):>16.2f} | "
                f"{statistics.median(cpu_ratios):.2f}x"
            )
        print(
            f"{label:>7} | {med('cython', 0):>11,.0f} | {med('python', 0):>11,.0f} | "
            f"{statistics.median(rate_ratios):>9.2f}x | {cpu}"
        )


if __name__ == "__main__":
    main()
