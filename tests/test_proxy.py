"""The PROXY protocol: the parser, both event loop implementations over real
sockets, and real servers with every worker class."""

from __future__ import annotations

import errno
import signal
import socket
import struct
import subprocess
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefork import proxy
from prefork.proxy import ProxyHeaderError, TrustedPeers, parse

from support import exchange, handler_env, prefork_command, wait_until

pytestmark = pytest.mark.timeout(60)


def v1(src: str = "192.0.2.7", dst: str = "198.51.100.1", sport=40000, dport=7007) -> bytes:
    family = "TCP6" if ":" in src else "TCP4"
    return f"PROXY {family} {src} {dst} {sport} {dport}\r\n".encode()


def v2(
    src: str = "192.0.2.7",
    dst: str = "198.51.100.1",
    sport: int = 40000,
    dport: int = 7007,
    command: int = 1,
    tlvs: bytes = b"",
) -> bytes:
    if ":" in src:
        family, af = 0x21, socket.AF_INET6
    else:
        family, af = 0x11, socket.AF_INET
    block = socket.inet_pton(af, src) + socket.inet_pton(af, dst) + struct.pack("!HH", sport, dport)
    block += tlvs
    preamble = proxy.V2_SIGNATURE + bytes([0x20 | command, family])
    return preamble + struct.pack("!H", len(block)) + block


# -- the parser -------------------------------------------------------------------


def test_v1_tcp4_tcp6_and_unknown():
    header = parse(v1() + b"payload")
    assert header is not None
    assert (header.version, header.length) == (1, len(v1()))
    assert header.source == ("192.0.2.7", 40000)
    assert header.destination == ("198.51.100.1", 7007)
    six = parse(v1("2001:db8::1", "2001:db8::2", 1, 2))
    assert six is not None and six.source == ("2001:db8::1", 1, 0, 0)
    unknown = parse(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\nrest")
    assert unknown is not None and unknown.source is None and unknown.length == 35


def test_v2_inet_unix_local_and_unspec_with_tlvs_skipped():
    tlvs = b"\x05\x00\x03abc"  # PP2_TYPE_UNIQUE_ID
    header = parse(v2(tlvs=tlvs) + b"x")
    assert header is not None and header.version == 2
    assert header.length == len(v2(tlvs=tlvs))
    assert header.source == ("192.0.2.7", 40000)
    six = parse(v2("2001:db8::1", "::1", 5, 6))
    assert six is not None and six.source == ("2001:db8::1", 5, 0, 0)
    paths = b"/tmp/client".ljust(108, b"\0") + b"/tmp/server".ljust(108, b"\0")
    unix = proxy.V2_SIGNATURE + b"\x21\x31" + struct.pack("!H", len(paths)) + paths
    parsed = parse(unix)
    assert parsed is not None and parsed.source == "/tmp/client"
    local = parse(v2(command=0))
    assert local is not None and local.source is None
    unspec = proxy.V2_SIGNATURE + b"\x21\x00\x00\x00"
    parsed = parse(unspec)
    assert parsed is not None and parsed.source is None and parsed.length == 16


@pytest.mark.parametrize("header", [v1(), v2(), v2("2001:db8::1", "::1")])
def test_every_proper_prefix_asks_for_more(header):
    for cut in range(len(header)):
        assert parse(header[:cut]) is None, cut
    assert parse(header) is not None


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"GET / HTTP/1.0\r\n\r\n", "no PROXY protocol header"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "line ending"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "malformed"),
        (b"PROXY TCP4 1.2.3.999 5.6.7.8 1 2\r\n", "bad address"),
        (b"PROXY TCP4 ::1 ::1 1 2\r\n", "does not match"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "bad port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "bad port"),
        (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "malformed"),
        (b"PROXY " + b"A" * 101, "longer than 107"),
        (proxy.V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12), "version 1"),
        (proxy.V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12), "unknown command"),
        (proxy.V2_SIGNATURE + b"\x21\x11\x00\x04" + bytes(4), "too short"),
        (proxy.V2_SIGNATURE + b"\x21\x41\x00\x00", "unknown address family"),
    ],
)
def test_malformed_headers_are_refused_with_a_reason(data, reason):
    with pytest.raises(ProxyHeaderError, match=reason):
        parse(data)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_give_a_header_more_or_a_refusal(data):
    try:
        header = parse(data)
    except ProxyHeaderError:
        return
    if header is not None:
        assert 0 < header.length <= len(data)
        assert parse(data[: header.length]) == header


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from([v1(), v2(), v2(tlvs=b"\x01\x00\x02h2"), v2("2001:db8::9", "::1", 9, 10)]),
    st.binary(max_size=64),
    st.data(),
)
def test_valid_header_then_payload_fed_in_pieces(header, payload, data):
    stream = header + payload
    cut = data.draw(st.integers(0, len(stream)))
    first = parse(stream[:cut])
    if cut < len(header):
        assert first is None
    else:
        assert first is not None and first.length == len(header)


def test_trusted_peers():
    trusted = TrustedPeers(("127.0.0.1", "10.0.0.0/8", "2001:db8::/32"))
    assert trusted(("127.0.0.1", 1)) and trusted(("10.9.8.7", 1))
    assert trusted(("2001:db8::5", 1, 0, 0)) and trusted(("::ffff:10.1.1.1", 1, 0, 0))
    assert not trusted(("192.0.2.1", 1)) and not trusted(("::1", 1, 0, 0))
    assert trusted("")  # a UNIX socket peer: the file's mode decides
    assert TrustedPeers(("*",))(("192.0.2.1", 1))


def test_blocking_read_takes_the_header_and_not_a_byte_more():
    for header in (v1(), v2(tlvs=b"\x05\x00\x01z")):
        a, b = socket.socketpair()
        with a, b:
            a.sendall(header + b"after")
            parsed = proxy.read_header(b, timeout=5)
            assert parsed.length == len(header)
            assert b.recv(100) == b"after"


# -- the event loop, both implementations ------------------------------------------


@pytest.fixture
def proxy_loop(impl):
    """An EventLoop of ``impl`` whose one listener carries the PROXY protocol."""
    made = []

    def make(service: str = "echo", trusted=None, **options):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        listener.setblocking(False)
        loop = impl.EventLoop(
            [listener],
            service,
            proxy_listeners=[listener],
            proxy_trusted=trusted,
            **options,
        )
        stop = threading.Event()
        thread = threading.Thread(
            target=lambda: [loop.run(0.05) for _ in iter(stop.is_set, True)], daemon=True
        )
        thread.start()
        made.append((listener, loop, stop, thread))
        return listener.getsockname(), loop

    yield make
    for listener, loop, stop, thread in made:
        stop.set()
        thread.join(5)
        loop.close()
        listener.close()


def connect(address) -> socket.socket:
    return socket.create_connection(address, timeout=10)


def turned_away(sock: socket.socket, payload: bytes) -> bool:
    """The server closed without a reply: an end of file, or a reset when it
    closed with our bytes still unread (what the kernel does then)."""
    try:
        return exchange(sock, payload, timeout=10) == b""
    except OSError as exc:  # reset, seen by the reader or the sender
        return exc.errno in (errno.ECONNRESET, errno.ENOTCONN, errno.EPIPE)


@pytest.mark.parametrize("header", [v1(), v2()], ids=["v1", "v2"])
def test_loop_echo_strips_the_header(proxy_loop, header):
    address, loop = proxy_loop("echo")
    with connect(address) as sock:
        assert exchange(sock, header + b"hello, proxied world", timeout=10) == (
            b"hello, proxied world"
        )
    with connect(address) as sock:  # the header in pieces, the payload after
        for i in range(0, len(header), 5):
            sock.sendall(header[i : i + 5])
        sock.sendall(b"late")
        assert sock.recv(100) == b"late"
    assert wait_until(lambda: loop.bytes_in == 24, 5), loop.bytes_in  # payload only


def test_loop_closes_on_a_malformed_or_missing_header(proxy_loop, caplog):
    address, loop = proxy_loop("echo")
    with connect(address) as sock:
        assert exchange(sock, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", timeout=10) == b""
    with connect(address) as sock:
        assert exchange(sock, b"PROXY " + b"9" * 200, timeout=10) == b""
    with connect(address) as sock:  # nothing at all: a plain end of file
        assert exchange(sock, b"", timeout=10) == b""
    assert wait_until(lambda: loop.active == 0, 5)
    assert loop.bytes_out == 0
    assert "no PROXY protocol header" in caplog.text
    assert "longer than 107" in caplog.text


def test_loop_turns_away_untrusted_peers(proxy_loop, caplog):
    address, loop = proxy_loop("echo", trusted=lambda peer: False)
    with connect(address) as sock:
        assert turned_away(sock, v1() + b"spoofed")
    assert "not in --forwarded-allow-ips" in caplog.text
    assert loop.bytes_in == 0


def test_loop_daytime_waits_for_the_header(proxy_loop):
    address, _ = proxy_loop("daytime")
    with connect(address) as sock:
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(100)  # nothing before the header
        sock.settimeout(10)
        sock.sendall(v2())
        assert sock.recv(100).endswith(b"-UTC\r\n")


class Peer:
    """Tells each client the address it was seen from, then echoes."""

    def connection_made(self, transport):
        self.transport = transport
        seen = transport.get_extra_info("peername"), transport.get_extra_info("proxy_peername")
        transport.write(repr(seen).encode() + b"\n")

    def data_received(self, data):
        self.transport.write(data)

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        pass


@pytest.mark.parametrize("header", [v1(), v2(), v2(command=0)], ids=["v1", "v2", "v2-local"])
def test_loop_protocols_see_the_client_address(proxy_loop, header):
    address, _ = proxy_loop("protocol", protocol_factory=Peer)
    with connect(address) as sock:
        reply = exchange(sock, header + b"data", timeout=10)
        me = sock.getsockname()
    line, rest = reply.split(b"\n", 1)
    if header == v2(command=0):  # LOCAL: the real peer stays
        assert line == repr((me, None)).encode()
    else:
        assert line == repr((("192.0.2.7", 40000), me)).encode()
    assert rest == b"data"


# -- real servers --------------------------------------------------------------------

PEER_HANDLER = """
class Peer:
    def connection_made(self, transport):
        self.transport = transport
        transport.write(repr(transport.get_extra_info("peername")).encode() + b"\\n")
    def data_received(self, data):
        self.transport.write(data)
    def eof_received(self):
        return False
    def connection_lost(self, exc):
        pass

class Boom(Peer):
    def data_received(self, data):
        raise RuntimeError("boom")

def handle(sock, address):
    sock.sendall(repr(address).encode() + b"\\n")
    while data := sock.recv(65536):
        sock.sendall(data)
"""


def peer_handler_server(server_factory, tmp_path, k: str, attr: str):
    """One ``k`` worker behind a PROXY listener, serving ``PEER_HANDLER``'s ``attr``."""
    (tmp_path / "peer_handler.py").write_text(PEER_HANDLER)
    return server_factory(
        "-b", "proxy:127.0.0.1:0", "-w", "1", "-k", k,
        "--handler", f"peer_handler:{attr}", env=handler_env(tmp_path),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("k", "attr"),
    [("event", "Peer"), ("sync", "Peer"), ("sync", "handle"), ("thread", "handle")],
)
def test_server_hands_the_client_address_to_handlers(server_factory, tmp_path, k, attr):
    server = peer_handler_server(server_factory, tmp_path, k, attr)
    assert "(PROXY protocol)" in server.log
    cases = ((v1(), "('192.0.2.7', 40000)"), (v2("2001:db8::1", "::1"), "2001:db8::1"))
    for header, expected in cases:
        with server.connect() as sock:
            reply = exchange(sock, header + b"after the header", timeout=10).decode()
        first, rest = reply.split("\n", 1)
        assert expected in first and rest == "after the header", reply


@pytest.mark.parametrize("k", ["event", "sync"])
def test_server_with_proxy_protocol_everywhere_closes_bad_and_untrusted(server_factory, k):
    server = server_factory("--proxy-protocol", "-w", "1", "-k", k)
    with server.connect() as sock:
        assert exchange(sock, v2() + b"echo me", timeout=10) == b"echo me"
    with server.connect() as sock:
        assert turned_away(sock, b"no header here")
    assert wait_until(lambda: "no PROXY protocol header" in server.log, 5), server.log
    strict = server_factory(
        "--proxy-protocol", "--forwarded-allow-ips", "10.0.0.0/8", "-w", "1", "-k", k
    )
    with strict.connect() as sock:
        assert turned_away(sock, v1() + b"spoof")
    assert wait_until(lambda: "not in --forwarded-allow-ips" in strict.log, 5), strict.log
    strict.signal(signal.SIGTERM)
    assert strict.wait(15) == 0


def test_plain_listeners_beside_a_proxy_one_stay_plain(server_factory):
    server = server_factory("-b", "127.0.0.1:0", "-b", "proxy:127.0.0.1:0", "-w", "1")
    assert "(PROXY protocol)" in server.lines[1] and "(PROXY" not in server.lines[0]
    with server.connect(0) as sock:
        assert exchange(sock, b"plain", timeout=10) == b"plain"
    with server.connect(1) as sock:
        assert exchange(sock, v1() + b"proxied", timeout=10) == b"proxied"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--forwarded-allow-ips", "10.0.0.0/33"], ["--forwarded-allow-ips", "10.0.0.0/33"]),
        (["--forwarded-allow-ips", ","], ["--forwarded-allow-ips"]),
        (["-b", "proxy:udp://127.0.0.1:0"], ["stream listeners"]),
        (["-b", "proxy:nonsense"], ["-b/--bind"]),
    ],
)
def test_bad_proxy_options_are_one_line_usage_errors(args, words):
    result = subprocess.run(
        prefork_command("serve", *args), capture_output=True, text=True, timeout=20
    )
    assert result.returncode == 2, result
    assert len(result.stderr.strip().splitlines()) == 1
    for word in words:
        assert word in result.stderr


@pytest.mark.parametrize("k", ["event", "sync"])
def test_logs_name_the_client_from_the_header(server_factory, tmp_path, k):
    server = peer_handler_server(server_factory, tmp_path, k, "Boom")
    with server.connect() as sock:
        exchange(sock, v1() + b"explode", timeout=10)
    expected = "handler failed; connection from ('192.0.2.7', 40000) closed"
    assert wait_until(lambda: expected in server.log, 5), server.log
