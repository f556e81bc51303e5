"""The event worker against the servers users would pick instead, 50 x 1 KiB.

Each server runs alone on core 0 (one event worker, or one asyncio loop; the
sync worker needs 50 processes and the thread worker 50 threads for 50
clients), the C load generator (``peers/loadgen.c``) on core 1. For each server and round:
messages per second, and the server process tree's CPU time per echoed
message read from ``/proc`` (the efficiency figure that stays meaningful when
the load generator, sharing this 2-core machine, is the bottleneck). Rounds
are interleaved with a rotating order; ratios against the C epoll server are
taken within a round and the median is quoted.

Then, per server, the user-space memory an idle connection costs: the growth
of the server process tree's resident memory over 1,000 idle connections.

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
        "prefork-sync": (
            [PYTHON, "-m", "prefork", "serve", "-b", "127.0.0.1:{port}", "-k", "sync", "-w", "50"],
            {},
        ),
        "prefork-thread": (prefork + ["-k", "thread", "--threads", "50"], {}),
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


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    found, pending = [], [pid]
    while pending:
        p = pending.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                pending.extend(int(c) for c in f.read().split())
        except FileNotFoundError:
            continue
        found.append(p)
    return found


def tree_cpu(pid: int) -> float:
    """CPU seconds used so far by ``pid`` and its descendants."""
    total = 0.0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and its descendants."""
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except FileNotFoundError:
            continue
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


def start(argv: list[str], env: dict[str, str], port: int) -> subprocess.Popen:
    return subprocess.Popen(
        ["taskset", "-c", "0", *[a.format(port=port) for a in argv]],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def idle_memory(argv: list[str], env: dict[str, str], count: int = 1000) -> float:
    """Bytes of server resident memory per idle connection."""
    port = free_port()
    proc = start(argv, env, port)
    socks: list[socket.socket] = []
    try:
        wait_listening(port)

        def open_echoing(n: int) -> None:
            for _ in range(n):
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                sock.sendall(b"x")
                assert sock.recv(1) == b"x"  # accepted and served once
                socks.append(sock)

        open_echoing(20)  # warm: first-connection allocations are not per connection
        time.sleep(0.3)
        before = tree_rss(proc.pid)
        open_echoing(count)
        time.sleep(0.3)
        return (tree_rss(proc.pid) - before) / count
    finally:
        for sock in socks:
            sock.close()
        os.killpg(proc.pid, 9)
        proc.wait()


def run_one(argv: list[str], env: dict[str, str], args: argparse.Namespace) -> tuple[float, float]:
    """(messages per second, server CPU microseconds per message)."""
    port = free_port()
    proc = start(argv, env, port)
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
    print("\nuser-space memory per idle connection (1,000 idle connections, RSS growth)")
    for name in names:
        if name in ("prefork-sync", "prefork-thread"):
            continue  # a process or a thread per connection: not built for idle crowds
        print(f"{name:<18} {idle_memory(*table[name]):>8,.0f} bytes")


if __name__ == "__main__":
    main()
