"""TLS: real servers of every worker class, real clients (Python's ssl and
``openssl s_client``), certificates made by ``openssl`` for the test.

The event worker runs TLS through its loop; ``event`` and ``event-twin``
serve with the compiled loop and with the pure-Python twin
(``PREFORK_NO_EXTENSIONS=1``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from support import (
    assert_one_line_error,
    exchange,
    handler_env,
    prefork_command,
    run,
    wait_until,
)

pytestmark = pytest.mark.timeout(90)

KINDS = ["event", "event-twin", "sync", "thread", "asyncio"]


def server_args(certs: Path, *extra: str) -> list[str]:
    return ["--certfile", str(certs / "server.pem"), "--keyfile", str(certs / "server.key"), *extra]


def kind_args(kind: str) -> tuple[list[str], dict[str, str] | None]:
    env = None
    if kind == "event-twin":
        env = dict(os.environ, PREFORK_NO_EXTENSIONS="1")
        kind = "event"
    return ["-k", kind], env


def client_context(certs: Path, **options) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    for name, value in options.items():
        setattr(context, name, value)
    return context


def tls_connect(server, context: ssl.SSLContext, index: int = 0, name: str = "localhost"):
    sock = server.connect(index, timeout=30)
    return context.wrap_socket(sock, server_hostname=name)


def tls_exchange(tls: ssl.SSLSocket, payload: bytes, timeout: float = 60.0) -> bytes:
    """Send ``payload`` while reading the echo, until as many bytes came back
    (or the server closed). One thread: an SSL object must not be read and
    written from two threads at once."""
    import select

    tls.setblocking(False)
    pending = memoryview(payload)
    received = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while len(received) < len(payload):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(received)} of {len(payload)} bytes echoed")
            if not tls.pending():  # OpenSSL may hold decrypted bytes epoll cannot see
                select.select([tls], [tls] if pending else [], [], min(left, 1.0))
            if pending:
                try:
                    pending = pending[tls.send(pending[: 1 << 16]) :]
                except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                    pass
            try:
                chunk = tls.recv(1 << 20)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                continue
            if not chunk:
                break
            received += chunk
    finally:
        tls.setblocking(True)
        tls.settimeout(timeout)
    return bytes(received)


# -- echo, every worker class ------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_echo_is_byte_exact_over_tls_from_one_byte_to_megabytes(server_factory, certs, kind):
    args, env = kind_args(kind)
    server = server_factory(*args, "-w", "2", *server_args(certs), env=env)
    assert "(TLS)" in server.log
    context = client_context(certs)
    for size in (1, 1000, 65537, 3 * 1024 * 1024 + 7):
        payload = os.urandom(size)
        with tls_connect(server, context) as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
            assert tls_exchange(tls, payload) == payload


@pytest.mark.parametrize("kind", KINDS)
def test_tls_and_plain_listeners_side_by_side(server_factory, certs, kind):
    args, env = kind_args(kind)
    server = server_factory(
        *args, "-b", "tls:127.0.0.1:0", "-b", "127.0.0.1:0", *server_args(certs), env=env
    )
    payload = os.urandom(100_000)
    with tls_connect(server, client_context(certs), index=0) as tls:
        assert tls_exchange(tls, payload) == payload
    with server.connect(1) as plain:
        assert exchange(plain, payload) == payload


# -- what the client gets -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["event", "sync"])
def test_tls_1_2_is_refused_under_min_version_1_3(server_factory, certs, kind):
    args, env = kind_args(kind)
    server = server_factory(*args, *server_args(certs, "--tls-min-version", "1.3"), env=env)
    old = client_context(certs, maximum_version=ssl.TLSVersion.TLSv1_2)
    with pytest.raises(ssl.SSLError):
        with tls_connect(server, old):
            pass
    with tls_connect(server, client_context(certs)) as tls:
        assert tls.version() == "TLSv1.3"
        assert tls_exchange(tls, b"ping") == b"ping"


@pytest.mark.parametrize("kind", KINDS)
def test_a_client_without_a_certificate_is_refused_under_verify_client_required(
    server_factory, certs, kind
):
    args, env = kind_args(kind)
    extra = ("--ca-certs", str(certs / "ca.pem"), "--verify-client", "required")
    server = server_factory(*args, *server_args(certs, *extra), env=env)
    # TLS 1.3: the client's handshake ends before the server has checked,
    # so the refusal arrives as an alert on the first read.
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        with tls_connect(server, client_context(certs)) as tls:
            tls.settimeout(30)
            tls.sendall(b"ping")
            if not tls.recv(10):
                raise ConnectionResetError("closed without an echo")
    context = client_context(certs)
    context.load_cert_chain(str(certs / "client.pem"), str(certs / "client.key"))
    with tls_connect(server, context) as tls:
        assert tls_exchange(tls, b"with a certificate") == b"with a certificate"


@pytest.mark.parametrize("kind", ["event", "sync", "asyncio"])
def test_sni_picks_the_certificate_and_unknown_names_get_the_default(server_factory, certs, kind):
    args, env = kind_args(kind)
    sni = f"other.test={certs / 'other.pem'},{certs / 'other.key'}"
    server = server_factory(*args, *server_args(certs, "--sni", sni), env=env)
    context = client_context(certs)
    with tls_connect(server, context, name="other.test") as tls:
        assert dict(x[0] for x in tls.getpeercert()["subject"])["commonName"] == "other.test"
    context.check_hostname = False
    for name in ("localhost", "unknown.test"):
        with tls_connect(server, context, name=name) as tls:
            assert dict(x[0] for x in tls.getpeercert()["subject"])["commonName"] == "localhost"


HANDLERS = textwrap.dedent(
    """
    import asyncio, json, os

    def _info(transport):
        ssl_object = transport.get_extra_info("ssl_object")
        return json.dumps({
            "alpn": transport.get_extra_info("selected_alpn_protocol"),
            "cipher": (transport.get_extra_info("cipher") or [None])[0],
            "version": ssl_object.version() if ssl_object is not None else None,
            "peercert": bool(transport.get_extra_info("peercert")),
            "peername": list(transport.get_extra_info("peername")),
            "pid": os.getpid(),
        }).encode() + b"\\n"

    class Info(asyncio.Protocol):
        def connection_made(self, transport):
            transport.write(_info(transport))
            transport.close()

    class SplitEcho(asyncio.Protocol):
        # Echoes each read as five writes.
        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):
            step = len(data) // 5 + 1
            for start in range(0, len(data), step):
                self.transport.write(data[start:start + step])

    async def stream_info(reader, writer):
        writer.write(_info(writer.transport))
        await writer.drain()
        writer.close()
    """
)


@pytest.fixture
def handler_dir(tmp_path) -> Path:
    (tmp_path / "tlsinfo.py").write_text(HANDLERS)
    return tmp_path


def read_info(tls: ssl.SSLSocket) -> dict:
    import json

    tls.settimeout(30)
    data = b""
    while not data.endswith(b"\n"):
        chunk = tls.recv(4096)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return json.loads(data)


@pytest.mark.parametrize("kind", KINDS)
def test_a_protocol_sees_alpn_cipher_and_the_ssl_object(server_factory, certs, handler_dir, kind):
    args, _ = kind_args(kind)
    env = handler_env(handler_dir)
    if kind == "event-twin":
        env["PREFORK_NO_EXTENSIONS"] = "1"
    server = server_factory(
        *args, "--handler", "tlsinfo:Info", *server_args(certs, "--alpn", "h2,prefork/1"), env=env
    )
    context = client_context(certs)
    context.set_alpn_protocols(["prefork/1"])
    with tls_connect(server, context) as tls:
        info = read_info(tls)
        cipher = tls.cipher()[0]
    assert info["alpn"] == "prefork/1"
    assert info["version"] == "TLSv1.3"
    assert info["cipher"] == cipher
    assert info["peercert"] is False  # no client certificate asked for


@pytest.mark.parametrize("kind", ["event", "event-twin", "asyncio"])
def test_a_protocol_writing_several_times_per_read_echoes_megabytes_over_tls(
    server_factory, certs, handler_dir, kind
):
    # On the event worker asyncio's TLS protocol encrypts what the handler
    # writes in one read and writes it to the loop's transport: those
    # writes leave together when the read is handled (also through short
    # sends: the client's buffer is small and it sends as it reads).
    args, _ = kind_args(kind)
    env = handler_env(handler_dir)
    if kind == "event-twin":
        env["PREFORK_NO_EXTENSIONS"] = "1"
    server = server_factory(*args, "--handler", "tlsinfo:SplitEcho", *server_args(certs), env=env)
    payload = os.urandom(3 * 1024 * 1024 + 7)
    with tls_connect(server, client_context(certs)) as tls:
        assert tls_exchange(tls, payload) == payload


@pytest.mark.parametrize("kind", ["event", "event-twin", "asyncio"])
def test_a_stream_handler_runs_over_tls(server_factory, certs, handler_dir, kind):
    args, _ = kind_args(kind)
    env = handler_env(handler_dir)
    if kind == "event-twin":
        env["PREFORK_NO_EXTENSIONS"] = "1"
    server = server_factory(*args, "--handler", "tlsinfo:stream_info", *server_args(certs), env=env)
    with tls_connect(server, client_context(certs)) as tls:
        assert read_info(tls)["version"] == "TLSv1.3"


@pytest.mark.parametrize("kind", KINDS)
def test_proxy_header_then_tls_gives_the_handler_the_client(
    server_factory, certs, handler_dir, kind
):
    args, _ = kind_args(kind)
    env = handler_env(handler_dir)
    if kind == "event-twin":
        env["PREFORK_NO_EXTENSIONS"] = "1"
    server = server_factory(
        *args, "-b", "proxy:tls:127.0.0.1:0", "--handler", "tlsinfo:Info", *server_args(certs),
        env=env,
    )  # fmt: skip
    sock = server.connect(0, timeout=30)
    sock.sendall(b"PROXY TCP4 192.0.2.9 127.0.0.1 40123 443\r\n")
    with client_context(certs).wrap_socket(sock, server_hostname="localhost") as tls:
        info = read_info(tls)
    assert info["peername"] == ["192.0.2.9", 40123]


@pytest.mark.parametrize("version", ["1.2", "1.3"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_session_resumes_on_another_worker(server_factory, certs, handler_dir, kind, version):
    """The context is made before the fork: every worker has the same
    session-ticket keys, so a ticket one worker issued works on another
    (TLS 1.3: the ticket comes after the handshake, with the first data)."""
    args, _ = kind_args(kind)
    env = handler_env(handler_dir)
    if kind == "event-twin":
        env["PREFORK_NO_EXTENSIONS"] = "1"
    extra = ("--threads", "2") if kind == "thread" else ()
    server = server_factory(
        *args, "-w", "2", "--reuse-port", *extra, "--handler", "tlsinfo:Info", *server_args(certs),
        env=env,
    )  # fmt: skip
    server.wait_workers(2)
    tls_version = ssl.TLSVersion.TLSv1_2 if version == "1.2" else ssl.TLSVersion.TLSv1_3
    context = client_context(certs, minimum_version=tls_version, maximum_version=tls_version)
    with tls_connect(server, context) as tls:
        first = read_info(tls)
        session = tls.session
    assert session is not None
    resumed_on: set[int] = set()
    for _ in range(200):  # --reuse-port spreads clients by their port: both soon seen
        sock = server.connect(0, timeout=30)
        with context.wrap_socket(sock, server_hostname="localhost", session=session) as tls:
            info = read_info(tls)
            assert tls.session_reused, info
        resumed_on.add(info["pid"])
        if len(resumed_on - {first["pid"]}) > 0:
            break
    assert resumed_on - {first["pid"]}, f"every connection landed on {first['pid']}"


# -- what a bad client can do -------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_plaintext_garbage_and_truncated_handshakes_hurt_only_their_connection(
    server_factory, certs, kind
):
    args, env = kind_args(kind)
    extra = ("--threads", "4") if kind == "thread" else ()
    workers = "1" if kind in ("event", "event-twin", "asyncio", "thread") else "4"
    server = server_factory(*args, "-w", workers, *extra, *server_args(certs), env=env)
    context = client_context(certs)
    hello = bytearray()  # a real ClientHello, to cut short
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    hello += outgoing.read()
    attacks = [b"GET / HTTP/1.0\r\n\r\n", os.urandom(3000), bytes(hello[: len(hello) // 2])]
    for attack in attacks:
        with server.connect(0, timeout=30) as bad:
            bad.sendall(attack)
            if attack is attacks[-1]:
                bad.shutdown(socket.SHUT_WR)  # truncated: then the end of file
            bad.settimeout(30)
            try:
                while bad.recv(65536):  # an alert at most, then the close
                    pass
            except ConnectionResetError:
                pass
        with tls_connect(server, context) as tls:
            assert tls_exchange(tls, b"still fine") == b"still fine"


@pytest.mark.parametrize("kind", ["event", "event-twin", "asyncio", "sync"])
def test_clients_that_never_send_a_hello_are_closed_at_the_timeout_and_hurt_nobody(
    server_factory, certs, kind
):
    args, env = kind_args(kind)
    timeout = 2.0
    silent_count = 1000 if kind != "sync" else 2
    workers = "1" if kind != "sync" else "4"
    server = server_factory(
        *args, "-w", workers, *server_args(certs, "--tls-handshake-timeout", str(timeout)),
        env=env,
    )  # fmt: skip
    context = client_context(certs)
    silent = []
    opened = time.monotonic()
    for _ in range(silent_count):
        sock = server.connect(0, timeout=30)
        silent.append(sock)
    # Meanwhile the others are served (a sync worker per silent client
    # is busy; the two left serve).
    for _ in range(5):
        with tls_connect(server, context) as tls:
            assert tls_exchange(tls, b"served") == b"served"
    try:
        for sock in silent:
            sock.settimeout(timeout + 30)
            try:
                assert sock.recv(1) == b""  # closed by the server
            except ConnectionResetError:
                pass
        closed = time.monotonic()
        # Not before the timeout (measured from the last connect, the
        # earliest any of them could have been accepted is after opened).
        assert closed - opened >= timeout
    finally:
        for sock in silent:
            sock.close()


def client_hello(certs: Path) -> bytes:
    """The first flight of a real client: its ClientHello record."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context(certs).wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


def mutations(hello: bytes, count: int, seed: int = 1515):
    """Mutated ClientHellos: flipped bytes, truncations, lengths set to
    extremes, repeated and spliced pieces (a fixed seed: a failure repeats)."""
    import random

    rng = random.Random(seed)
    for i in range(count):
        data = bytearray(hello)
        how = i % 5
        if how == 0:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif how == 1:
            data = data[: rng.randrange(1, len(data))]
        elif how == 2:  # a length field (record, handshake, or one inside) to an extreme
            at = rng.choice([3, 6, 7, 43, 44] + [rng.randrange(5, len(data) - 1)])
            data[at : at + 2] = rng.choice([b"\xff\xff", b"\x00\x00", b"\x40\x00"])
        elif how == 3:
            cut = rng.randrange(5, len(data))
            data = data[:cut] + data[rng.randrange(5, len(data)) :]
        else:
            data = data + bytes(rng.randrange(256) for _ in range(rng.randint(1, 300)))
        yield bytes(data)


@pytest.mark.parametrize("kind", ["event", "event-twin", "sync", "asyncio"])
def test_mutated_client_hellos_hurt_only_their_connection(server_factory, certs, kind):
    args, env = kind_args(kind)
    server = server_factory(
        *args, "-w", "2", *server_args(certs, "--tls-handshake-timeout", "1"), env=env
    )
    hello = client_hello(certs)
    for n, data in enumerate(mutations(hello, 150)):
        with server.connect(0, timeout=30) as bad:
            bad.settimeout(30)
            try:
                bad.sendall(data)
                bad.shutdown(socket.SHUT_WR)
                while bad.recv(65536):  # whatever comes (an alert, a ServerHello), then the close
                    pass
            except OSError:  # reset, or closed already
                pass
        if n % 25 == 24:
            with tls_connect(server, client_context(certs)) as tls:
                assert tls_exchange(tls, b"still serving") == b"still serving"
    assert len(server.workers()) == 2  # none crashed
    assert "Traceback" not in server.log


# -- the openssl client --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["event", "sync"])
def test_openssl_s_client_echoes(server_factory, certs, kind):
    args, env = kind_args(kind)
    server = server_factory(*args, *server_args(certs), env=env)
    host, port = server.tcp()
    client = subprocess.Popen(
        ["openssl", "s_client", "-connect", f"{host}:{port}", "-CAfile", str(certs / "ca.pem"),
         "-verify_return_error", "-servername", "localhost", "-quiet"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    try:
        assert client.stdin is not None and client.stdout is not None
        client.stdin.write(b"hello from s_client\n")
        client.stdin.flush()
        line = client.stdout.readline()  # the echo (the test's timeout bounds it)
        assert line == b"hello from s_client\n"
    finally:
        os.killpg(client.pid, signal.SIGKILL)
        client.wait(10)


# -- HUP: certificate rotation ---------------------------------------------------------------


def serial_of(tls: ssl.SSLSocket) -> str:
    return tls.getpeercert()["serialNumber"]


@pytest.mark.parametrize("kind", ["event", "sync", "asyncio"])
def test_hup_rotates_the_certificate_and_a_broken_one_keeps_the_old(
    server_factory, certs, tmp_path, kind
):
    args, env = kind_args(kind)
    cert, key = tmp_path / "live.pem", tmp_path / "live.key"
    shutil.copy(certs / "server.pem", cert)
    shutil.copy(certs / "server.key", key)
    extra = ("--threads", "2") if kind == "sync" else ()
    workers = "2" if kind == "sync" else "1"
    server = server_factory(
        *args, "-w", workers, *extra, "--certfile", str(cert), "--keyfile", str(key), env=env
    )
    context = client_context(certs)
    old = tls_connect(server, context)
    try:
        old_serial = serial_of(old)
        assert tls_exchange(old, b"before") == b"before"
        shutil.copy(certs / "server2.pem", cert)
        shutil.copy(certs / "server2.key", key)
        server.signal(signal.SIGHUP)
        assert wait_until(lambda: "generation 1 started" in server.log, 30), server.log

        def new_serial() -> str:
            with tls_connect(server, context) as tls:
                return serial_of(tls)

        assert wait_until(lambda: new_serial() != old_serial, 30)
        assert tls_exchange(old, b"after the HUP") == b"after the HUP"  # untouched
    finally:
        old.close()
    # A broken pair: the key of another certificate. The HUP fails as a
    # whole, says why, and the workers serve on with the certificate they have.
    rotated = new_serial()
    shutil.copy(certs / "other.key", key)
    server.signal(signal.SIGHUP)
    assert wait_until(lambda: "HUP: reload failed" in server.log, 30), server.log
    assert f"{key} is not the key of {cert}" in server.log
    assert new_serial() == rotated


# -- bad settings: one line ------------------------------------------------------------------


def test_bad_tls_settings_are_one_line(certs, tmp_path):
    cert, key = str(certs / "server.pem"), str(certs / "server.key")
    missing = str(tmp_path / "missing.pem")
    cases = [
        (["--certfile", cert, "--keyfile", str(certs / "other.key")], 1, "is not the key of"),
        (["--certfile", missing], 1, "cannot read"),
        (["--certfile", str(certs / "server.ext")], 1, "not a PEM certificate"),
        (["--certfile", cert, "--keyfile", key, "--ca-certs", missing], 1, "cannot read"),
        (["--certfile", cert, "--keyfile", key, "--verify-client", "required"], 2, "--ca-certs"),
        (["-b", "tls:127.0.0.1:0"], 2, "needs --certfile"),
        (["--keyfile", key], 2, "needs --certfile"),
        (["--certfile", cert, "--keyfile", key, "--sni", f"x.test={missing}"], 1, "--sni x.test"),
        (
            ["--certfile", cert, "--keyfile", key, "--sni", f"x.test={cert},{key}"]
            + ["-b", "udp://127.0.0.1:0"],
            2,
            "UDP",
        ),
    ]
    for args, code, needle in cases:
        for command in ("serve", "check"):
            result = run(command, "-b", "127.0.0.1:0", *args, timeout=30)
            assert_one_line_error(result, code, needle)


# -- behind HAProxy, re-encrypted: ssl verify required + send-proxy-v2 -------------------------


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed")
@pytest.mark.parametrize("kind", ["event", "sync"])
def test_haproxy_reencrypting_to_two_instances_drains_one_under_load_losing_nothing(
    server_factory, certs, tmp_path, kind
):
    from test_haproxy import (
        HAPROXY_CONFIG,
        PROXY_SERVER,
        WHO_HANDLER,
        drain_under_load,
        echo_through,
        free_port,
        served,
    )

    from support import running_haproxy

    (tmp_path / "who_handler.py").write_text(WHO_HANDLER)
    env = handler_env(tmp_path)
    args, _ = kind_args(kind)
    instances = [
        server_factory(
            *args,
            "-b",
            "proxy:tls:127.0.0.1:0",
            "-w",
            "2",
            "--handler",
            "who_handler:Who",
            *server_args(certs),
            env=env,
        )  # fmt: skip
        for _ in range(2)
    ]
    a, b = instances
    front = free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        HAPROXY_CONFIG.format(
            front=front,
            a=a.tcp()[1],
            b=b.tcp()[1],
            # Re-encrypted: HAProxy verifies our certificate, then the PROXY header.
            server_options=f"ssl verify required ca-file {certs / 'ca.pem'} "
            f"verifyhost localhost sni str(localhost) {PROXY_SERVER}",
        )
    )
    with running_haproxy(config, front):
        for i in range(2, 6):  # the handlers see the clients, through TLS
            payload = os.urandom(1000 + i)
            _, echo = echo_through(front, f"127.0.0.{i}", payload)
            assert echo == payload
        served_before, results, errors = drain_under_load(front, a, 4)
        assert served_before > 0 and results["ok"] > served_before
        assert results["failed"] == 0, (results, errors[:5])
        b.signal(signal.SIGTERM)
        assert b.wait(30) == 0
        assert served(a) > 0 and served(b) > 0


# -- prefork client --tls ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["event", "sync"])
def test_prefork_client_speaks_tls_and_verifies_the_server(server_factory, certs, kind):
    args, env = kind_args(kind)
    server = server_factory(*args, *server_args(certs), env=env)
    host, port = server.tcp()
    target = f"{host}:{port}"
    ca = str(certs / "ca.pem")
    ok = run("client", "--tls", "--ca-certs", ca, "-e", "hello", "--expect", "hello", target)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == "hello\n"
    # Standard input, megabytes of it, byte-exact (the end of input half-closes TCP).
    payload = os.urandom(2 * 1024 * 1024 + 3)
    piped = subprocess.run(
        [*prefork_command("client", "--tls", "--ca-certs", ca, "--sni", "localhost", target)],
        input=payload, capture_output=True, timeout=60, start_new_session=True,
    )  # fmt: skip
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == payload
    # Not verified: the system's CAs do not know the test CA; the wrong name.
    unknown = run("client", "--tls", "-e", "hello", target)
    assert_one_line_error(unknown, 1, "TLS:", "certificate")
    wrong = run("client", "--tls", "--ca-certs", ca, "--sni", "other.test", "-e", "x", target)
    assert_one_line_error(wrong, 1, "TLS:", "other.test")
    insecure = run("client", "--tls", "--insecure", "-e", "hello", target)
    assert insecure.returncode == 0 and insecure.stdout == "hello\n", insecure.stderr


def test_prefork_client_tls_usage_errors(certs):
    ca = str(certs / "ca.pem")
    cases = [
        (["--ca-certs", ca, "127.0.0.1:9"], 2, "--ca-certs: only with --tls"),
        (["--sni", "x", "127.0.0.1:9"], 2, "--sni: only with --tls"),
        (["--tls", "--insecure", "--ca-certs", ca, "127.0.0.1:9"], 2, "--insecure"),
        (["--tls", "udp://127.0.0.1:9"], 2, "no DTLS"),
        (["--tls", "--ca-certs", str(certs / "no-such.pem"), "127.0.0.1:9"], 1, "--ca-certs"),
    ]
    for args, code, needle in cases:
        assert_one_line_error(run("client", *args, timeout=30), code, needle)


@pytest.mark.parametrize("kind", KINDS)
def test_the_access_log_says_tls_failed_and_counts_a_served_connection(
    server_factory, certs, tmp_path, kind
):
    args, env = kind_args(kind)
    path = tmp_path / "access.log"
    server = server_factory(
        *args, "-w", "1", "--access-log", str(path), *server_args(certs), env=env
    )
    with server.connect(0, timeout=30) as bad:
        bad.sendall(b"not a ClientHello at all\r\n" * 10)
        bad.settimeout(30)
        try:
            while bad.recv(4096):
                pass
        except OSError:
            pass
    with tls_connect(server, client_context(certs)) as tls:
        assert tls_exchange(tls, b"x" * 1000) == b"x" * 1000

    def ends() -> list[str]:
        return (
            [line.split(" ")[6] for line in path.read_text().splitlines()] if path.exists() else []
        )

    # Written when each ends: the TLS one when the worker sees our close.
    assert wait_until(lambda: len(ends()) == 2, 30), ends()
    assert ends()[0] == "tls-failed"
    assert ends()[1] in ("eof", "closed")
    # The bytes are the service's plaintext, not the TLS records on the wire.
    served = path.read_text().splitlines()[1].split(" ")
    assert (int(served[4]), int(served[5])) == (1000, 1000), served
