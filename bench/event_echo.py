"""The event worker against the servers users would pick instead, 50 x 1 KiB.

Each server runs alone on core 0 (one worker, one process, one loop), the C
load generator (``peers/loadgen.c``) on core 1. For each server and round:
messages per second, and the server process tree's CPU time per echoed
message read from ``/proc`` (the efficiency figure that stays meaningful when
the load generator, sharing this 2-core machine, is the bottleneck). Rounds
are interleaved with a rotating order; ratios against the C epoll server are
taken within a round and the median is quoted.

    python bench/event_echo.py [--rounds 5] [--seconds 3] [--connections 50] [--size 1024]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD = HERE / ".build"
PYTHON = sys.executable


def build(name: str) -> str:
    BUILD.mkdir(exist_ok=True)
    target = BUILD / name
    source = HERE / "peers" / f"{name}.c"
    if not target.exists() or target.stat().st_mtime < source.stat().st_mtime:
        subprocess.run(["cc", "-O2", "-Wall", "-o", str(target), str(source)], check=True)
    return str(target)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def servers() -> dict[str, tuple[list[str], dict[str, str]]]:
    """name -> (argv with {port}, extra environment)."""
    prefork = [PYTHON, "-m", "prefork", "serve", "-b", "127.0.0.1:{port}", "-w", "1"]
    table = {
        "c-epoll": ([build("epoll_echo"), "{port}"], {}),
        "prefork-event": (prefork + ["-k", "event"], {}),
        "prefork-event-py": (prefork + ["-k", "event"], {"PREFORK_NO_EXTENSIONS": "1"}),
        "asyncio": ([PYTHON, str(HERE / "peers" / "asyncio_echo.py"), "asyncio", "{port}"], {}),
    }
    try:
        import uvloop  # noqa: F401

        table["uvloop"] = (
            [PYTHON, str(HERE / "peers" / "asyncio_echo.py"), "uvloop", "{port}"],
            {},
        )
    except ImportError:
        print("note: uvloop is not installed; skipped (pip install uvloop)")
    return table


def tree_cpu(pid: int) -> float:
    """CPU seconds used so far by ``pid`` and its children."""
    total = 0.0
    pending = [pid]
    while pending:
        p = pending.pop()
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{p}/task/{p}/children") as f:
                pending.extend(int(c) for c in f.read().split())
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def wait_listening(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server on port {port} did not start")


def loadgen(port: int, connections: int, size: int, seconds: float) -> tuple[int, float]:
    out = subprocess.run(
        [
            "taskset",
            "-c",
            "1",
            build("loadgen"),
            "127.0.0.1",
            str(port),
            str(connections),
            str(size),
            str(seconds),
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    )
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed: {out.stdout} {out.stderr}")
    fields = dict(item.split("=") for item in out.stdout.split())
    return int(fields["messages"]), float(fields["seconds"])


def run_one(argv: list[str], env: dict[str, str], args: argparse.Namespace) -> tuple[float, float]:
    """(messages per second, server CPU microseconds per message)."""
    port = free_port()
    proc = subprocess.Popen(
        ["taskset", "-c", "0", *[a.format(port=port) for a in argv]],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_listening(port)
        loadgen(port, args.connections, args.size, 0.5)  # warm up
        cpu_before = tree_cpu(proc.pid)
        messages, elapsed = loadgen(port, args.connections, args.size, args.seconds)
        cpu = tree_cpu(proc.pid) - cpu_before
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()
    return messages / elapsed, cpu / messages * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2 or not shutil.which("taskset"):
        sys.exit("needs 2 cores and taskset (util-linux)")
    table = servers()
    names = list(table)
    results: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            results[name].append(run_one(*table[name], args))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    reference = results["c-epoll"]
    print(
        f"\n{args.connections} connections x {args.size} B ping-pong, {args.seconds:g}s per "
        f"run, {args.rounds} interleaved rounds; medians; ratios paired within a round"
    )
    print(f"{'server':<18} {'msg/s':>10} {'cpu us/msg':>11} {'msg/s vs C':>11} {'cpu vs C':>9}")
    for name in names:
        rows = results[name]
        rate_ratio = statistics.median(x[0] / c[0] for x, c in zip(rows, reference, strict=True))
        cpu_ratio = statistics.median(x[1] / c[1] for x, c in zip(rows, reference, strict=True))
        print(
            f"{name:<18} {statistics.median(x[0] for x in rows):>10,.0f} "
            f"{statistics.median(x[1] for x in rows):>11.2f} {rate_ratio:>10.2f}x "
            f"{cpu_ratio:>8.2f}x"
        )
    if "uvloop" in results:
        ours = results["prefork-event"]
        uv = results["uvloop"]
        ratio = statistics.median(x[1] / u[1] for x, u in zip(ours, uv, strict=True))
        print(f"\nprefork-event CPU per message vs uvloop: {ratio:.2f}x (median of paired rounds)")


if __name__ == "__main__":
    main()
