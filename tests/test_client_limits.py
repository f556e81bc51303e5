"""Per-client TCP limits: --max-conns-per-ip and --conn-rate-per-ip, across
workers, keyed by the PROXY header's source behind a balancer.

Clients come from different loopback addresses (127.0.0.2, 127.0.0.3...),
which any process may bind to. The hot loops are tested over real sockets
in both implementations, sharing one table as the workers of a server do;
then real servers of every worker class, through HUP and a respawn, and
behind HAProxy with send-proxy-v2.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import threading
import time

import pytest

from prefork import _fastio_common, _fastio_py
from prefork._fastio_common import CLIENT_HEADER, client_tables_region

from support import (
    assert_one_line_error,
    handler_env,
    metrics_address,
    require_compiled,
    run,
    running_haproxy,
    samples_of,
    scrape,
    wait_until,
)

pytestmark = pytest.mark.timeout(90)

# A reply from a loop that has taken the connection comes at once; a busy
# machine may still pause the loop's thread or the server's worker this long.
REPLY_WAIT = 10.0


def region(slots: int = 2, entries: int = 1024) -> bytearray:
    """A client region as the master maps it, ``slots`` in use."""
    tables = bytearray(client_tables_region(slots, entries))
    CLIENT_HEADER.pack_into(tables, 0, slots, entries)
    return tables


class LoopThread:
    """An echo EventLoop of ``impl`` on its own listener, in a thread."""

    def __init__(self, impl, proxied: bool = False, **options) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.listener.setblocking(False)
        if proxied:
            options["proxy_listeners"] = [self.listener]
        self.loop = impl.EventLoop([self.listener], "echo", **options)
        self.stop = threading.Event()
        self.thread = threading.Thread(
            target=lambda: [self.loop.run(0.05) for _ in iter(self.stop.is_set, True)],
            daemon=True,
        )
        self.thread.start()

    @property
    def address(self) -> tuple[str, int]:
        return self.listener.getsockname()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.loop.close()
        self.listener.close()


@pytest.fixture
def loops():
    made: list[LoopThread] = []

    def make(impl, **options) -> LoopThread:
        made.append(LoopThread(impl, **options))
        return made[-1]

    yield make
    for loop in made:
        loop.close()


@pytest.fixture
def clients():
    """Open connections, closed at the end."""
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def connect_from(host: str, address: tuple[str, int], opened: list, header: bytes = b""):
    """A connection from ``host`` that sent ``header`` then ``hi``: the socket
    if it was served (the echo came back), None if it was closed unserved."""
    sock = socket.socket()
    sock.settimeout(REPLY_WAIT)
    sock.bind((host, 0))
    sock.connect(address)
    try:
        sock.sendall(header + b"hi")
        data = sock.recv(16)
    except ConnectionResetError:
        data = b""
    if data == b"":
        sock.close()
        return None
    assert data == b"hi", data
    opened.append(sock)
    return sock


# -- the rule, as the common module states it -----------------------------------------


@pytest.mark.parametrize(
    "peer, key",
    [
        (("127.0.0.2", 5), (0, 0xFFFF_7F000002)),
        (("::ffff:127.0.0.2", 5, 0, 0), (0, 0xFFFF_7F000002)),  # one client, either way
        (("::1", 5, 0, 0), (0, 1)),
        (("2001:db8::1", 5, 0, 0), (0x20010DB8_00000000, 1)),
        (("fe80::1%lo", 5, 0, 1), (0xFE80_0000_0000_0000, 1)),
        ("/run/some.sock", None),  # a UNIX socket's peer is not limited
        (None, None),
    ],
)
def test_which_address_a_client_is_counted_by(peer, key):
    assert _fastio_common.client_key(peer) == key
    if key is not None:
        assert _fastio_common.client_address(key) == peer[0].split("%")[0].replace("::ffff:", "")


def test_the_rate_counts_an_ipv6_client_by_its_64():
    one = _fastio_common.client_key(("2001:db8:0:1::1", 1, 0, 0))
    other = _fastio_common.client_key(("2001:db8:0:1::2", 1, 0, 0))
    assert _fastio_common.client_rate_key(one) == _fastio_common.client_rate_key(other)
    assert _fastio_common.client_rate_key(_fastio_common.client_key(("10.1.2.3", 1))) == (
        4,
        0x0A010203,
    )


# -- the hot loops, both implementations ----------------------------------------------


def test_a_client_over_the_limit_is_closed_unserved_and_counted(impl, loops, clients):
    served = loops(impl, conn_limit=3, conn_tables=region(1))
    for _ in range(3):
        assert connect_from("127.0.0.2", served.address, clients) is not None
    assert connect_from("127.0.0.2", served.address, clients) is None
    assert served.loop.limit_refused_conns == 1
    assert served.loop.limit_refused_from == {"conns": "127.0.0.2", "rate": ""}
    assert connect_from("127.0.0.3", served.address, clients) is not None  # another client
    clients[0].close()  # one of the three ends: its place frees
    assert wait_until(lambda: served.loop.active == 3, REPLY_WAIT)
    assert connect_from("127.0.0.2", served.address, clients) is not None
    assert connect_from("127.0.0.2", served.address, clients) is None
    assert served.loop.limit_refused_conns == 2
    assert served.loop.limit_evictions == 0


def test_loops_sharing_the_tables_share_the_limit(impl, loops, clients):
    """Two workers' loops, slots 0 and 1 of one region: the limit is the sum."""
    tables = region(2)
    first = loops(impl, conn_limit=3, conn_tables=tables, conn_slot=0)
    second = loops(impl, conn_limit=3, conn_tables=tables, conn_slot=1)
    assert connect_from("127.0.0.2", first.address, clients) is not None
    assert connect_from("127.0.0.2", first.address, clients) is not None
    assert connect_from("127.0.0.2", second.address, clients) is not None
    assert connect_from("127.0.0.2", second.address, clients) is None
    assert connect_from("127.0.0.2", first.address, clients) is None
    assert (first.loop.limit_refused_conns, second.loop.limit_refused_conns) == (1, 1)


def test_the_compiled_loop_and_its_twin_read_one_table_alike(loops, clients):
    compiled = require_compiled("_fastio")
    tables = region(2)
    fast = loops(compiled, conn_limit=2, conn_tables=tables, conn_slot=0)
    spec = loops(_fastio_py, conn_limit=2, conn_tables=tables, conn_slot=1)
    assert connect_from("127.0.0.2", fast.address, clients) is not None
    assert connect_from("127.0.0.2", spec.address, clients) is not None
    assert connect_from("127.0.0.2", fast.address, clients) is None
    assert connect_from("127.0.0.2", spec.address, clients) is None
    clients[0].close()  # the compiled loop's: the twin sees its count drop
    assert wait_until(lambda: fast.loop.active == 0, REPLY_WAIT)
    assert connect_from("127.0.0.2", spec.address, clients) is not None


def test_a_proxied_connection_is_counted_by_the_header_source(impl, loops, clients):
    served = loops(impl, proxied=True, conn_limit=1, conn_tables=region(1))

    def header(source: str) -> bytes:
        return f"PROXY TCP4 {source} 127.0.0.1 40000 7\r\n".encode()

    # All from 127.0.0.1, the balancer; the clients are the headers' sources.
    assert connect_from("127.0.0.1", served.address, clients, header("10.0.0.1")) is not None
    assert connect_from("127.0.0.1", served.address, clients, header("10.0.0.2")) is not None
    assert connect_from("127.0.0.1", served.address, clients, header("10.0.0.1")) is None
    assert served.loop.limit_refused_from["conns"] == "10.0.0.1"


def test_the_rate_limit_admits_the_burst_then_the_rate(impl, loops, clients):
    served = loops(impl, conn_rate=2.0, conn_burst=3)
    started = time.monotonic()
    admitted = 0
    for _ in range(12):
        sock = connect_from("127.0.0.2", served.address, clients)
        admitted += sock is not None
        if sock is not None:
            sock.close()
    elapsed = time.monotonic() - started
    # GCRA: over any window W at most rate * W + burst; the burst at least.
    assert 3 <= admitted <= 3 + 2.0 * elapsed + 1, (admitted, elapsed)
    assert served.loop.limit_refused_rate == 12 - admitted
    assert served.loop.limit_refused_from["rate"] == "127.0.0.2"
    assert connect_from("127.0.0.3", served.address, clients) is not None  # its own bucket


def test_a_full_table_evicts_counts_and_keeps_limiting(impl, loops, clients):
    """A table of one set of four: a fifth client pushes out the first."""
    served = loops(impl, conn_limit=1, conn_tables=region(1, entries=4))
    for host in range(2, 6):
        assert connect_from(f"127.0.0.{host}", served.address, clients) is not None
    assert served.loop.limit_evictions == 0
    assert connect_from("127.0.0.6", served.address, clients) is not None
    assert served.loop.limit_evictions == 1  # counted, never silent
    assert connect_from("127.0.0.6", served.address, clients) is None  # still limited
    assert connect_from("127.0.0.3", served.address, clients) is None
    # The client pushed out (the first of the fewest: 127.0.0.2) lost its count.
    assert connect_from("127.0.0.2", served.address, clients) is not None
    assert served.loop.limit_evictions == 2


@pytest.mark.parametrize(
    "options",
    [
        {"conn_limit": -1},
        {"conn_limit": 1, "conn_tables": bytes(client_tables_region(1, 4))},  # read-only
        {"conn_limit": 1, "conn_tables": region(1, entries=4), "conn_slot": 1},  # not in use
        {"conn_limit": 1, "conn_tables": region(1, entries=12)},  # 3 sets: not a power of two
        {"conn_rate": -1.0},
        {"conn_rate": 1.0, "conn_burst": 0},
    ],
)
def test_limit_arguments_are_checked(impl, options):
    with socket.socket() as listener:
        with pytest.raises(ValueError):
            impl.EventLoop([listener], "echo", **options)


# -- real servers -----------------------------------------------------------------------

CLASSES = {
    "event": ("-k", "event"),
    "asyncio": ("-k", "asyncio"),
    "thread": ("-k", "thread", "--threads", "4"),
}


def refusals(server) -> dict[str, float]:
    values = scrape(metrics_address(server))
    return {
        labels["reason"]: value
        for labels, value in samples_of(values, "prefork_limit_refused_total")
    }


@pytest.mark.parametrize("worker_class", sorted(CLASSES))
def test_the_11th_connection_from_one_address_is_refused_across_4_workers(
    server_factory, clients, worker_class
):
    server = server_factory(
        *CLASSES[worker_class],
        "-w",
        "4",
        "--max-conns-per-ip",
        "10",
        "--metrics",
        "127.0.0.1:0",
    )
    server.wait_workers(4)
    address = server.tcp()
    for _ in range(10):
        assert connect_from("127.0.0.2", address, clients) is not None
    assert connect_from("127.0.0.2", address, clients) is None
    assert connect_from("127.0.0.3", address, clients) is not None  # another address
    assert wait_until(lambda: refusals(server).get("conns") == 1, 5), refusals(server)
    clients[0].close()  # a slot frees when a connection ends
    assert wait_until(lambda: connect_from("127.0.0.2", address, clients) is not None, 10)
    assert wait_until(
        lambda: "over --max-conns-per-ip 10 (last from 127.0.0.2)" in server.log, 5
    ), server.log


def test_a_sync_worker_counts_across_workers_too(server_factory, clients):
    """A sync worker holds one connection: two clients' worth over four workers."""
    server = server_factory("-k", "sync", "-w", "4", "--max-conns-per-ip", "2")
    server.wait_workers(4)
    address = server.tcp()
    assert connect_from("127.0.0.2", address, clients) is not None
    assert connect_from("127.0.0.2", address, clients) is not None
    assert connect_from("127.0.0.2", address, clients) is None  # a free worker refuses it
    assert connect_from("127.0.0.3", address, clients) is not None


def test_the_limit_holds_through_hup_and_a_respawn(server_factory, clients):
    server = server_factory("-w", "2", "--max-conns-per-ip", "3", "--graceful-timeout", "30")
    old = server.wait_workers(2)
    address = server.tcp()
    for _ in range(3):
        assert connect_from("127.0.0.2", address, clients) is not None
    server.signal(signal.SIGHUP)  # the old workers keep their connections while they drain
    assert wait_until(lambda: len(set(server.workers()) - set(old)) == 2, 15), server.log
    assert connect_from("127.0.0.2", address, clients) is None  # the new ones see them
    for sock in clients:
        sock.close()
    clients.clear()
    assert wait_until(lambda: set(server.workers()).isdisjoint(old), 15), server.log
    for _ in range(3):
        assert connect_from("127.0.0.2", address, clients) is not None
    assert connect_from("127.0.0.2", address, clients) is None
    # A worker killed with its connections takes their counts with it, and
    # only its own: the limit holds for the others' connections.
    victim = server.workers()[0]
    os.kill(victim, signal.SIGKILL)
    # Its replacement runs once the master has reaped it and cleared its table.
    assert wait_until(lambda: victim not in server.workers() and len(server.workers()) == 2, 15), (
        server.log
    )
    alive = []
    for sock in clients:
        try:
            sock.sendall(b"hi")
            alive.append(sock.recv(16) == b"hi")
        except OSError:
            alive.append(False)
    room = 3 - sum(alive)
    served = [connect_from("127.0.0.2", address, clients) for _ in range(room + 1)]
    assert [sock is not None for sock in served] == [True] * room + [False], (alive, served)


@pytest.mark.parametrize(
    "args, needle",
    [
        (("--max-conns-per-ip", "-1"), "--max-conns-per-ip"),
        (("--conn-rate-per-ip", "fast"), "--conn-rate-per-ip"),
        (("--conn-burst-per-ip", "0"), "--conn-burst-per-ip"),
        (("--per-ip-table", "1000"), "--per-ip-table"),
    ],
)
def test_bad_limit_settings_are_one_line_and_exit_2(args, needle):
    assert_one_line_error(run("serve", *args), 2, needle)


# -- behind HAProxy ---------------------------------------------------------------------

WHO_HANDLER = """
class Who:
    '''Echoes, after a line naming the client address it was given.'''
    def connection_made(self, transport):
        self.transport = transport
        transport.write(transport.get_extra_info("peername")[0].encode() + b"\\n")
    def data_received(self, data):
        self.transport.write(data)
"""

HAPROXY_CONFIG = """
defaults
    mode tcp
    timeout connect 2s
    timeout client 20s
    timeout server 20s

frontend limited
    bind 127.0.0.1:{front}
    default_backend prefork

backend prefork
    server a 127.0.0.1:{port} send-proxy-v2
"""


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed")
def test_behind_haproxy_the_limit_is_per_real_client(server_factory, clients, tmp_path):
    (tmp_path / "who_handler.py").write_text(WHO_HANDLER)
    server = server_factory(
        "-b",
        "proxy:127.0.0.1:0",
        "-w",
        "2",
        "--max-conns-per-ip",
        "2",
        "--handler",
        "who_handler:Who",
        env=handler_env(tmp_path),
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        front = probe.getsockname()[1]
    config = tmp_path / "haproxy.cfg"
    config.write_text(HAPROXY_CONFIG.format(front=front, port=server.tcp()[1]))
    with running_haproxy(config, front):

        def through(host: str) -> bool:
            """Whether a connection from ``host`` through HAProxy is served."""
            sock = socket.socket()
            sock.settimeout(REPLY_WAIT)
            sock.bind((host, 0))
            try:
                sock.connect(("127.0.0.1", front))
                sock.sendall(b"hi")
                data = b""
                while not data.endswith(b"hi") and (chunk := sock.recv(64)):
                    data += chunk
            except ConnectionError:
                data = b""
            if data != f"{host}\n".encode() + b"hi":
                assert data == b"", data
                sock.close()
                return False
            clients.append(sock)
            return True

        assert through("127.0.0.2") and through("127.0.0.2")
        assert not through("127.0.0.2")  # the balancer's address is not the key
        assert through("127.0.0.3") and through("127.0.0.3")
        assert wait_until(lambda: "(last from 127.0.0.2)" in server.log, 5), server.log
