"""The twins' contracts: every fact the compiled and the pure-Python loops
share is defined once and checked; the hot loops keep their import rules;
and the datagram path, where the two differ most in how they call the
kernel, gives the same replies and counters.

A compiled module's own copy of a fact (a C enum, an array size) is listed
in its ``COMPILED_FACTS`` under the common module's name; the module checks
it at import and the tests here check it again, so a drifted copy fails
both ways.
"""

from __future__ import annotations

import ast
import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from prefork import _fastio_common, _fastio_py, _loadgen_common, _loadgen_py, loadgen
from prefork.server import handlers, scoreboard
from prefork.server.handlers import chargen_pattern

from support import require_compiled

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "prefork"

# The modules of the hot loops and the load generator: none may import the
# server or the tools.
HOT_LOOP_MODULES = [
    "prefork._fastio_py",
    "prefork._fastio_common",
    "prefork._loadgen_py",
    "prefork._loadgen_common",
    "prefork.fastio",
    "prefork.loadgen",
    "prefork.proxy",
]


# -- shared facts -------------------------------------------------------------------------


def test_the_compiled_hot_loop_compiles_in_what_the_common_module_says():
    compiled = require_compiled("_fastio")
    facts = compiled.COMPILED_FACTS
    assert {
        "SERVICES",
        "MAX_EVENTS",
        "ACCEPT_BATCH",
        "DRAIN_MAX",
        "DATAGRAM_BATCH",
        "DATAGRAM_SIZE",
        "CHARGEN_DATAGRAM_MAX",
        "SLOT_SIZE",
        "HEARTBEAT_OFFSET",
        "COUNTERS_OFFSET",
        "LOOP_COUNTERS",
        "UDP_REFUSALS",
        "LOW_PORT_LIMIT",
        "RATE_WAYS",
        "RATE_HASH",
        "RATE_ENTRY_SIZE",
    } <= set(facts)
    for name, value in facts.items():
        assert value == getattr(_fastio_common, name), name
    # The Service enum, value by value, against the service list.
    assert facts["SERVICES"] == _fastio_common.SERVICES


def test_the_compiled_load_generator_compiles_in_what_the_common_module_says():
    compiled = require_compiled("_loadgen")
    facts = compiled.COMPILED_FACTS
    assert {
        "IDLE",
        "CONNECTING",
        "OPEN",
        "DEAD",
        "EMPTY",
        "WAITING",
        "ANSWERED",
        "LOST",
        "MODES",
        "ERROR_KINDS",
        "PERIOD",
        "CHUNK",
        "DATAGRAM_BATCH",
        "MAX_EVENTS",
        "SUB_BITS",
        "MAX_BITS",
        "BUCKETS",
        "SWEEP_INTERVAL_NS",
        "HEADER_SIZE",
        "N_ERRORS",
    } <= set(facts)
    for name, value in facts.items():
        assert value == getattr(_loadgen_common, name), name
    assert facts["ERROR_KINDS"] == _loadgen_common.ERROR_KINDS


def test_a_drifted_fact_stops_the_import_with_every_difference_named():
    common = {"A": 1, "B": ("x", "y")}
    _fastio_common.check_facts("m", {"A": 1, "B": ("x", "y")}, common)  # agrees: silent
    with pytest.raises(AssertionError) as caught:
        _fastio_common.check_facts("m", {"A": 2, "B": ("y", "x"), "C": 3}, common)
    message = str(caught.value)
    assert "A = 2" in message and "B = ('y', 'x')" in message and "C = 3" in message
    assert not issubclass(AssertionError, ImportError)  # fastio's fallback must not hide it
    assert _fastio_common.enum_order({"b": 1, "a": 0, "c": 2}) == ("a", "b", "c")
    with pytest.raises(AssertionError):
        _fastio_common.enum_order({"a": 0, "b": 2})  # a gap: not the tuple's order


def top_level_names(module: ModuleType) -> set[str]:
    """The names a module's own source defines at top level (not imports)."""
    tree = ast.parse(Path(str(module.__file__)).read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


@pytest.mark.parametrize(
    "module, common",
    [
        (_fastio_py, _fastio_common),
        (_loadgen_py, _loadgen_common),
        (scoreboard, _fastio_common),
        (handlers, _fastio_common),
        (loadgen, _loadgen_common),
    ],
    ids=lambda m: m.__name__.rpartition(".")[2],
)
def test_shared_facts_are_defined_once(module, common):
    assert top_level_names(module) & top_level_names(common) == set()


def test_the_specs_and_the_face_use_the_common_objects():
    for name in ("DATAGRAM_BATCH", "MAX_EVENTS", "HEARTBEAT", "check_loop_args", "daytime_line"):
        assert getattr(_fastio_py, name) is getattr(_fastio_common, name), name
    assert handlers.daytime_line is _fastio_common.daytime_line
    for name in ("HEADER", "BUCKETS", "ERROR_KINDS", "MAX_DATAGRAM", "bucket_high", "percentile"):
        assert getattr(loadgen, name) is getattr(_loadgen_common, name), name


# -- the scoreboard slot ----------------------------------------------------------------------


def test_the_scoreboard_slot_bytes_are_pinned():
    """The master reads what the workers' loops write: the bytes of a slot
    do not change without this test changing."""
    board = scoreboard.Scoreboard(2)
    try:
        board.beat(1, 12.5)
        board.write(1, 4321, 3, 2, 100, 200, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
        values = (12.5, 4321, 3, 2, 100, 200, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
        layout = "<d" + "q" * 16
        assert bytes(board.slot_view(1)) == struct.pack(layout, *values)
        assert board.read(1) == scoreboard.WorkerStats(*values)
        assert tuple(f.name for f in fields(scoreboard.WorkerStats)) == _fastio_common.SLOT_FIELDS
        assert _fastio_common.SLOT.format == layout and _fastio_common.SLOT_SIZE == 136
        assert _fastio_common.LOOP_COUNTERS[4:] == (
            "idle_closed",
            "max_buffer_closed",
            "handler_errors",
            "proxy_rejected",
            "udp_refused_loop",
            "udp_refused_source",
            "udp_refused_rate",
            "udp_rate_evictions",
            "limit_refused_conns",
            "limit_refused_rate",
            "limit_evictions",
        )
        board.write(1, 4321, 3, 2, 100, 200)  # the close counters left out are zeros
        assert board.read(1) == scoreboard.WorkerStats(12.5, 4321, 3, 2, 100, 200)
    finally:
        board.close()


def test_the_scoreboard_reads_what_each_loop_writes(impl):
    board = scoreboard.Scoreboard(2)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        board.write(1, 4321, 0, 0, 0, 0)  # the worker's pid, which the loop leaves alone
        loop = impl.EventLoop([listener], "echo", stats=board.slot_view(1))
        try:
            with socket.create_connection(listener.getsockname(), timeout=5) as client:
                client.sendall(b"12345")
                assert run_until(loop, lambda: loop.bytes_out == 5)
                assert client.recv(10) == b"12345"
                loop.run(0.01)  # one more wake-up publishes the last counters
                stats = board.read(1)
                assert (stats.pid, stats.accepted, stats.active) == (4321, 1, 1)
                assert (stats.bytes_in, stats.bytes_out) == (5, 5)
                assert 0 < time.monotonic() - stats.heartbeat < 2
            assert run_until(loop, lambda: board.read(1).active == 0)
        finally:
            loop.close()
            loop = None  # it holds a view of the slot: the map cannot close before
            board.close()


# -- import rules -------------------------------------------------------------------------------


def imported_modules(source: str) -> set[str]:
    """Every module an import or cimport statement of a .pyx names (for
    ``from P import N`` both ``P`` and ``P.N``)."""
    modules: set[str] = set()
    pattern = r"^(?:from\s+([\w.]+)\s+c?import\s+(\([^)]*\)|.*)|c?import\s+(.*))$"
    for package, names, plain in re.findall(pattern, source, re.M):
        items = (names or plain).strip("()").replace("\n", " ").split(",")
        for item in items:
            name = item.split()[0] if item.split() else ""
            if name:
                modules.add(f"{package}.{name}" if package else name)
        if package:
            modules.add(package)
    return modules


@pytest.mark.parametrize("name", ["_fastio", "_loadgen"])
def test_a_compiled_source_never_imports_its_spec(name):
    source = (PACKAGE / f"{name}.pyx").read_text()
    modules = imported_modules(source)
    assert f"prefork.{name}_common" in modules  # the parser sees the imports it should
    assert not any(m.startswith(f"prefork.{name}_py") for m in modules), modules
    assert not any(m.startswith(("prefork.server", "prefork.tools")) for m in modules)
    # _posix is cimported under a name: no bare C name shadows a Python one.
    assert "from prefork cimport _posix as posix" in source
    assert not re.search(r"^\s*from\s+prefork\._posix\s+cimport", source, re.M)
    assert not re.search(r"^\s*cimport\s+prefork\._posix\s*$", source, re.M)
    assert source.startswith("# cython: language_level=3")


def loaded_modules(*names: str, **env: str) -> list[str]:
    """``sys.modules`` of a fresh interpreter that imported ``names``."""
    code = (
        "import importlib, json, sys\n"
        "for name in sys.argv[1:]:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, *names],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        cwd=ROOT,
        timeout=30,
        check=True,
    )
    return json.loads(result.stdout)


@pytest.mark.parametrize("no_extensions", ["0", "1"])
def test_the_hot_loops_import_nothing_from_the_server_or_the_tools(no_extensions):
    loaded = loaded_modules(*HOT_LOOP_MODULES, PREFORK_NO_EXTENSIONS=no_extensions)
    assert set(HOT_LOOP_MODULES) <= set(loaded)
    assert [m for m in loaded if m.startswith(("prefork.server", "prefork.tools"))] == []


@pytest.mark.parametrize("name", ["_fastio", "_loadgen"])
def test_a_compiled_module_loads_without_its_spec(name):
    require_compiled(name)
    loaded = loaded_modules(f"prefork.{name}")
    assert f"prefork.{name}" in loaded and f"prefork.{name}_common" in loaded
    assert f"prefork.{name}_py" not in loaded
    assert [m for m in loaded if m.startswith(("prefork.server", "prefork.tools"))] == []


# -- the datagram path, differential ----------------------------------------------------------


def run_until(loop: Any, done: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Run ``loop`` in short slices until ``done()``; False on timeout."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        loop.run(0.02)
    return True


def collect(client: socket.socket, count: int) -> list[bytes]:
    """``count`` replies (5 s at most for each), then make sure no more come."""
    replies = []
    client.settimeout(5)
    for _ in range(count):
        replies.append(client.recv(70_000))
    client.settimeout(0.1)
    with pytest.raises(TimeoutError):
        replies.append(client.recv(70_000))
    return replies


def udp_pair() -> tuple[socket.socket, socket.socket]:
    """A bound, non-blocking server socket and a client socket, over loopback."""
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.setblocking(False)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    return server, client


def serve_datagrams(
    impl: ModuleType,
    service: str,
    server: socket.socket,
    client: socket.socket,
    phases: list[list[bytes]],
    replies_per_phase: Callable[[list[bytes]], int],
) -> dict[str, Any]:
    """Queue each phase's datagrams at once (the loop not running), then run
    the loop until it has taken them; what came back and the counters."""
    loop = impl.EventLoop([], service, datagram_sockets=[server], pattern=chargen_pattern(1))
    replies: list[bytes] = []
    sent = 0
    try:
        for phase in phases:
            for datagram in phase:
                client.sendto(datagram, server.getsockname())
            sent += len(phase)
            taken = run_until(loop, lambda count=sent: loop.datagrams >= count)
            assert taken, (loop.datagrams, sent)
            replies += collect(client, replies_per_phase(phase))
        return {
            "replies": replies,
            "datagrams": loop.datagrams,
            "bytes_in": loop.bytes_in,
            "bytes_out": loop.bytes_out,
        }
    finally:
        loop.close()
        server.close()
        client.close()


# 40 queued at once: more than two batches of DATAGRAM_BATCH; then the
# largest UDP payload queued with an empty datagram and a jumbo-frame size.
MANY = [b"%03d" % i * (i % 9) for i in range(40)]
LARGE = [os.urandom(65507), b"", os.urandom(9000)]
PHASES = [MANY, LARGE]


def both(scenario: Callable[[ModuleType], dict[str, Any]]) -> dict[str, Any]:
    """The spec's observation; the compiled loop's must be the same."""
    spec = scenario(_fastio_py)
    compiled = require_compiled("_fastio")
    assert scenario(compiled) == spec
    return spec


def test_udp_echo_answers_the_same_in_both():
    assert len(MANY) > 2 * _fastio_common.DATAGRAM_BATCH
    seen = both(lambda impl: serve_datagrams(impl, "echo", *udp_pair(), PHASES, len))
    total = sum(map(len, MANY + LARGE))
    assert seen == {
        "replies": MANY + LARGE,
        "datagrams": len(MANY + LARGE),
        "bytes_in": total,
        "bytes_out": total,
    }


def test_udp_discard_answers_nothing_in_both():
    seen = both(lambda impl: serve_datagrams(impl, "discard", *udp_pair(), PHASES, lambda p: 0))
    assert seen["replies"] == [] and seen["bytes_out"] == 0
    assert seen["datagrams"] == len(MANY + LARGE)


def shape(service: str, impl: ModuleType) -> dict[str, Any]:
    """Daytime and chargen replies vary (the clock, random lengths): their
    shape is what both must agree on."""
    seen = serve_datagrams(impl, service, *udp_pair(), [MANY], len)
    replies = seen.pop("replies")
    if service == "daytime":
        for reply in replies:
            time.strptime(reply.decode("ascii"), _fastio_common.DAYTIME_FORMAT)
    else:
        pattern = chargen_pattern(1)
        assert all(pattern.startswith(reply) for reply in replies)
        assert max(map(len, replies)) <= _fastio_common.CHARGEN_DATAGRAM_MAX
    assert seen.pop("bytes_out") == sum(map(len, replies))
    return {"replies": len(replies), **seen}


@pytest.mark.parametrize("service", ["daytime", "chargen"])
def test_udp_daytime_and_chargen_answer_alike_in_both(service):
    seen = both(lambda impl: shape(service, impl))
    assert seen == {"replies": len(MANY), "datagrams": len(MANY), "bytes_in": sum(map(len, MANY))}


def test_a_datagram_cut_short_is_counted_and_not_answered_in_both(tmp_path):
    """Over a UNIX datagram socket a datagram can exceed DATAGRAM_SIZE: the
    receive is cut short (MSG_TRUNC), and neither loop answers with the cut
    datagram."""
    size = _fastio_common.DATAGRAM_SIZE

    def scenario(impl: ModuleType) -> dict[str, Any]:
        for name in ("server", "client"):
            (tmp_path / name).unlink(missing_ok=True)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        server.bind(str(tmp_path / "server"))
        server.setblocking(False)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        client.bind(str(tmp_path / "client"))
        phase = [os.urandom(size + 34_464), b"after"]
        return serve_datagrams(impl, "echo", server, client, [phase], lambda p: 1)

    assert both(scenario) == {
        "replies": [b"after"],
        "datagrams": 2,
        "bytes_in": size + 5,
        "bytes_out": 5,
    }


def refused_pair() -> tuple[socket.socket, socket.socket]:
    """A server socket with ECONNREFUSED pending, and a client queueing
    datagrams behind it.

    The server socket is connected to a port nobody listens on (a connected
    UDP socket takes the ICMP port unreachable as its error; an unconnected
    one without IP_RECVERR ignores it), sends there, and the client then
    binds that very address: what it sends queues behind the error."""
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.setblocking(False)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as gone:
        gone.bind(("127.0.0.1", 0))
        address = gone.getsockname()
    server.connect(address)
    server.send(b"to nobody")  # ICMP port unreachable comes back at once over loopback
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(address)
    return server, client


def test_the_refused_pair_really_has_an_error_pending():
    server, client = refused_pair()
    with server, client:
        client.sendto(b"queued", server.getsockname())
        time.sleep(0.05)
        with pytest.raises(ConnectionRefusedError):
            server.recv(100)
        assert server.recv(100) == b"queued"  # reported once; the datagram waited behind it


def test_a_receive_error_is_passed_over_alike_in_both():
    """The receive error takes one place in the batch and the batch reads on
    (in the compiled loop: recvmmsg again); every datagram queued behind it
    is answered, in order, with the same counters."""
    queued = [b"%02d" % i for i in range(20)]  # more than the batch left after the error

    def scenario(impl: ModuleType) -> dict[str, Any]:
        server, client = refused_pair()
        probe = server.dup()  # still open after the loop's cleanup closed the server
        try:
            seen = serve_datagrams(impl, "echo", server, client, [queued], len)
            # The loop met the error: no call but its own could clear it.
            seen["pending"] = probe.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            return seen
        finally:
            probe.close()

    seen = both(scenario)
    assert seen == {
        "replies": queued,
        "datagrams": len(queued),
        "bytes_in": 40,
        "bytes_out": 40,
        "pending": 0,
    }
