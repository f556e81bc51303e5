"""``prefork bench`` and its loop, both implementations, against real servers.

The loop (``LoadGen``) is driven directly, once per implementation, with
message limits so that every count is exact; the command is run as a real
process for its options, report, JSON, exit status and Ctrl-C. Servers that
misbehave on purpose (flip a byte, add a byte, never answer, close at once)
check that each kind of error is caught.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefork import _loadgen_common, _loadgen_py, fastio, loadgen

from support import (
    Server,
    assert_one_line_error,
    compiled_unless_disabled,
    handler_env,
    prefork_command,
    require_compiled,
    run,
    start_server,
)

pytestmark = pytest.mark.timeout(60)

MISBEHAVING = '''
class Corrupt:
    """Echoes with the first byte of every chunk flipped."""

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        changed = bytearray(data)
        changed[0] ^= 0xFF
        self.transport.write(bytes(changed))

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        pass


class Extra(Corrupt):
    """Echoes every chunk with one byte more."""

    def data_received(self, data):
        self.transport.write(data + b"!")
'''


@pytest.fixture(params=["cython", "python"])
def impl(request: pytest.FixtureRequest) -> ModuleType:
    """Each loop test runs once per implementation."""
    if request.param == "python":
        return _loadgen_py
    return require_compiled("_loadgen")


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    """Started once for the module: an echo server (TCP, UDP and a UNIX
    socket, two workers, metrics), and the misbehaving ones."""
    home = tmp_path_factory.mktemp("bench")
    (home / "misbehave.py").write_text(MISBEHAVING)
    env = handler_env(home)
    sock = home / "echo.sock"
    started: dict[str, Server] = {}
    try:
        started["echo"] = start_server(
            "-w", "2", "-b", "127.0.0.1:0", "-b", "udp://127.0.0.1:0", "-b", f"unix:{sock}",
            "--metrics", "127.0.0.1:0",
        )  # fmt: skip
        started["corrupt"] = start_server("-w", "1", "--handler", "misbehave:Corrupt", env=env)
        started["extra"] = start_server("-w", "1", "--handler", "misbehave:Extra", env=env)
        started["discard"] = start_server(
            "-w", "1", "-b", "127.0.0.1:0", "-b", "udp://127.0.0.1:0", "--handler", "discard"
        )
        started["daytime"] = start_server("-w", "1", "--handler", "daytime")
        yield started
    finally:
        for server in started.values():
            server.kill_all()


def address(server: Server, scheme: str = "") -> str:
    """The server's first listener of the kind ``scheme`` names (``udp://``, ``unix:``, TCP)."""
    for text in server.addresses:
        if scheme and text.startswith(scheme) or not scheme and text[0].isdigit():
            return text
    raise AssertionError(f"no {scheme or 'tcp'} listener in {server.addresses}")


def inet(text: str) -> tuple[str, int]:
    host, _, port = text.removeprefix("udp://").rpartition(":")
    return host.strip("[]"), int(port)


def metrics_address(server: Server) -> str:
    match = re.search(r"metrics on http://(\S+)/metrics", server.log)
    assert match, server.log
    return match.group(1)


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A TCP port bound but not listening: connects are refused (and nothing
    binds it for UDP, so datagrams get "port unreachable")."""
    with socket.socket() as tcp:
        tcp.bind(("127.0.0.1", 0))
        yield tcp.getsockname()[1]


def run_until_done(generator, limit: int, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not generator.run(0.2, limit):
        assert time.monotonic() < deadline, "the run did not end"


def no_errors(generator) -> bool:
    return not any(generator.errors.values())


# -- the loop, both implementations -----------------------------------------------------


@pytest.mark.parametrize(("size", "depth"), [(1, 1), (1000, 1), (1000, 7), (100_000, 3)])
def test_stream_counts_every_message_and_byte(impl, servers, size, depth):
    generator = impl.LoadGen(
        socket.AF_INET, inet(address(servers["echo"])), "stream",
        connections=4, size=size, depth=depth,
    )  # fmt: skip
    limit = 40 if size > 10_000 else 400
    try:
        run_until_done(generator, limit)
        assert no_errors(generator), generator.errors
        assert (generator.messages, generator.failed, generator.in_flight) == (limit, 0, 0)
        assert generator.bytes_sent == generator.bytes_received == limit * size
        assert generator.connections_opened == generator.live == 4
        assert sum(generator.histogram()) == limit
        assert 0 < generator.latency_min <= generator.latency_max
        assert generator.latency_min * limit <= generator.latency_total
        assert generator.latency_total <= generator.latency_max * limit
    finally:
        generator.close()


def test_both_implementations_count_the_same(servers):
    compiled = require_compiled("_loadgen")
    figures = []
    for module in (compiled, _loadgen_py):
        generator = module.LoadGen(
            socket.AF_INET, inet(address(servers["echo"])), connections=5, size=333, depth=2
        )
        try:
            run_until_done(generator, 321)
            figures.append(
                (generator.messages, generator.bytes_sent, generator.bytes_received,
                 generator.errors, sum(generator.histogram()))
            )  # fmt: skip
        finally:
            generator.close()
    no_errors = dict.fromkeys(_loadgen_common.ERROR_KINDS, 0)
    assert figures[0] == figures[1] == (321, 321 * 333, 321 * 333, no_errors, 321)


def test_connect_per_request_opens_a_connection_per_message(impl, servers):
    generator = impl.LoadGen(
        socket.AF_INET, inet(address(servers["echo"])), "connect", connections=3, size=500
    )
    try:
        run_until_done(generator, 90)
        assert no_errors(generator), generator.errors
        assert generator.messages == generator.connections_opened == 90
        assert generator.bytes_received == 90 * 500
        assert generator.live == 0  # each closed once its echo was back
    finally:
        generator.close()


def test_unix_socket_stream_and_connect_per_request(impl, servers):
    path = address(servers["echo"], "unix:").removeprefix("unix:")
    for mode in ("stream", "connect"):
        generator = impl.LoadGen(socket.AF_UNIX, path, mode, connections=2, size=4096)
        try:
            run_until_done(generator, 100)
            assert no_errors(generator), generator.errors
            assert generator.messages == 100
        finally:
            generator.close()


def test_datagrams_one_reply_each(impl, servers):
    generator = impl.LoadGen(
        socket.AF_INET, inet(address(servers["echo"], "udp://")), "datagram",
        connections=3, size=64, depth=4,
    )  # fmt: skip
    try:
        run_until_done(generator, 300)
        assert no_errors(generator), generator.errors
        assert (generator.messages, generator.failed, generator.in_flight) == (300, 0, 0)
        assert generator.bytes_sent == generator.bytes_received == 300 * 64
    finally:
        generator.close()


def test_reset_drops_the_figures_and_keeps_the_connections(impl, servers):
    generator = impl.LoadGen(socket.AF_INET, inet(address(servers["echo"])), connections=2)
    try:
        generator.run(0.2)
        assert generator.messages > 0
        generator.reset()
        assert (generator.messages, generator.bytes_received, sum(generator.histogram())) == (
            0, 0, 0,
        )  # fmt: skip
        assert generator.live == 2
        run_until_done(generator, 50)
        assert generator.messages == 50 and generator.connections_opened == 0
    finally:
        generator.close()


def test_ipv6(impl, server_factory):
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    server = server_factory("-w", "1", "-b", "[::1]:0")
    host, port = inet(server.addresses[0])
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)[0]
    generator = impl.LoadGen(family, sockaddr, connections=2, size=100)
    try:
        run_until_done(generator, 50)
        assert no_errors(generator) and generator.messages == 50
    finally:
        generator.close()


def test_a_flipped_byte_fails_its_message(impl, servers):
    generator = impl.LoadGen(
        socket.AF_INET, inet(address(servers["corrupt"])), connections=2, size=100
    )
    try:
        run_until_done(generator, 20)
        assert generator.messages == 0 and generator.failed == 20
        assert generator.errors["mismatch"] == 20  # once per message
        assert sum(generator.errors.values()) == 20
        assert sum(generator.histogram()) == 0  # only right answers are timed
    finally:
        generator.close()


def test_more_bytes_than_sent_is_excess(impl, servers):
    generator = impl.LoadGen(socket.AF_INET, inet(address(servers["extra"])), connections=2)
    try:
        run_until_done(generator, 20)  # ends when both connections have failed
        assert generator.errors["excess"] == 2 and generator.live == 0
        assert generator.messages == 0 and generator.failed == 2
    finally:
        generator.close()


def test_no_echo_times_out(impl, servers):
    generator = impl.LoadGen(
        socket.AF_INET, inet(address(servers["discard"])), connections=3, depth=2, timeout=0.3
    )
    try:
        began = time.monotonic()
        run_until_done(generator, 100)
        assert 0.25 < time.monotonic() - began < 5
        assert generator.errors["timeout"] == 3 and generator.failed == 6
        assert generator.live == 0
    finally:
        generator.close()


def test_unanswered_datagrams_are_lost(impl, servers):
    generator = impl.LoadGen(
        socket.AF_INET, inet(address(servers["discard"], "udp://")), "datagram",
        connections=2, size=32, depth=2, timeout=0.2,
    )  # fmt: skip
    try:
        run_until_done(generator, 8)
        assert generator.errors["lost"] == generator.failed == 8
        assert generator.messages == 0 and generator.live == 2
    finally:
        generator.close()


@pytest.mark.parametrize("mode", ["stream", "connect", "datagram"])
def test_nobody_listening_is_a_connect_error(impl, refused_port, mode):
    generator = impl.LoadGen(
        socket.AF_INET, ("127.0.0.1", refused_port), mode, connections=2, size=16, timeout=0.2
    )
    try:
        run_until_done(generator, 6)
        assert generator.messages == 0 and generator.errors["connect"] >= 1
        if mode == "stream":
            assert generator.errors["connect"] == 2 and generator.live == 0
        else:
            assert generator.failed == 6
    finally:
        generator.close()


def test_a_server_that_closes_at_once(impl, servers):
    generator = impl.LoadGen(socket.AF_INET, inet(address(servers["daytime"])), connections=3)
    try:
        run_until_done(generator, 100)
        errors = generator.errors
        assert generator.messages == 0 and generator.live == 0
        assert errors["closed"] + errors["reset"] == 3  # each connection fails once
    finally:
        generator.close()


def test_bad_arguments_are_refused_before_any_socket(impl):
    here = ("127.0.0.1", 9)
    for args, options in [
        ((socket.AF_INET, here, "carrier-pigeon"), {}),
        ((socket.AF_INET, here), {"connections": 0}),
        ((socket.AF_INET, here), {"size": 0}),
        ((socket.AF_INET, here), {"depth": 0}),
        ((socket.AF_INET, here), {"timeout": 0}),
        ((socket.AF_INET, here, "connect"), {"depth": 2}),
        ((socket.AF_INET, here, "datagram"), {"size": 7}),
        ((socket.AF_UNIX, "/x", "datagram"), {}),
        ((socket.AF_UNIX, "/" + "x" * 200), {}),
        ((socket.AF_INET, ("localhost", 9)), {}),
    ]:
        with pytest.raises(ValueError):
            impl.LoadGen(*args, **options)
    generator = impl.LoadGen(socket.AF_INET, here)
    with pytest.raises(ValueError):
        generator.run(-1)
    generator.close()
    with pytest.raises(ValueError):
        generator.run(0.1)


# -- the histogram ------------------------------------------------------------------------


# No per-example deadline (hypothesis' default is 200 ms): these are pure
# functions, and on a machine whose cores are busy one example took 520 ms.
# The test's own timeout still bounds the run.
@settings(deadline=None)
@given(st.integers(min_value=0, max_value=1 << 50), st.integers(min_value=0, max_value=1 << 50))
def test_buckets_are_ordered_and_narrow(a, b):
    low, high = sorted((a, b))
    index = _loadgen_py.bucket_index(high)
    assert _loadgen_py.bucket_index(low) <= index < _loadgen_common.BUCKETS
    compiled = compiled_unless_disabled("_loadgen")
    if compiled is not None:
        assert compiled.bucket_index(high) == index
    if high < 1 << _loadgen_common.MAX_BITS:
        top = _loadgen_common.bucket_high(index)
        assert high <= top <= high + high // 32  # a bucket is at most 1/32 wide
        assert _loadgen_py.bucket_index(top) == index
        if index + 1 < _loadgen_common.BUCKETS:
            assert _loadgen_py.bucket_index(top + 1) == index + 1


@settings(deadline=None)  # as above
@given(st.lists(st.integers(min_value=0, max_value=10**10), min_size=1, max_size=200))
def test_percentiles_are_monotone_and_bounded_by_the_maximum(latencies):
    histogram = [0] * _loadgen_common.BUCKETS
    for ns in latencies:
        histogram[_loadgen_py.bucket_index(ns)] += 1
    largest = max(latencies)
    figures = [
        _loadgen_common.percentile(histogram, q, largest) for q in (0.0, 0.5, 0.9, 0.99, 0.999, 1.0)
    ]
    assert figures == sorted(figures) and figures[-1] == largest
    exact = sorted(latencies)[max(0, -(-len(latencies) // 2) - 1)]  # the true median
    assert exact <= figures[1] <= exact + exact // 32


def test_the_compiled_loop_is_present_unless_disabled():
    compiled = loadgen.load_compiled()
    if fastio.extensions_disabled():
        assert loadgen.IMPLEMENTATION == "python" and loadgen.LoadGen is _loadgen_py.LoadGen
        return
    assert compiled is not None, "prefork._loadgen is not built: run pip install -e ."
    assert loadgen.IMPLEMENTATION == "cython" and loadgen.LoadGen is compiled.LoadGen
    assert compiled.__all__ == _loadgen_py.__all__


# -- the command --------------------------------------------------------------------------


def bench(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run("bench", *args, timeout=45, env=env)


def implementation_env(name: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PREFORK_NO_EXTENSIONS", None)
    if name == "python":
        env["PREFORK_NO_EXTENSIONS"] = "1"
    else:
        require_compiled("_loadgen")
    return env


@pytest.mark.parametrize("name", ["cython", "python"])
@pytest.mark.parametrize("scheme", ["", "udp://", "unix:"])
def test_json_result(servers, name, scheme):
    result = bench(
        address(servers["echo"], scheme), "-n", "600", "-c", "3", "-d", "2", "-s", "1K",
        "--warmup", "0.1", "--json", env=implementation_env(name),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # not a terminal: no progress line
    document = json.loads(result.stdout)
    assert document["implementation"] == name
    assert document["mode"] == ("datagram" if scheme == "udp://" else "stream")
    assert (document["messages"], document["failed"], document["error_total"]) == (600, 0, 0)
    # Bytes cover the whole run: the warm-up's messages, then the 600; none is left in flight.
    answered = document["warmup"]["messages"] + 600
    assert document["size"] == 1024 and document["in_flight"] == 0
    assert document["bytes_received"] == document["bytes_sent"] == answered * 1024
    assert document["messages_per_second"] > 0 and document["mb_per_second"] > 0
    latency = document["latency_us"]
    order = [latency[k] for k in ("min", "p50", "p90", "p99", "p99.9", "max")]
    assert order == sorted(order) and 0 < order[0]
    assert latency["min"] <= latency["mean"] <= latency["max"]
    # The client's own CPU while measuring: one thread cannot use more than the wall time.
    assert 0 < document["cpu_seconds"] <= document["seconds"] + 0.01
    assert document["cpu_us_per_message"] == pytest.approx(document["cpu_seconds"] / 600 * 1e6)
    assert document["workers"] is None


def test_text_report(servers):
    result = bench(address(servers["echo"]), "-t", "0.5", "-c", "2", "--warmup", "0.2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"prefork bench {address(servers['echo'])} (")
    labels = [line.split("  ")[1] if line.startswith("  ") else "" for line in lines]
    for label in (
        "duration",
        "messages/s",
        "MB/s",
        "client CPU",
        "latency p50",
        "latency p99.9",
        "errors",
    ):
        assert any(text.startswith(label) for text in labels), result.stdout
    assert re.search(r"duration\s+\d+\.\d\d s, after a 0.2 s warm-up", result.stdout)
    assert re.search(r"errors\s+none", result.stdout)


def test_connect_per_request_command(servers):
    result = bench(
        address(servers["echo"]), "--connect-per-request", "-n", "200", "-c", "4",
        "--warmup", "0", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["mode"] == "connect"
    assert document["messages"] == document["connections_opened"] == 200


def test_worker_balance_from_the_metrics(servers):
    metrics = metrics_address(servers["echo"])
    result = bench(
        address(servers["echo"]), "--connect-per-request", "-n", "300", "-c", "4",
        "--warmup", "0", "--metrics", metrics, "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    spread = json.loads(result.stdout)["workers"]
    rows = spread["per_worker"]
    assert len(rows) == 2 and {row["worker"] for row in rows} == {1, 2}
    assert sum(row["connections"] for row in rows) == 300
    assert sum(row["bytes_in"] for row in rows) == 300 * 1024
    figures = sorted(row["connections"] for row in rows)
    assert (spread["connections"]["min"], spread["connections"]["max"]) == tuple(figures)
    if figures[0]:
        assert spread["connections"]["ratio"] == pytest.approx(figures[1] / figures[0])
    text = bench(
        address(servers["echo"]), "-t", "0.3", "-c", "4", "--warmup", "0",
        "--metrics", f"http://{metrics}",
    )  # fmt: skip
    assert text.returncode == 0, text.stderr
    assert re.search(r"connections per worker\s+min \d+, max \d+, max/min", text.stdout)
    assert re.search(r"worker 1 \(pid \d+\)\s+\d+ connections, [\d,]+ bytes in", text.stdout)


@pytest.mark.parametrize(
    ("server", "args", "kinds"),
    [
        ("corrupt", ("-n", "50"), {"mismatch"}),
        ("extra", ("-n", "50"), {"excess", "mismatch"}),
        ("daytime", ("-n", "50"), {"closed", "reset", "mismatch"}),
        ("discard", ("-n", "50", "--timeout", "0.3"), {"timeout"}),
        ("discard/udp", ("-n", "20", "--timeout", "0.2", "--udp"), {"lost"}),
        ("refused", ("-n", "50",), {"connect"}),
        ("refused", ("-n", "50", "--connect-per-request"), {"connect"}),
    ],
)  # fmt: skip
def test_errors_are_counted_and_exit_1(servers, refused_port, server, args, kinds):
    if server == "refused":
        target = f"127.0.0.1:{refused_port}"
    elif server == "discard/udp":
        target = address(servers["discard"], "udp://").removeprefix("udp://")
    else:
        target = address(servers[server])
    result = bench(target, "-c", "3", "--warmup", "0", "--json", *args)
    assert result.returncode == 1, result.stderr
    document = json.loads(result.stdout)  # the report is printed all the same
    found = {kind for kind, count in document["errors"].items() if count}
    assert found and found <= kinds, document["errors"]
    assert document["error_total"] == sum(document["errors"].values())
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    total = document["error_total"]
    assert lines[0].startswith(f"prefork: error: {total:,} error"), lines[0]
    for kind in found:
        assert f"{kind} {document['errors'][kind]:,}" in lines[0]


def test_errors_in_the_warm_up_count(refused_port):
    result = bench(f"127.0.0.1:{refused_port}", "-c", "2", "-t", "0.2", "--warmup", "0.2")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "prefork: error: 2 errors: connect 2; "
        "no message was echoed: every connection failed in the warm-up"
    )


@pytest.mark.parametrize(
    "args",
    [
        ("-t", "1"),  # shorter than the default --timeout (2 s): no error is counted
        ("-t", "0.3", "--timeout", "10", "--warmup", "0"),
        ("-n", "5", "--timeout", "10", "-t", "0.5"),
        ("-t", "0.3", "--timeout", "10", "--udp"),
        ("-t", "0.5", "--connect-per-request", "--timeout", "10"),
    ],
)
def test_nothing_echoed_fails_whatever_the_durations(servers, args):
    """A server that never answers fails the run even when no wait has timed
    out yet; the report says n/a where there is nothing to measure."""
    scheme = "udp://" if "--udp" in args else ""
    target = address(servers["discard"], scheme).removeprefix("udp://")
    result = bench(target, "-c", "3", *args)
    assert result.returncode == 1, result.stdout
    assert_one_line_error(result, 1, "no message was echoed")
    assert re.search(r"messages\s+0\n", result.stdout), result.stdout
    assert re.search(r"MB/s\s+n/a\n", result.stdout), result.stdout
    for name in ("p50", "p90", "p99", "p99.9", "max"):
        assert re.search(rf"latency {re.escape(name)}\s+n/a\n", result.stdout), result.stdout
    assert "0.0 us" not in result.stdout
    document = json.loads(bench(target, "-c", "3", *args, "--json").stdout)
    assert document["messages"] == 0 and document["mb_per_second"] is None
    assert set(document["latency_us"].values()) == {None}


def test_nothing_echoed_says_what_was_still_awaited(servers):
    result = bench(address(servers["discard"]), "-c", "3", "-t", "0.5", "--warmup", "0.2")
    assert re.fullmatch(
        r"prefork: error: no message was echoed in 0\.5\d s "
        r"\(3 still awaited their echo at the end; --timeout is 2 s\)\n",
        result.stderr,
    ), result.stderr


def test_wrong_echoes_are_not_counted_as_echoed_bytes(servers):
    """Bytes came back, but no message was right: no MB/s is made of them."""
    result = bench(address(servers["corrupt"]), "-c", "2", "-n", "20", "--warmup", "0")
    assert result.returncode == 1
    assert re.search(r"MB/s\s+n/a\n", result.stdout), result.stdout
    assert "mismatch 20; no message was echoed" in result.stderr


@pytest.mark.parametrize("mode", ["stream", "connect", "datagram"])
def test_json_counts_add_up_over_the_warm_up_and_the_window(servers, mode):
    """Bytes and connections cover the whole run, as errors do: what came
    back never exceeds what was sent, and the connections are all counted,
    however many the warm-up opened."""
    size, connections = 1000, 4
    scheme = "udp://" if mode == "datagram" else ""
    extra = ["--connect-per-request"] if mode == "connect" else []
    result = bench(
        address(servers["echo"], scheme), "-t", "0.5", "--warmup", "0.3", "-c", str(connections),
        "-s", str(size), "--json", *extra,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    warmup = document["warmup"]
    assert warmup["seconds"] >= 0.3 and warmup["messages"] > 0 and document["messages"] > 0
    answered = warmup["messages"] + document["messages"]
    in_flight = document["in_flight"]
    assert 0 <= in_flight <= connections
    sent, received = document["bytes_sent"], document["bytes_received"]
    assert answered * size <= received <= sent <= (answered + in_flight) * size, document
    assert document["mb_per_second"] == pytest.approx(
        document["messages"] * size / document["seconds"] / 1e6
    )
    opened = document["connections_opened"]
    if mode == "stream":
        assert opened == warmup["connections_opened"] == connections
    elif mode == "connect":
        # One per message: each answered one's, and those in flight whose connect completed.
        assert answered <= opened <= answered + in_flight
        assert warmup["connections_opened"] >= warmup["messages"] > 0


@pytest.mark.parametrize("name", ["cython", "python"])
def test_ctrl_c_reports_what_was_measured(servers, name):
    proc = subprocess.Popen(
        prefork_command(
            "bench", address(servers["echo"]), "-t", "60", "-c", "2", "--warmup", "0", "--json"
        ),
        env=implementation_env(name),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        time.sleep(2)  # running by then
        began = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
        assert time.monotonic() - began < 5
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert proc.returncode == 0, err
    document = json.loads(out)
    assert document["implementation"] == name
    assert document["interrupted"] is True and document["messages"] > 0
    assert 0.3 < document["seconds"] < 10 and document["error_total"] == 0


@pytest.mark.parametrize("ending", ["time", "ctrl-c"])
@pytest.mark.parametrize("drawing", ["rich", "plain"])
def test_progress_line_on_a_terminal(servers, tmp_path, drawing, ending):
    """Drawn with rich when it is importable, by hand when it is not (a
    ``rich.py`` that raises ImportError comes first on the path); cleared in
    either case, at the end of ``-t`` or on Ctrl-C, before the report, which
    follows on the same terminal."""
    if drawing == "rich":
        pytest.importorskip("rich")
        env = dict(os.environ)
    else:
        (tmp_path / "rich.py").write_text("raise ImportError('rich is blocked by this test')\n")
        env = handler_env(tmp_path)
    env["TERM"] = "xterm"  # rich draws nothing on a "dumb" terminal
    seconds = "1.2" if ending == "time" else "60"
    leader, follower = os.openpty()
    proc = subprocess.Popen(
        prefork_command("bench", address(servers["echo"]), "-t", seconds, "-c", "2"),
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=follower,
        start_new_session=True,
    )
    os.close(follower)
    seen = b""
    interrupted = False
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(leader, 4096)
                except OSError:  # EIO: the process closed the terminal
                    break
                if not chunk:
                    break
                seen += chunk
                if ending == "ctrl-c" and not interrupted and b"running" in seen:
                    proc.send_signal(signal.SIGINT)
                    interrupted = True
            elif proc.poll() is not None:
                break
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        os.close(leader)
    text = seen.decode()
    progress, _, report = text.partition(f"prefork bench {address(servers['echo'])} (")
    assert report, text  # the report is there, after the progress line
    assert ("(interrupted)" in report) == (ending == "ctrl-c"), report
    figures = (
        r"running +\d+\.\d s +[1-9][\d,]* msg/s +[\d,]+\.\d MB/s +p99 +[\d.]+ [um]?s +errors 0"
    )
    assert re.search(figures, progress), progress
    if drawing == "rich":
        # rich hides the cursor while it draws, then shows it and erases its line.
        assert progress.startswith("\x1b[?25l") and "\x1b[K" not in progress, progress
        assert re.search(r"\x1b\[\?25h\r(\x1b\[1A\x1b\[2K)+$", progress), progress
    else:
        assert "\x1b[?25" not in text and progress.count("\r") >= 2, progress
        assert progress.endswith("\r\x1b[K")  # the line is cleared before the report


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["-c", "0"], ["-c/--connections", "'0'"]),
        (["-s", "0"], ["-s/--size", "'0'"]),
        (["-s", "1X"], ["-s/--size", "'1X'"]),
        (["-d", "x"], ["-d/--depth", "'x'"]),
        (["-t", "0"], ["-t/--duration", "'0'"]),
        (["-t", "-1"], ["-t/--duration", "'-1'"]),
        (["-n", "0"], ["-n/--count", "'0'"]),
        (["--warmup", "soon"], ["--warmup", "'soon'"]),
        (["--timeout", "0"], ["--timeout", "'0'"]),
        (["--udp", "-s", "4"], ["-s/--size", "'4'"]),
        (["--udp", "-s", "64K"], ["-s/--size", "'64K'"]),
        (["--udp", "--connect-per-request"], ["--connect-per-request", "UDP"]),
        (["--connect-per-request", "-d", "2"], ["-d/--depth"]),
        (["-c", "2000", "-d", "1000"], ["-c/--connections", "2,000,000"]),
        (["--metrics", "unix:/tmp/m"], ["--metrics", "'unix:/tmp/m'"]),
        (["--frobnicate"], ["--frobnicate"]),
    ],
)
def test_bad_options_are_one_line_usage_errors(args, needles):
    assert_one_line_error(run("bench", "127.0.0.1:7", *args), 2, *needles)


@pytest.mark.parametrize("text", ["127.0.0.1", "fd://3", "proxy:127.0.0.1:7", "127.0.0.1:0"])
def test_bad_addresses_are_usage_errors(text):
    assert_one_line_error(run("bench", text), 2, "ADDRESS")


def test_unix_socket_that_does_not_exist(tmp_path: Path):
    result = run("bench", f"unix:{tmp_path / 'nobody.sock'}", "-c", "1", "-n", "1", "--warmup", "0")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "prefork: error: 1 error: connect 1; no message was echoed: every connection failed"
    )


def test_help():
    result = run("bench", "--help")
    assert result.returncode == 0 and result.stderr == ""
    options = "--connections --size --depth --duration --count --warmup --udp"
    options += " --connect-per-request --timeout --json --metrics --request --reply"
    for option in options.split():
        assert option in result.stdout
    assert "bench" in run("--help").stdout
