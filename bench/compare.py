"""prefork next to the echo servers users would pick instead, in one command.

    python bench/compare.py [--rounds 3] [--seconds 2] [--servers a,b] [--workloads a,b]

For each workload, each server is started in turn on a fresh port, pinned to
core 0, and loaded by ``prefork bench`` (the compiled load generator) pinned
to core 1: a warm-up run, then a measured run. Per run it records messages/s,
MB/s, p50/p99 latency (from the generator), the server process tree's CPU
time per message (from ``/proc``: the efficiency figure that stays meaningful
when the generator, sharing this machine, is the bottleneck), how busy the
server's core was, and the generator's own CPU per message.

Rounds are interleaved (every server once per workload, then again, in a
rotating order) because absolute figures on a shared machine drift from
minute to minute; each server is compared with its C reference *within a
round* and the median of those paired ratios is quoted. The references are
two minimal C servers in ``bench/peers/`` compiled here with ``cc``: an epoll
loop for the event-driven servers, a blocking prefork (a process per
connection) for the servers that give each connection a process or thread.

Then: user-space memory per idle connection (growth of the private memory,
USS, over 1,000 idle connections), and a check of the load generator itself (its CPU per
message against the C epoll server's, and what a second generator adds
against a saturated server).

Writes ``bench/RESULTS.md`` (between its generated-section markers, keeping
the rest of the file), ``bench/results.json`` (every run) and
``bench/results.png`` (with matplotlib, if installed). Peers that are not
installed (uvloop, gevent) are skipped with a note; ``pip install -e
'.[bench]'`` installs them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import date
from pathlib import Path
from typing import Any

from prefork.tools.bench import WINDOW_CLOSES, WINDOW_OPENS

HERE = Path(__file__).resolve().parent
PEERS = HERE / "peers"
BUILD = HERE / ".build"  # the compiled C peers (--build-dir)
PYTHON = sys.executable
IDLE_CONNECTIONS = 2000
BLOCKING_MAX = 1000  # the most connections a workload gives a server of a process each
EXPLANATION = """\
Each server alone on core 0, `prefork bench` on core 1. Medians of interleaved
rounds; ratios are paired within a round against the C reference of the
server's kind (`c-epoll` for the event-driven servers, `c-prefork`, a process
per connection, for the others). `cpu us/msg` is the server process tree's CPU
per echoed message (from /proc), `busy` the share of its core it used (near
100%: the server is the bottleneck), `client us` the generator's own CPU per
message, `workers` the fewest-most connections a prefork worker took. A ratio
is the median of the per-round ratios, not the ratio of the medians shown: on
a machine whose speed drifts between rounds the two differ, and the paired one
is the figure this page quotes."""
BEGIN = "<!-- bench/compare.py: generated section begins -->"
END = "<!-- bench/compare.py: generated section ends -->"


# -- what is compared --------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    connections: int
    size: int
    depth: int = 1
    default: bool = True  # in a run that names no --workloads


WORKLOADS = [
    Workload("latency", "1 x 1 KiB ping-pong", 1, 1024),
    Workload("pingpong", "50 x 1 KiB ping-pong", 50, 1024),
    Workload("pipelined", "50 x 1 KiB, 8 in flight", 50, 1024, 8),
    Workload("small", "200 x 128 B ping-pong", 200, 128),
    Workload("bulk", "4 x 64 KiB, 4 in flight", 4, 65536, 4),
    # Issue 13's timer workload: as many connections as a busy server holds.
    Workload("crowd", "10,000 x 128 B ping-pong", 10000, 128, default=False),
]


@dataclass(frozen=True)
class Server:
    name: str
    family: str  # "event" (one process serves every connection) or "blocking"
    argv: tuple[str, ...]  # {build}, {port}, {workers} (= connections), {metrics} are filled in
    env: tuple[tuple[str, str], ...] = ()
    needs: str | None = None  # a module that must be importable
    prefork: bool = False  # has --metrics: the generator reports worker balance
    cwd: str | None = None  # run from here (a baseline tree: python -m finds its package first)
    default: bool = True  # in a run that names no --servers
    # A server that answers rather than echoes: the class in asyncio_echo.py
    # whose exchange() gives the request it is sent and the reply it owes.
    answers: str | None = None

    def command(self, port: int, workers: int, metrics: int) -> list[str]:
        values = {"build": BUILD, "port": port, "workers": workers, "metrics": metrics}
        return [part.format(**values) for part in self.argv]


def prefork_argv(*extra: str) -> tuple[str, ...]:
    return (
        PYTHON, "-m", "prefork", "serve", "-b", "127.0.0.1:{port}",
        "--metrics", "127.0.0.1:{metrics}", "--log-level", "warning", *extra,
    )  # fmt: skip


def peer(script: str, *args: str) -> tuple[str, ...]:
    return (PYTHON, str(PEERS / script), *args)


NO_EXTENSIONS = (("PREFORK_NO_EXTENSIONS", "1"),)
EVENT_ARGS = ("-k", "event", "-w", "1", "--max-connections", "16384")
USER_ECHO = ("--handler", "asyncio_echo:Echo")
# A user's other protocols, the same classes on every loop (asyncio_echo.py);
# the last three answer (a line per message, a RESP SET and GET, the line
# protocol as an asyncio streams handler) instead of echoing.
USER_PROTOCOLS = {
    "buffered": "BufferedEcho",
    "timer": "TimerEcho",
    "upper": "UpperLines",
    "resp": "Resp",
    "upper-stream": "upper_stream",
}
ANSWERING = {"UpperLines", "Resp", "upper_stream"}
PEERS_ON_PATH = (("PYTHONPATH", str(PEERS)),)
SERVERS = [
    # Event-driven: one process (one core) serves every connection.
    Server("c-epoll", "event", ("{build}/epoll_echo", "{port}")),
    # --max-connections above the idle-memory count (2 x IDLE_CONNECTIONS + 20).
    Server("prefork-event", "event", prefork_argv(*EVENT_ARGS), prefork=True),
    Server(
        "prefork-event-py",
        "event",
        prefork_argv(*EVENT_ARGS),
        NO_EXTENSIONS,
        prefork=True,
    ),
    # A user's own protocol: the standalone asyncio/uvloop servers' Echo class
    # (bench/peers/asyncio_echo.py), served by the event worker's loop and by
    # -k asyncio on each stock loop (the process model's cost is the difference).
    Server(
        "prefork-event-proto",
        "event",
        prefork_argv(*EVENT_ARGS, *USER_ECHO),
        PEERS_ON_PATH,
        prefork=True,
    ),
    Server(
        "prefork-asyncio",
        "event",
        prefork_argv("-k", "asyncio", "--loop", "asyncio", *EVENT_ARGS[2:], *USER_ECHO),
        PEERS_ON_PATH,
        prefork=True,
    ),
    Server(
        "prefork-uvloop",
        "event",
        prefork_argv("-k", "asyncio", "--loop", "uvloop", *EVENT_ARGS[2:], *USER_ECHO),
        PEERS_ON_PATH,
        needs="uvloop",
        prefork=True,
    ),
    Server("asyncio", "event", peer("asyncio_echo.py", "asyncio", "{port}")),
    Server("uvloop", "event", peer("asyncio_echo.py", "uvloop", "{port}"), needs="uvloop"),
    *(
        server
        for suffix, cls in USER_PROTOCOLS.items()
        for server in (
            Server(
                f"prefork-event-{suffix}",
                "event",
                prefork_argv(*EVENT_ARGS, "--handler", f"asyncio_echo:{cls}"),
                PEERS_ON_PATH,
                prefork=True,
                default=False,
                answers=cls if cls in ANSWERING else None,
            ),
            Server(
                f"asyncio-{suffix}",
                "event",
                peer("asyncio_echo.py", "asyncio", "{port}", cls),
                default=False,
                answers=cls if cls in ANSWERING else None,
            ),
            Server(
                f"uvloop-{suffix}",
                "event",
                peer("asyncio_echo.py", "uvloop", "{port}", cls),
                needs="uvloop",
                default=False,
                answers=cls if cls in ANSWERING else None,
            ),
        )
    ),
    Server("gevent", "event", peer("gevent_echo.py", "{port}"), needs="gevent"),
    # A process or a thread per connection (as many as the workload has connections).
    Server("c-prefork", "blocking", ("{build}/blocking_prefork", "{port}", "{workers}")),
    Server("prefork-sync", "blocking", prefork_argv("-k", "sync", "-w", "{workers}"), prefork=True),
    Server(
        "prefork-thread",
        "blocking",
        prefork_argv("-k", "thread", "-w", "1", "--threads", "{workers}"),
        prefork=True,
    ),
    Server("tutorial-prefork", "blocking", peer("tutorial_prefork.py", "{port}", "{workers}")),
    Server("socketserver", "blocking", peer("socketserver_echo.py", "{port}")),
]
SERVERS_BY_NAME = {s.name: s for s in SERVERS}
REFERENCE = {"event": "c-epoll", "blocking": "c-prefork"}
# A process per connection cannot hold 1,000 idle connections sensibly.
NO_IDLE = {"c-prefork", "prefork-sync", "tutorial-prefork"}


# -- processes and /proc -----------------------------------------------------------------


def build(name: str) -> Path:
    """Compile ``peers/NAME.c`` into ``.build/NAME`` unless it is up to date."""
    BUILD.mkdir(exist_ok=True)
    target, source = BUILD / name, PEERS / f"{name}.c"
    if not target.exists() or target.stat().st_mtime < source.stat().st_mtime:
        subprocess.run(["cc", "-O2", "-Wall", "-o", str(target), str(source)], check=True)
    return target


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: every probe stays bound until all are
    picked (one released before the next is probed can come back again)."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [int(probe.getsockname()[1]) for probe in probes]
    finally:
        for probe in probes:
            probe.close()


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


def tree_total(pid: int, name: str, value: Callable[[str], int]) -> int:
    """The sum of ``value(text of /proc/P/NAME)`` over ``pid`` and its
    descendants (one that has just gone counts nothing)."""
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/{name}") as f:
                total += value(f.read())
        except FileNotFoundError:
            continue
    return total


def process_cpu_ns(pid: int) -> int | None:
    """Nanoseconds on a CPU so far, every live thread of ``pid``: the first
    field of each /proc/PID/task/TID/schedstat. Unlike utime + stime in
    /proc/PID/stat, which move by whole clock ticks (10 ms), it is exact, so
    a short window on a busy machine does not read as no CPU at all. None
    where the kernel keeps no schedstat (CONFIG_SCHED_INFO off)."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return 0  # gone meanwhile
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}/task/{tid}"):
                continue  # the thread ended meanwhile
            return None
    return total


def tree_cpu(pid: int) -> float:
    """CPU seconds (all threads) used so far by ``pid`` and its descendants."""
    total = 0.0
    for p in tree(pid):
        exact = process_cpu_ns(p)
        if exact is not None:
            total += exact / 1e9
            continue
        # utime and stime: fields 14 and 15 of stat, 11 and 12 after the ")" ending comm.
        try:
            with open(f"/proc/{p}/stat") as f:
                ticks = sum(map(int, f.read().rsplit(")", 1)[1].split()[11:13]))
        except FileNotFoundError:
            continue
        total += ticks / os.sysconf("SC_CLK_TCK")
    return total


def private_bytes(smaps_rollup: str) -> int:
    """USS from /proc/PID/smaps_rollup: the pages only this process maps."""
    total = 0
    for line in smaps_rollup.splitlines():
        name, _, rest = line.partition(":")
        if name in ("Private_Clean", "Private_Dirty"):
            total += int(rest.split()[0]) * 1024  # in kB
    return total


def proportional_bytes(smaps_rollup: str) -> int:
    """PSS from /proc/PID/smaps_rollup: each page divided among the processes mapping it."""
    for line in smaps_rollup.splitlines():
        name, _, rest = line.partition(":")
        if name == "Pss":
            return int(rest.split()[0]) * 1024  # in kB
    raise ValueError("no Pss line in smaps_rollup")


def tree_pss(pid: int) -> int:
    """The physical memory of ``pid`` and its descendants, each page counted
    once: summed PSS. Summed USS counts a page twice once a worker writes to
    a page it shared with the master after fork (the worker's copy and the
    master's, now private too), so its growth overstates what the tree
    allocated; summed PSS does not."""
    return tree_total(pid, "smaps_rollup", proportional_bytes)


def tree_uss(pid: int) -> int:
    """Unique (private) bytes of ``pid`` and its descendants: what they allocated
    themselves. Unlike RSS, pages shared with the parent after fork (the
    interpreter, the libraries) are not counted, and a page newly dirtied in a
    private mapping is; heap growth shows up page by page either way, so the
    per-connection figure is a difference over many connections."""
    return tree_total(pid, "smaps_rollup", private_bytes)


@dataclass(frozen=True)
class Pinning:
    server: list[str]
    client: list[str]


def pinning() -> Pinning:
    if len(os.sched_getaffinity(0)) >= 2 and shutil.which("taskset"):
        cores = sorted(os.sched_getaffinity(0))
        return Pinning(["taskset", "-c", str(cores[0])], ["taskset", "-c", str(cores[1])])
    print("note: fewer than 2 cores (or no taskset): server and generator are not pinned")
    return Pinning([], [])


class Running:
    """A server process group on a fresh port, pinned to the server core; killed on exit."""

    def __init__(self, server: Server, workers: int, pinning: Pinning) -> None:
        self.port, self.metrics = free_ports(2)
        # Its stderr goes to a file: a pipe read only at the end would fill up
        # and stall a server that logs under load.
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            pinning.server + server.command(self.port, workers, self.metrics),
            env={**os.environ, **dict(server.env)},
            cwd=server.cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self.stderr,
            start_new_session=True,
        )

    def __enter__(self) -> Running:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited with {self.proc.returncode}: {self.errors()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("did not start listening within 20 s")

    def errors(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace").strip()[-300:]

    def __exit__(self, *exc: object) -> None:
        try:
            os.killpg(self.proc.pid, 9)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.stderr.close()


# -- one measurement ---------------------------------------------------------------------


@dataclass
class Run:
    rate: float  # messages/s
    mbps: float  # MB/s echoed
    p50: float  # us
    p99: float  # us
    server_cpu: float  # us per message
    busy: float  # server CPU seconds per wall second
    client_cpu: float  # us per message
    balance: str = ""  # connections per worker, where prefork reports it


def bench_argv(
    address: str,
    load: Workload,
    seconds: float,
    pin: Pinning,
    metrics: str | None = None,
    exchange: tuple[str, str] | None = None,
) -> list[str]:
    """``prefork bench`` on the client core: ``load`` for ``seconds``, JSON out, the
    measured window marked on stderr; ``exchange``: the request and reply files
    for a server that answers (``load``'s size is then the request's)."""
    size = (
        ["--request", exchange[0], "--reply", exchange[1]] if exchange else ["-s", str(load.size)]
    )
    argv = [
        *pin.client, PYTHON, "-m", "prefork", "bench", address, "--json", "--marks",
        "-c", str(load.connections), *size, "-d", str(load.depth),
        "-t", str(seconds), "--warmup", "0",
    ]  # fmt: skip
    if metrics:
        argv += ["--metrics", metrics]
    return argv


def exchange_files(server: Server, load: Workload, directory: Path) -> tuple[str, str] | None:
    """For a server that answers: the request of about ``load``'s size its class
    is sent and the reply it owes, written to ``directory`` (None: it echoes)."""
    if server.answers is None:
        return None
    sys.path.insert(0, str(PEERS))
    try:
        import asyncio_echo
    finally:
        sys.path.remove(str(PEERS))
    request, reply = asyncio_echo.exchange(server.answers, load.size)
    (directory / "request").write_bytes(request)
    (directory / "reply").write_bytes(reply)
    return str(directory / "request"), str(directory / "reply")


def bench_result(returncode: int, stdout: str, stderr: str) -> dict[str, Any]:
    """The JSON document of a finished ``prefork bench``; a failed run raises."""
    if returncode != 0:
        raise RuntimeError(f"prefork bench: {stderr.strip()[-300:]}")
    result: dict[str, Any] = json.loads(stdout)
    return result


def bench(
    address: str,
    load: Workload,
    seconds: float,
    pin: Pinning,
    metrics: str | None = None,
    server_pid: int | None = None,
    exchange: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """One ``prefork bench`` run. With ``server_pid``, the server tree's CPU seconds
    over exactly the measured window (between the generator's --marks lines, so
    neither its start-up, its connection set-up nor its --metrics scrape is
    counted) are added to the result as ``server_cpu_seconds``."""
    argv = bench_argv(address, load, seconds, pin, metrics, exchange)
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    cpu: list[float] = []
    other: list[str] = []
    try:
        assert proc.stderr is not None
        # Read the marks as they come; the JSON (small) waits in the stdout pipe.
        for line in proc.stderr:
            if line.rstrip("\n") in (WINDOW_OPENS, WINDOW_CLOSES):
                if server_pid is not None:
                    cpu.append(tree_cpu(server_pid))
                if line.rstrip("\n") == WINDOW_CLOSES:
                    break
            else:
                other.append(line)
        stdout, rest = proc.communicate(timeout=seconds + 60)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    result = bench_result(proc.returncode, stdout, "".join(other) + rest)
    if server_pid is not None:
        if len(cpu) != 2:
            raise RuntimeError("prefork bench did not mark its measured window")
        result["server_cpu_seconds"] = cpu[1] - cpu[0]
    return result


def measure(server: Server, load: Workload, seconds: float, pin: Pinning) -> Run:
    with Running(server, load.connections, pin) as running, tempfile.TemporaryDirectory() as tmp:
        address = f"127.0.0.1:{running.port}"
        exchange = exchange_files(server, load, Path(tmp))
        # warm-up: workers up, caches warm
        bench(address, load, min(1.0, seconds / 2), pin, exchange=exchange)
        metrics = f"127.0.0.1:{running.metrics}" if server.prefork else None
        result = bench(address, load, seconds, pin, metrics, running.proc.pid, exchange)
        cpu = result["server_cpu_seconds"]
    messages = max(result["messages"], 1)
    if cpu <= 0:  # exact to the nanosecond (tree_cpu): none means no process was found
        raise RuntimeError("the server's processes used no CPU: they were not found in /proc")
    balance = ""
    spread = result.get("workers")
    if spread and len(spread["per_worker"]) > 1:
        balance = f"{spread['connections']['min']}-{spread['connections']['max']}"
    return Run(
        rate=result["messages_per_second"],
        mbps=result["mb_per_second"],
        p50=result["latency_us"]["p50"],
        p99=result["latency_us"]["p99"],
        server_cpu=cpu / messages * 1e6,
        busy=cpu / result["seconds"],
        client_cpu=result["cpu_us_per_message"] or 0.0,
        balance=balance,
    )


# How the idle-connection memory is measured (stored with the figures, so a
# stored run keeps its own label): the growth of the tree's PSS from
# IDLE_CONNECTIONS to twice as many idle connections. The slope leaves out
# what the first connections cost once (pages of the interpreter's heap the
# worker first writes after fork, the epoll set's first pages).
MEMORY_METHOD = "pss-slope"
MEMORY_LABELS = {
    # Runs before 2026-12-01 (evening): 1,000 idle connections after 20 of warm-up.
    "uss-growth": "user-space memory per idle connection (1,000 idle, USS growth)",
    "pss-slope": (
        f"memory per idle connection (PSS of the server's processes, from {IDLE_CONNECTIONS:,} "
        f"to {2 * IDLE_CONNECTIONS:,} idle)"
    ),
}


def idle_memory(server: Server, pin: Pinning) -> float:
    """Bytes of the server's memory per idle connection (MEMORY_METHOD)."""
    socks: list[socket.socket] = []
    with Running(server, 2 * IDLE_CONNECTIONS + 20, pin) as running:
        try:

            def open_echoing(n: int) -> None:
                for _ in range(n):
                    sock = socket.create_connection(("127.0.0.1", running.port), timeout=10)
                    sock.sendall(b"x")
                    if sock.recv(1) != b"x":  # accepted and served once
                        raise RuntimeError("no echo on an idle connection")
                    socks.append(sock)

            open_echoing(20 + IDLE_CONNECTIONS)  # what the first ones cost once is left out
            time.sleep(0.3)
            before = tree_pss(running.proc.pid)
            open_echoing(IDLE_CONNECTIONS)
            time.sleep(0.3)
            return (tree_pss(running.proc.pid) - before) / IDLE_CONNECTIONS
        finally:
            for sock in socks:
                sock.close()


# -- the whole comparison ----------------------------------------------------------------


@dataclass
class Results:
    runs: dict[tuple[str, str], list[Run | None]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    memory: dict[str, float | None] = field(default_factory=dict)
    memory_method: str = MEMORY_METHOD  # runs stored before it was recorded: "uss-growth"
    generator: dict[str, Any] = field(default_factory=dict)
    # How the run was made, stored so that its report can be made again from
    # results.json alone (--render), which is how RESULTS.md is checked.
    rounds: int = 0
    seconds: float = 0.0
    servers: list[str] = field(default_factory=list)  # in the order they were given
    workloads: list[str] = field(default_factory=list)
    elapsed: float = 0.0  # seconds the whole comparison took


def paired(results: Results, load: str, name: str, reference: str, key: str) -> float | None:
    """Median over rounds of name's figure / reference's figure in the same round."""
    ratios = [
        getattr(x, key) / getattr(r, key)
        for x, r in zip(results.runs[(load, name)], results.runs[(load, reference)], strict=True)
        if x is not None and r is not None and getattr(r, key) > 0
    ]
    return statistics.median(ratios) if ratios else None


# Classes that make one write per read at any depth: their cost over the echo on
# uvloop is their own Python, not uvloop's extra sends (see reachable()).
ONE_WRITE_PER_READ = {"Protocol", "BufferedEcho", "TimerEcho", "Resp"}
# In bulk the C epoll echo is no floor: its 64 KiB reads cost more than the
# event worker's (the built-in echo takes 0.73x its CPU per message there).
NO_FLOOR = {"bulk"}


def reachable(results: Results, load: Workload, cls: str, theirs: str) -> float | None:
    """The best CPU/msg ratio against ``theirs`` (uvloop serving ``cls``) that
    a loop costing what the C epoll echo server costs could reach: median over
    rounds of (C epoll + what ``cls`` adds over the echo on uvloop) / ``theirs``.
    What the class adds there is its own Python when it writes once per read
    (every class at depth 1); past that, uvloop's extra sends would count too,
    so there is no such bound."""
    if load.name in NO_FLOOR or (load.depth > 1 and cls not in ONE_WRITE_PER_READ):
        return None
    names = ("c-epoll", "uvloop", theirs)
    if any((load.name, name) not in results.runs for name in names):
        return None
    rounds = zip(*(results.runs[(load.name, name)] for name in names), strict=True)
    ratios = [
        (c.server_cpu + max(0.0, uv.server_cpu - echo.server_cpu)) / uv.server_cpu
        if theirs != "uvloop"
        else c.server_cpu / uv.server_cpu
        for c, echo, uv in rounds
        if c is not None and echo is not None and uv is not None and uv.server_cpu > 0
    ]
    return statistics.median(ratios) if ratios else None


def median(runs: list[Run | None], key: str) -> float | None:
    figures = [getattr(run, key) for run in runs if run is not None]
    return statistics.median(figures) if figures else None


def serves(server: Server, load: Workload) -> bool:
    """Whether ``server`` runs ``load``: not a process or thread per
    connection for thousands of connections."""
    return server.family != "blocking" or load.connections <= BLOCKING_MAX


def compare(
    servers: list[Server], workloads: list[Workload], rounds: int, seconds: float, pin: Pinning
) -> Results:
    results = Results()
    for load in workloads:
        for server in servers:
            if serves(server, load):
                results.runs[(load.name, server.name)] = []
    for r in range(rounds):
        for load in workloads:
            shift = r % len(servers)
            for server in servers[shift:] + servers[:shift]:
                if not serves(server, load):
                    continue
                try:
                    run: Run | None = measure(server, load, seconds, pin)
                except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
                    run = None
                    results.failures.append(f"round {r + 1}, {load.name}, {server.name}: {exc}")
                    print(f"  failed: {server.name} {load.name}: {exc}", file=sys.stderr)
                results.runs[(load.name, server.name)].append(run)
            print(f"round {r + 1}/{rounds}: {load.name} done", file=sys.stderr)
    return results


def check_generator(seconds: float, rounds: int, pin: Pinning, results: Results) -> None:
    """A second generator against a saturated server (the pure-Python event worker,
    whose core is the limit): how much does it add to the total rate?"""
    server = SERVERS_BY_NAME["prefork-event-py"]
    load = WORKLOADS[1]
    added = []
    for _ in range(rounds):
        with Running(server, load.connections, pin) as running:
            address = f"127.0.0.1:{running.port}"
            bench(address, load, 0.5, pin)
            one = bench(address, load, seconds, pin)["messages_per_second"]
            argv = bench_argv(address, load, seconds, pin)
            pair = [
                subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(2)
            ]
            two = 0.0
            for generator in pair:
                out, err = generator.communicate(timeout=seconds + 60)
                two += bench_result(generator.returncode, out, err)["messages_per_second"]
        added.append(two / one - 1)
    results.generator["second_instance_adds"] = statistics.median(added)


# -- reporting ---------------------------------------------------------------------------


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


BASELINE_SUFFIX = "@base"


def baseline_servers(tree: Path, servers: list[Server]) -> list[Server]:
    """A copy of each prefork server that runs the code of another checkout
    (built in place), for an A/B of two trees in the same interleaved rounds."""
    root = str(tree.resolve())

    def env(server: Server) -> tuple[tuple[str, str], ...]:
        paths = [root, *(value for name, value in server.env if name == "PYTHONPATH")]
        rest = tuple((name, value) for name, value in server.env if name != "PYTHONPATH")
        return (*rest, ("PYTHONPATH", os.pathsep.join(paths)))

    return [
        replace(s, name=s.name + BASELINE_SUFFIX, env=env(s), cwd=root)
        for s in servers
        if s.prefork
    ]


def ab_table(results: Results, servers: list[Server], workloads: list[Workload]) -> str:
    """Each prefork server against its baseline copy, paired per round."""
    names = {s.name for s in servers}
    lines = ["\nA/B: this tree / the --baseline tree (medians of per-round ratios)"]
    lines.append(f"  {'workload':<12}{'server':<19}{'msg/s':>8}{'cpu/msg':>9}{'client cpu':>12}")
    for load in workloads:
        for name in sorted(names):
            base = name + BASELINE_SUFFIX
            if base not in names:
                continue
            cells = [
                fmt(paired(results, load.name, name, base, key), ".2f", "x")
                for key in ("rate", "server_cpu", "client_cpu")
            ]
            lines.append(f"  {load.name:<12}{name:<19}{cells[0]:>8}{cells[1]:>9}{cells[2]:>12}")
    return "\n".join(lines)


def tables(results: Results, servers: list[Server], workloads: list[Workload]) -> str:
    lines = []
    names = [s.name for s in servers]
    for load in workloads:
        lines.append(f"\n{load.title}")
        for family, reference in REFERENCE.items():
            members = [
                s for s in servers if s.family == family and (load.name, s.name) in results.runs
            ]
            if not members:
                continue
            have_reference = reference in names
            width = max(17, *(len(s.name) + 1 for s in members))
            lines.append(
                f"  {'server':<{width}}{'msg/s':>10}{'MB/s':>9}{'p50 us':>9}{'p99 us':>9}"
                f"{'cpu us/msg':>11}{'busy':>6}{'client us':>10}"
                + (
                    f"{'msg/s vs ' + reference:>20}{'cpu vs ' + reference:>18}"
                    if have_reference
                    else ""
                )
                + f"{'  workers':>9}"
            )
            for server in members:
                runs = results.runs[(load.name, server.name)]
                cells = [
                    fmt(median(runs, "rate"), ",.0f").rjust(10),
                    fmt(median(runs, "mbps"), ",.1f").rjust(9),
                    fmt(median(runs, "p50"), ",.0f").rjust(9),
                    fmt(median(runs, "p99"), ",.0f").rjust(9),
                    fmt(median(runs, "server_cpu"), ".2f").rjust(11),
                    fmt(median(runs, "busy"), ".0%").rjust(6),
                    fmt(median(runs, "client_cpu"), ".2f").rjust(10),
                ]
                row = f"  {server.name:<{width}}" + "".join(cells)
                if have_reference:
                    rate = paired(results, load.name, server.name, reference, "rate")
                    cpu = paired(results, load.name, server.name, reference, "server_cpu")
                    row += f"{fmt(rate, '.2f', 'x'):>20}{fmt(cpu, '.2f', 'x'):>18}"
                balances = [run.balance for run in runs if run is not None and run.balance]
                row += f"  {balances[-1] if balances else '':>7}"
                lines.append(row.rstrip())
    return "\n".join(lines)


def headline(results: Results) -> list[str]:
    """The issue's targets, as paired ratios."""
    out = []

    def ratio(load: str, a: str, b: str, key: str) -> str:
        if (load, a) not in results.runs or (load, b) not in results.runs:
            return "not measured"
        return fmt(paired(results, load, a, b, key), ".2f", "x")

    event, sync = "prefork-event", "prefork-sync"
    out.append(
        f"event worker, 50 x 1 KiB: msg/s {ratio('pingpong', event, 'c-epoll', 'rate')} of "
        f"C epoll, CPU/msg {ratio('pingpong', event, 'c-epoll', 'server_cpu')} of C epoll, "
        f"{ratio('pingpong', event, 'uvloop', 'server_cpu')} of uvloop"
    )
    out.append(
        f"sync worker (a worker per connection), 50 x 1 KiB: msg/s "
        f"{ratio('pingpong', sync, 'c-prefork', 'rate')} of C prefork, CPU/msg "
        f"{ratio('pingpong', sync, 'c-prefork', 'server_cpu')} of C prefork, "
        f"{ratio('pingpong', sync, 'tutorial-prefork', 'server_cpu')} of the tutorial prefork"
    )
    out.append(
        f"bulk 4 x 64 KiB: MB/s event {ratio('bulk', event, 'c-epoll', 'mbps')} of C epoll, "
        f"sync {ratio('bulk', sync, 'c-prefork', 'mbps')} of C prefork"
    )
    for suffix, cls in {"proto": "Protocol", **USER_PROTOCOLS}.items():
        ours = f"prefork-event-{suffix}"
        theirs = "uvloop" if suffix == "proto" else f"uvloop-{suffix}"
        measured = [w.name for w in WORKLOADS if (w.name, ours) in results.runs]
        if measured:
            shares = ", ".join(
                f"{ratio(name, ours, theirs, 'server_cpu')} at {name}" for name in measured
            )
            out.append(f"a user's {cls} on the event worker: CPU/msg of uvloop's {shares}")
            bounds = [
                f"{fmt(bound, '.2f', 'x')} at {w.name}"
                for w in WORKLOADS
                if w.name in measured and (bound := reachable(results, w, cls, theirs)) is not None
            ]
            if bounds:
                out.append(
                    f"  a loop costing what C epoll's echo costs would reach {', '.join(bounds)}"
                )
    for worker, alone in (("prefork-asyncio", "asyncio"), ("prefork-uvloop", "uvloop")):
        if ("pingpong", worker) in results.runs:
            out.append(
                f"-k asyncio on {alone}: CPU/msg {ratio('pingpong', worker, alone, 'server_cpu')}"
                f" of the standalone {alone} server at 50 x 1 KiB, "
                f"{ratio('bulk', worker, alone, 'server_cpu')} in bulk"
            )
    if results.runs.get(("pingpong", "c-epoll")):
        runs = [r for r in results.runs[("pingpong", "c-epoll")] if r is not None]
        gen = statistics.median(r.client_cpu / r.server_cpu for r in runs) if runs else None
        share = fmt(gen, ".2f", "x")
        out.append(f"load generator, 50 x 1 KiB: its CPU/msg {share} of the C epoll server's")
    if "second_instance_adds" in results.generator:
        out.append(
            "a second generator against a saturated server (prefork-event-py) adds "
            f"{results.generator['second_instance_adds']:+.1%} to the total rate"
        )
    return out


def memory_table(results: Results) -> str:
    lines = ["\n" + MEMORY_LABELS[results.memory_method]]
    for name, value in results.memory.items():
        lines.append(f"  {name:<17}{fmt(value, ',.0f', ' bytes'):>14}")
    return "\n".join(lines)


def machine() -> str:
    with open("/proc/cpuinfo") as f:
        model = next(
            (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?"
        )
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os.cpu_count()} cores ({model}), {memory:.0f} GiB, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def write_markdown(text: str, command: str, path: Path) -> None:
    """Replace the generated section of ``path`` (or add one after its title)."""
    section = "\n".join(
        [
            BEGIN,
            "## Side by side: `bench/compare.py`",
            "",
            f"Machine: {machine()}. Date: {date.today().isoformat()}.",
            f"Command: `{command}`",
            "",
            EXPLANATION,
            "",
            "```",
            text.strip("\n"),
            "```",
            "",
            "![messages/s and CPU per message](results.png)",
            END,
        ]
    )
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    if BEGIN in old and END in old:
        new = old[: old.index(BEGIN)] + section + old[old.index(END) + len(END) :]
    else:
        head, sep, rest = old.partition("\n")
        new = head + sep + "\n" + section + "\n" + rest
    path.write_text(new)


def write_raw(results: Results, command: str, path: Path) -> None:
    """Every run's figures, round by round, for anyone who wants to check a median."""
    document = {
        "command": command,
        "machine": machine(),
        "date": date.today().isoformat(),
        "runs": [
            {"workload": load, "server": name, "round": i + 1, **(asdict(run) if run else {})}
            for (load, name), runs in results.runs.items()
            for i, run in enumerate(runs)
        ],
        "idle_bytes_per_connection": results.memory,
        "idle_memory_method": results.memory_method,
        "generator": results.generator,
        "failures": results.failures,
        "rounds": results.rounds,
        "seconds": results.seconds,
        "servers": results.servers,
        "workloads": results.workloads,
        "elapsed_seconds": results.elapsed,
    }
    path.write_text(json.dumps(document, indent=1) + "\n")


def read_raw(path: Path) -> Results:
    """The Results that ``write_raw`` stored in ``path``."""
    document = json.loads(path.read_text())
    results = Results(
        failures=document["failures"],
        memory=document["idle_bytes_per_connection"],
        memory_method=document.get("idle_memory_method", "uss-growth"),
        generator=document["generator"],
        rounds=document["rounds"],
        seconds=document["seconds"],
        servers=document["servers"],
        workloads=document["workloads"],
        elapsed=document["elapsed_seconds"],
    )
    fields = {f for f in Run.__dataclass_fields__}
    for row in document["runs"]:
        key = (row["workload"], row["server"])
        run = Run(**{k: v for k, v in row.items() if k in fields}) if "rate" in row else None
        results.runs.setdefault(key, []).append(run)
    return results


def server_named(name: str) -> Server:
    """A server of the table by name, or the baseline copy of one (NAME@base)."""
    if name.endswith(BASELINE_SUFFIX):
        return replace(SERVERS_BY_NAME[name.removesuffix(BASELINE_SUFFIX)], name=name)
    return SERVERS_BY_NAME[name]


def report(results: Results) -> str:
    """What a comparison prints (and RESULTS.md shows), from its results alone."""
    servers = [server_named(name) for name in results.servers]
    workloads = [w for w in WORKLOADS if w.name in results.workloads]
    baseline = any(name.endswith(BASELINE_SUFFIX) for name in results.servers)
    failures = (
        "\n\nfailed runs:\n" + "\n".join(f"  {f}" for f in results.failures)
        if results.failures
        else ""
    )
    if not workloads:  # --memory-only
        return memory_table(results).lstrip("\n") + failures + f"\n\n({results.elapsed:.0f} s)"
    return (
        f"{results.rounds} interleaved rounds of {results.seconds:g} s per server and "
        "workload; medians; each ratio is the median of the rounds' own ratios (paired\n"
        "within a round), so it can differ from the ratio of the two medians beside it\n"
        + tables(results, servers, workloads)
        + (memory_table(results) if results.memory else "")
        + (ab_table(results, servers, workloads) if baseline else "")
        + "\n\ntargets:\n"
        + "\n".join(f"  {line}" for line in headline(results))
        + (
            "\n\nfailed runs:\n" + "\n".join(f"  {f}" for f in results.failures)
            if results.failures
            else ""
        )
        + f"\n\n({results.elapsed:.0f} s)"
    )


def plot(results: Results, servers: list[Server], workloads: list[Workload], out: Path) -> bool:
    """Three panels: the paired ratios the text quotes (msg/s and CPU per
    message against each server's C reference, linear, 1.0 marked), then the
    absolute messages/s on a log axis with plain tick labels."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        print("note: matplotlib is not installed; no results.png (pip install matplotlib)")
        return False
    fig, axes = plt.subplots(3, 1, figsize=(14, 11), sharex=True)
    width = 0.8 / len(servers)
    colors = plt.get_cmap("tab20").colors  # type: ignore[attr-defined]  # 20 distinct: one each
    panels = (
        ("rate", "msg/s vs the C reference\n(paired; higher is better)", True),
        ("server_cpu", "CPU µs per message vs the C reference\n(paired; lower is better)", True),
        ("rate", "messages/s (median, log axis)", False),
    )
    measured = {s.name for s in servers}
    for i, server in enumerate(servers):
        reference = REFERENCE.get(server.family)
        if reference not in measured:  # a run without the C reference: no ratio
            reference = None
        xs = [j + (i - len(servers) / 2 + 0.5) * width for j in range(len(workloads))]
        for ax, (key, _, relative) in zip(axes, panels, strict=True):
            if relative:
                values = [
                    paired(results, w.name, server.name, reference, key) if reference else None
                    for w in workloads
                ]
            else:
                values = [median(results.runs[(w.name, server.name)], key) for w in workloads]
            ax.bar(
                xs,
                [v or 0 for v in values],
                width,
                label=server.name,
                color=colors[i % len(colors)],
            )
    for ax, (_, label, relative) in zip(axes, panels, strict=True):
        ax.set_ylabel(label)
        if relative:
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.1f}x"))
        else:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    axes[-1].set_xticks(range(len(workloads)), [w.title for w in workloads])
    axes[0].legend(ncol=5, fontsize="small")
    axes[0].set_title(
        "echo servers: server on one core, prefork bench on another; references: "
        + ", ".join(f"{ref} for {family}" for family, ref in REFERENCE.items())
    )
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return True


def choose(names: str | None, table: list[Any], what: str) -> list[Any]:
    if not names:
        return [item for item in table if item.default]
    known = {item.name: item for item in table}
    picked = []
    for name in names.split(","):
        if name not in known:
            raise ValueError(f"unknown {what} {name!r} (choose from {', '.join(known)})")
        picked.append(known[name])
    return picked


def main() -> None:
    global BUILD  # noqa: PLW0603 - set once from --build-dir, before anything is built
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--seconds", type=float, default=2.0, help="per measured run (default 2)")
    parser.add_argument(
        "--servers", help="comma-separated subset of: " + ", ".join(s.name for s in SERVERS)
    )
    parser.add_argument(
        "--workloads", help="comma-separated subset of: " + ", ".join(w.name for w in WORKLOADS)
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the idle-connection memory")
    parser.add_argument(
        "--memory-only",
        action="store_true",
        help="measure only the idle-connection memory (no workload is run)",
    )
    parser.add_argument(
        "--no-generator-check", action="store_true", help="skip the second-generator check"
    )
    parser.add_argument(
        "--output", type=Path, default=HERE, help="where RESULTS.md and results.png go"
    )
    parser.add_argument(
        "--build-dir", type=Path, default=BUILD, help="where the C peers are compiled"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="TREE",
        help="also run each chosen prefork server from TREE (another checkout, with its "
        "extensions built in place), interleaved, and print this tree / TREE ratios",
    )
    parser.add_argument(
        "--render",
        type=Path,
        metavar="RESULTS_JSON",
        help="measure nothing: print the report of a stored results.json again",
    )
    parser.add_argument(
        "--plot",
        type=Path,
        metavar="PNG",
        help="with --render: also draw the stored run's chart into PNG",
    )
    args = parser.parse_args()
    if args.plot is not None and args.render is None:
        parser.error("--plot needs --render RESULTS_JSON (a full run draws results.png itself)")
    if args.render is not None:
        try:
            stored = read_raw(args.render)
        except (OSError, ValueError, KeyError) as exc:
            parser.error(f"--render {args.render}: cannot read a stored comparison: {exc!r}")
        print(report(stored))
        if args.plot is not None:
            servers = [server_named(name) for name in stored.servers]
            loads = [w for w in WORKLOADS if w.name in stored.workloads]
            if not plot(stored, servers, loads, args.plot):
                sys.exit(1)
        return
    if args.rounds < 1 or args.seconds <= 0:
        parser.error("--rounds must be at least 1 and --seconds positive")
    BUILD = args.build_dir
    try:  # before the measuring, not after it
        args.output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"--output {args.output}: {exc.strerror or exc}")
    try:
        servers = choose(args.servers, SERVERS, "server")
        workloads = choose(args.workloads, WORKLOADS, "workload")
    except ValueError as exc:
        parser.error(str(exc))
    if args.baseline is not None:
        if not (args.baseline / "prefork" / "__init__.py").is_file():
            parser.error(f"--baseline {args.baseline}: not a prefork checkout")
        servers = servers + baseline_servers(args.baseline, servers)
    available = []
    for server in servers:
        if server.needs:
            try:
                __import__(server.needs)
            except ImportError:
                name = server.needs
                print(f"note: {name} is not installed; {server.name} skipped (pip install {name})")
                continue
        available.append(server)
    build("epoll_echo")
    build("blocking_prefork")
    pin = pinning()
    command = "python bench/compare.py " + " ".join(sys.argv[1:])
    started = time.monotonic()
    if args.memory_only:
        workloads = []
    # Up to 2 x IDLE_CONNECTIONS sockets each side, or 2 x a workload's connections
    # (the servers inherit the limit).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * max([IDLE_CONNECTIONS, *(w.connections for w in workloads)]) + 512
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    results = compare(available, workloads, args.rounds, args.seconds, pin)
    if not args.no_memory:
        for server in available:
            if server.name in NO_IDLE or server.answers:  # the probe checks an echo
                continue
            try:
                results.memory[server.name] = idle_memory(server, pin)
            except (RuntimeError, OSError) as exc:
                results.memory[server.name] = None
                results.failures.append(f"memory, {server.name}: {exc}")
    names = [s.name for s in available]
    if not args.no_generator_check and not args.memory_only and "prefork-event-py" in names:
        check_generator(args.seconds, args.rounds, pin, results)
    results.rounds, results.seconds = args.rounds, args.seconds
    results.servers = [s.name for s in available]
    results.workloads = [w.name for w in workloads]
    results.elapsed = time.monotonic() - started
    text = report(results)
    print(text)
    write_markdown(text, command, args.output / "RESULTS.md")
    write_raw(results, command, args.output / "results.json")
    if workloads:  # a --memory-only run has nothing to draw
        plot(results, available, workloads, args.output / "results.png")
    sys.exit(1 if results.failures else 0)


if __name__ == "__main__":
    main()
