"""``prefork bench --tls``: both load generators as TLS clients, against real servers.

The loop (``LoadGen`` with ``tls=``) is driven once per implementation
against ``prefork serve --certfile`` (its compiled TLS loop, or the twin's,
as CI runs it) and against TLS peers written here that do what a fast
server never does: trickle the echo back in one-byte records through small
socket buffers (every write of the client's comes up short and is made
again, every read finds part of a record), and note how each connection
ended (close_notify, or not). The command is run as a real process for its
options, report, JSON and exit status. Certificates come from the session's
``certs`` fixture (a CA, ``server`` for localhost and 127.0.0.1, ``other``
for other.test).
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from prefork import _loadgen_py

from support import Server, assert_one_line_error, require_compiled, run, start_server

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(params=["cython", "python"])
def impl(request: pytest.FixtureRequest) -> ModuleType:
    """Each loop test runs once per implementation."""
    if request.param == "python":
        return _loadgen_py
    return require_compiled("_loadgen")


@pytest.fixture(scope="module")
def tls_server(certs: Path) -> Iterator[Server]:
    """A TLS echo server for the module: localhost's certificate, and
    other.test's for a client that asks for that name (SNI)."""
    other = f"other.test={certs / 'other.pem'},{certs / 'other.key'}"
    server = start_server(
        "-w", "2", "--certfile", str(certs / "server.pem"), "--keyfile", str(certs / "server.key"),
        "--sni", other,
    )  # fmt: skip
    try:
        yield server
    finally:
        server.kill_all()


def port_of(server: Server) -> int:
    return int(server.addresses[0].rpartition(":")[2])


def trusting(certs: Path, **settings: object) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    for name, value in settings.items():
        setattr(context, name, value)
    return context


def run_until_done(generator, limit: int, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not generator.run(0.2, limit):
        assert time.monotonic() < deadline, "the run did not end"


def errors_of(generator) -> dict[str, int]:
    return {kind: count for kind, count in generator.errors.items() if count}


# -- the loop against prefork's TLS server, both implementations ------------------------


@pytest.mark.parametrize(("size", "depth"), [(1, 1), (1000, 7), (100_000, 3)])
def test_stream_over_tls_counts_every_message_and_byte(impl, tls_server, certs, size, depth):
    generator = impl.LoadGen(
        socket.AF_INET, ("127.0.0.1", port_of(tls_server)), "stream",
        connections=4, size=size, depth=depth,
        tls=trusting(certs), server_hostname="localhost",
    )  # fmt: skip
    limit = 40 if size > 10_000 else 400
    try:
        run_until_done(generator, limit)
        assert errors_of(generator) == {}
        assert (generator.messages, generator.failed, generator.in_flight) == (limit, 0, 0)
        assert generator.bytes_sent == generator.bytes_received == limit * size
        assert generator.connections_opened == generator.live == 4
        assert sum(generator.histogram()) == limit
    finally:
        generator.close()


def test_connect_mode_makes_a_handshake_per_message(impl, tls_server, certs):
    generator = impl.LoadGen(
        socket.AF_INET, ("127.0.0.1", port_of(tls_server)), "connect",
        connections=3, size=64, tls=trusting(certs), server_hostname="127.0.0.1",
    )  # fmt: skip
    try:
        run_until_done(generator, 60)
        assert errors_of(generator) == {}
        assert generator.messages == generator.connections_opened == 60
        assert generator.bytes_sent == generator.bytes_received == 60 * 64
        assert generator.live == 0
    finally:
        generator.close()


@pytest.mark.parametrize(
    ("name", "verified"),
    [
        ("localhost", True),
        ("127.0.0.1", True),  # an address: checked against the certificate's IP entries
        ("other.test", True),  # only if it went as SNI: the server then shows other.test's
        ("127.0.0.2", False),
        ("elsewhere.test", False),
    ],
)
def test_the_server_name_is_sent_and_verified(impl, tls_server, certs, name, verified):
    generator = impl.LoadGen(
        socket.AF_INET, ("127.0.0.1", port_of(tls_server)), "connect",
        connections=2, size=16, tls=trusting(certs), server_hostname=name,
    )  # fmt: skip
    try:
        run_until_done(generator, 6)
        if verified:
            assert (generator.messages, errors_of(generator)) == (6, {})
        else:
            assert (generator.messages, generator.failed) == (0, 6)
            assert errors_of(generator) == {"tls": 6}
            assert generator.connections_opened == 0
    finally:
        generator.close()


def test_both_implementations_count_the_same_over_tls(tls_server, certs):
    compiled = require_compiled("_loadgen")
    figures = []
    for module in (compiled, _loadgen_py):
        generator = module.LoadGen(
            socket.AF_INET, ("127.0.0.1", port_of(tls_server)), connections=5, size=3333,
            depth=2, tls=trusting(certs), server_hostname="localhost",
        )  # fmt: skip
        try:
            run_until_done(generator, 321)
            figures.append(
                (generator.messages, generator.failed, generator.bytes_sent,
                 generator.bytes_received, generator.connections_opened, generator.errors)
            )  # fmt: skip
        finally:
            generator.close()
    assert figures[0] == figures[1]
    assert figures[0][:5] == (321, 0, 321 * 3333, 321 * 3333, 5)


# -- handshakes that fail are "tls" errors -------------------------------------------------


def test_an_untrusted_certificate_fails_every_handshake(impl, tls_server):
    untrusted = ssl.create_default_context()  # the system's CAs: not the test CA
    generator = impl.LoadGen(
        socket.AF_INET, ("127.0.0.1", port_of(tls_server)), "stream",
        connections=3, size=10, tls=untrusted, server_hostname="localhost",
    )  # fmt: skip
    try:
        run_until_done(generator, 0)  # every connection fails: the run ends
        assert errors_of(generator) == {"tls": 3}
        assert (generator.messages, generator.connections_opened, generator.live) == (0, 0, 0)
    finally:
        generator.close()


def test_a_plaintext_server_is_a_tls_error(impl, server_factory):
    plain = server_factory("-w", "1")  # echoes the ClientHello back
    insecure = ssl.create_default_context()
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE
    generator = impl.LoadGen(
        socket.AF_INET, ("127.0.0.1", port_of(plain)), "connect", connections=2, size=10,
        tls=insecure,
    )  # fmt: skip
    try:
        run_until_done(generator, 4)
        assert (generator.messages, generator.failed) == (0, 4)
        assert errors_of(generator) == {"tls": 4}
    finally:
        generator.close()


@pytest.mark.parametrize(("mode", "limit", "failed"), [("stream", 0, 0), ("connect", 2, 2)])
def test_a_handshake_that_never_ends_times_out(impl, certs, mode, limit, failed):
    """A stream connection starts its messages after the handshake (none
    fails); a connect-mode one queued its message before connecting."""
    with socket.socket() as silent:  # the kernel accepts; nobody ever answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        generator = impl.LoadGen(
            socket.AF_INET, silent.getsockname(), mode, connections=2, size=10,
            timeout=0.3, tls=trusting(certs), server_hostname="localhost",
        )  # fmt: skip
        try:
            started = time.monotonic()
            run_until_done(generator, limit)
            assert time.monotonic() - started >= 0.3
            assert errors_of(generator) == {"tls": 2}
            assert (generator.messages, generator.failed) == (0, failed)
        finally:
            generator.close()


def test_bad_tls_arguments_are_refused(impl, certs):
    client = trusting(certs)
    address = ("127.0.0.1", 9)
    with pytest.raises(ValueError, match="datagram"):
        impl.LoadGen(socket.AF_INET, address, "datagram", size=16, tls=client,
                     server_hostname="localhost")  # fmt: skip
    with pytest.raises(ValueError, match="server_hostname is needed"):
        impl.LoadGen(socket.AF_INET, address, tls=client)
    with pytest.raises(ValueError, match="only for TLS"):
        impl.LoadGen(socket.AF_INET, address, server_hostname="localhost")
    with pytest.raises(ValueError, match="server-side"):
        impl.LoadGen(socket.AF_INET, address, tls=ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    with pytest.raises(TypeError, match="SSLContext"):
        impl.LoadGen(socket.AF_INET, address, tls=object(), server_hostname="localhost")
    with pytest.raises(ValueError, match="server name"):
        impl.LoadGen(socket.AF_INET, address, tls=client, server_hostname="a\0b")


# -- peers that trickle, and that watch how connections end ----------------------------


class TlsPeer:
    """A TLS echo server in threads, one per connection. With ``trickle``
    (a message size) it listens on a UNIX socket, whose send buffer does not
    grow as TCP's does on loopback (there a client's send buffer grows to
    megabytes and no send of a test-sized message is ever short), reads
    4 KiB at a time and echoes nothing until a whole message is in, then
    echoes it in 700-byte records: while the client's write of a message
    waits, nothing comes back to wake it but its socket turning writable.
    Each connection's end is noted in ``ends``: ``close_notify``, ``eof``
    (closed without it) or ``reset``. Bounded: it stops at ``close``."""

    def __init__(self, certs: Path, trickle: int, home: Path) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(certs / "server.pem", certs / "server.key")
        self.trickle = trickle
        if trickle:
            self.address = str(home / "peer.sock")
            self.listener = socket.socket(socket.AF_UNIX)
            self.listener.bind(self.address)
            self.listener.listen(16)
        else:
            self.listener = socket.create_server(("127.0.0.1", 0))
            self.address = self.listener.getsockname()
        self.listener.settimeout(0.2)
        self.ends: list[str] = []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(20)
        end = "reset"
        try:
            with self.context.wrap_socket(
                sock, server_side=True, suppress_ragged_eofs=False
            ) as tls:
                held = b""
                while not self.stopping.is_set():
                    data = tls.recv(4096 if self.trickle else 65536)
                    if not data:
                        end = "close_notify"  # Python's ssl reads b"" only after it
                        break
                    if not self.trickle:
                        tls.sendall(data)
                        continue
                    held += data
                    while len(held) >= self.trickle:
                        message, held = held[: self.trickle], held[self.trickle :]
                        for i in range(0, len(message), 700):
                            tls.sendall(message[i : i + 700])
        except ssl.SSLEOFError:
            end = "eof"
        except OSError:
            end = "reset"
        self.ends.append(end)

    def close(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=25)
        self.listener.close()


@pytest.fixture
def peer_factory(certs: Path, tmp_path: Path) -> Iterator:
    peers: list[TlsPeer] = []

    def factory(trickle: int = 0) -> TlsPeer:
        peer = TlsPeer(certs, trickle, tmp_path)
        peers.append(peer)
        return peer

    yield factory
    for peer in peers:
        peer.close()


def test_short_writes_and_split_records_lose_nothing(impl, peer_factory, certs):
    """Messages of 600,000 bytes, two in flight, over a UNIX socket (its
    send buffer holds about 200 KiB) to a peer that echoes a message only
    once it has all of it: the client's SSL writes stop short and must wait
    for the socket to turn writable, with nothing to read meanwhile; the
    echo comes back in 700-byte records."""
    peer = peer_factory(trickle=600_000)
    assert socket.socket(socket.AF_UNIX).getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < 600_000
    generator = impl.LoadGen(
        socket.AF_UNIX, peer.address, "stream", connections=2, size=600_000, depth=2,
        timeout=10, tls=trusting(certs), server_hostname="localhost",
    )  # fmt: skip
    try:
        run_until_done(generator, 6, seconds=60)
        assert errors_of(generator) == {}
        assert (generator.messages, generator.failed) == (6, 0)
        assert generator.bytes_sent == generator.bytes_received == 6 * 600_000
    finally:
        generator.close()


def test_a_connection_ends_with_close_notify(impl, peer_factory, certs):
    peer = peer_factory()
    generator = impl.LoadGen(
        socket.AF_INET, peer.address, "connect", connections=2, size=100,
        tls=trusting(certs), server_hostname="localhost",
    )  # fmt: skip
    try:
        run_until_done(generator, 10)
        assert (generator.messages, errors_of(generator)) == (10, {})
        assert wait_for(lambda: len(peer.ends) == 10)
        assert peer.ends == ["close_notify"] * 10
    finally:
        generator.close()


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# -- the command -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cython", "python"])
def test_bench_tls_json(tls_server, certs, name):
    import os

    env = dict(os.environ)
    env.pop("PREFORK_NO_EXTENSIONS", None)
    if name == "python":
        env["PREFORK_NO_EXTENSIONS"] = "1"
    else:
        require_compiled("_loadgen")
    result = run(
        "bench", f"127.0.0.1:{port_of(tls_server)}", "--tls", "--ca-certs",
        str(certs / "ca.pem"), "-n", "300", "-c", "3", "-s", "2K", "--warmup", "0.1", "--json",
        timeout=60, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["tls"] is True and document["implementation"] == name
    assert (document["messages"], document["failed"], document["error_total"]) == (300, 0, 0)
    assert document["connections_opened"] == 3


def test_bench_tls_handshakes_per_second(tls_server, certs):
    result = run(
        "bench", f"tls:127.0.0.1:{port_of(tls_server)}", "--insecure", "--connect-per-request",
        "-c", "2", "-s", "64", "-n", "40", "--warmup", "0",
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "connections over TLS" in result.stdout
    assert "TLS handshakes  40 (" in result.stdout


def test_bench_says_why_handshakes_fail(tls_server):
    result = run(
        "bench", f"127.0.0.1:{port_of(tls_server)}", "--tls", "-c", "2", "-n", "5",
        "--warmup", "0", timeout=60,
    )  # fmt: skip
    assert_one_line_error(
        result, 1, "2 errors: tls 2", "a handshake made to see why", "certificate"
    )


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["127.0.0.1:7", "--ca-certs", "ca.pem"], ["--ca-certs: only with --tls"]),
        (["127.0.0.1:7", "--sni", "x"], ["--sni: only with --tls"]),
        (["udp://127.0.0.1:7", "--tls"], ["no DTLS"]),
        (["unix:/tmp/nothing.sock", "--tls"], ["--sni NAME or --insecure"]),
        (["127.0.0.1:7", "--tls", "--insecure", "--ca-certs", "x"], ["--insecure"]),
    ],
)
def test_bad_tls_options_are_one_line_usage_errors(args, needles):
    assert_one_line_error(run("bench", *args), 2, *needles)


def test_an_unreadable_ca_file_is_one_line(tmp_path: Path):
    missing = tmp_path / "missing.pem"
    assert_one_line_error(
        run("bench", "127.0.0.1:7", "--tls", "--ca-certs", str(missing)), 1, "--ca-certs"
    )
