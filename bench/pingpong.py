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

    python bench/pingpong.py [--mode process|thread] [--rounds 7] [--seconds 1.0] [--json FILE]
    python bench/pingpong.py --render FILE     (the table of a stored run, measuring nothing)
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import socket
import statistics
import threading
import time
from pathlib import Path
from typing import Any

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


def run(mode: str, rounds: int, seconds: float) -> dict[str, Any]:
    """Every round's figures, by size and implementation, interleaved: the order of
    the two implementations alternates from round to round."""
    data: dict[str, Any] = {"mode": mode, "rounds": rounds, "seconds": seconds, "sizes": {}}
    for label, size in SIZES.items():
        per_round = []
        for r in range(rounds):
            order = list(IMPLEMENTATIONS) if r % 2 == 0 else list(reversed(IMPLEMENTATIONS))
            this_round = {name: measure(name, size, seconds, mode) for name in order}
            per_round.append(
                {name: {"rate": rt, "cpu_us": cpu} for name, (rt, cpu) in this_round.items()}
            )
        data["sizes"][label] = per_round
    return data


def render(data: dict[str, Any]) -> str:
    """The table of medians and paired ratios, from the stored rounds alone."""
    mode = data["mode"]
    lines = [
        f"mode {mode}; medians of {data['rounds']} interleaved rounds; ratio = cython/python "
        "paired within a round",
        f"{'size':>7} | {'cython rt/s':>11} | {'python rt/s':>11} | {'rt/s ratio':>10} | "
        f"{'cython cpu us/rt':>16} | {'python cpu us/rt':>16} | cpu ratio",
    ]
    for label, rounds in data["sizes"].items():

        def med(name: str, key: str, rounds: list[dict[str, Any]] = rounds) -> float:
            return statistics.median(r[name][key] for r in rounds)

        def ratio(key: str, rounds: list[dict[str, Any]] = rounds) -> float:
            return statistics.median(r["cython"][key] / r["python"][key] for r in rounds)

        cpu = "n/a (one process)"
        if mode == "process":
            cpu = (
                f"{med('cython', 'cpu_us'):>16.2f} | {med('python', 'cpu_us'):>16.2f} | "
                f"{ratio('cpu_us'):.2f}x"
            )
        lines.append(
            f"{label:>7} | {med('cython', 'rate'):>11,.0f} | {med('python', 'rate'):>11,.0f} | "
            f"{ratio('rate'):>9.2f}x | {cpu}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("process", "thread"), default="process")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--json", type=Path, metavar="FILE", help="also store every round in FILE")
    parser.add_argument(
        "--render", type=Path, metavar="FILE", help="measure nothing: the table of a stored FILE"
    )
    args = parser.parse_args()
    if args.render is not None:
        print(render(json.loads(args.render.read_text())))
        return
    pin(1)
    data = run(args.mode, args.rounds, args.seconds)
    if args.json is not None:
        args.json.write_text(json.dumps(data, indent=1) + "\n")
    print(render(data))


if __name__ == "__main__":
    main()
