"""The PROXY protocol (HAProxy's, versions 1 and 2): who the client really is.

A load balancer that speaks it sends one header before the client's first
byte: v1 is a line of text (``PROXY TCP4 src dst sport dport\\r\\n``, at most
107 bytes), v2 a 16-byte binary preamble and as many address and TLV bytes as
its length field says. ``parse`` reads either from the start of a buffer; the
workers call it once per connection, before the handler sees any byte, and
close the connection (with a logged reason) when it raises.

Only peers in ``--forwarded-allow-ips`` may send a header: anyone else on a
PROXY listener is turned away, or any client could claim any address.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import Any

V1_PREFIX = b"PROXY "
V1_MAX = 107  # bytes, CRLF included (the spec's worst case)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_PREAMBLE = 16  # signature, version and command, family, length
_V2_LENGTH = struct.Struct("!H")
# v2 family and transport byte -> (address block size, how to read it)
_V2_INET = {0x11: 4, 0x12: 4, 0x21: 16, 0x22: 16}
_V2_UNIX = (0x31, 0x32)
_V2_UNIX_BLOCK = 216  # two 108-byte paths
HEADER_TIMEOUT = 10.0  # seconds a blocking worker waits for the header


class ProxyHeaderError(ValueError):
    """A header that is not one: the connection must be closed."""


class ProxyHeaderClosed(ProxyHeaderError):
    """The peer closed before its header was whole: it left (a balancer's
    TCP health check does), nothing was refused."""


@dataclass(frozen=True)
class ProxyHeader:
    """A parsed header. ``source`` is the client's address in the form
    ``getpeername()`` gives (``(host, port)``, ``(host, port, 0, 0)`` for
    IPv6, a path for UNIX), or None for ``LOCAL``/``UNKNOWN`` (a health
    check, or an address the balancer could not tell): keep the real peer."""

    length: int  # bytes of the header, to skip
    version: int
    source: Any = None
    destination: Any = None


def parse(data: bytes | bytearray | memoryview) -> ProxyHeader | None:
    """The header at the start of ``data``, or None if more bytes are needed.

    Raises ProxyHeaderError for anything that cannot become a valid header.
    """
    data = bytes(data)
    if data[: len(V2_SIGNATURE)] == V2_SIGNATURE[: len(data)]:
        return _parse_v2(data) if len(data) >= len(V2_SIGNATURE) else None
    if data[: len(V1_PREFIX)] == V1_PREFIX[: len(data)]:
        return _parse_v1(data) if len(data) >= len(V1_PREFIX) else None
    raise ProxyHeaderError("no PROXY protocol header")


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError(f"v1 header longer than {V1_MAX} bytes")
        if b"\n" in data or b"\r" in data[:-1]:
            raise ProxyHeaderError("v1 header: malformed line ending")
        return None
    try:
        line = data[:end].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("v1 header: not ASCII") from None
    fields = line.split(" ")
    length = end + 2
    if fields[1:2] == ["UNKNOWN"]:
        return ProxyHeader(length, 1)
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError(f"v1 header: malformed {line[:40]!r}")
    _, proto, src, dst, sport, dport = fields
    family = socket.AF_INET if proto == "TCP4" else socket.AF_INET6
    source = _endpoint(family, _v1_address(src, family), _v1_port(sport))
    destination = _endpoint(family, _v1_address(dst, family), _v1_port(dport))
    return ProxyHeader(length, 1, source, destination)


def _v1_address(text: str, family: int) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyHeaderError(f"v1 header: bad address {text[:40]!r}") from None
    if (address.version == 4) != (family == socket.AF_INET):
        raise ProxyHeaderError(f"v1 header: {text!r} does not match the protocol")
    return str(address)


def _v1_port(text: str) -> int:
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[0] == "0"):
        raise ProxyHeaderError(f"v1 header: bad port {text[:10]!r}")
    port = int(text)
    if port > 65535:
        raise ProxyHeaderError(f"v1 header: bad port {text!r}")
    return port


def _endpoint(family: int, host: str, port: int) -> tuple[Any, ...]:
    return (host, port) if family == socket.AF_INET else (host, port, 0, 0)


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if len(data) < V2_PREAMBLE:
        return None
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != 2:
        raise ProxyHeaderError(f"v2 header: version {version}")
    if command not in (0, 1):
        raise ProxyHeaderError(f"v2 header: unknown command {command}")
    family = data[13]
    length = V2_PREAMBLE + _V2_LENGTH.unpack_from(data, 14)[0]
    if len(data) < length:
        return None
    block = data[V2_PREAMBLE:length]
    if command == 0:  # LOCAL: the balancer itself, e.g. a health check
        return ProxyHeader(length, 2)
    if family in _V2_INET:
        size = _V2_INET[family]
        if len(block) < 2 * size + 4:
            raise ProxyHeaderError("v2 header: address block too short")
        af = socket.AF_INET if size == 4 else socket.AF_INET6
        src = socket.inet_ntop(af, block[:size])
        dst = socket.inet_ntop(af, block[size : 2 * size])
        sport, dport = struct.unpack_from("!HH", block, 2 * size)
        return ProxyHeader(length, 2, _endpoint(af, src, sport), _endpoint(af, dst, dport))
    if family in _V2_UNIX:
        if len(block) < _V2_UNIX_BLOCK:
            raise ProxyHeaderError("v2 header: address block too short")
        src_path = block[:108].split(b"\0", 1)[0].decode(errors="replace")
        dst_path = block[108:216].split(b"\0", 1)[0].decode(errors="replace")
        return ProxyHeader(length, 2, src_path, dst_path)
    if family == 0:  # UNSPEC: the balancer could not tell
        return ProxyHeader(length, 2)
    raise ProxyHeaderError(f"v2 header: unknown address family 0x{family:02x}")


def read_header(sock: socket.socket, timeout: float = HEADER_TIMEOUT) -> ProxyHeader:
    """Read exactly one header from a blocking socket, not a byte more (the
    rest belongs to the handler). Raises ProxyHeaderError, or OSError (a
    timeout included) when the peer does not send one."""
    previous = sock.gettimeout()
    sock.settimeout(timeout)
    try:
        data = b""
        while True:
            data += _read_exactly(sock, exact_read_size(data))
            header = parse(data)
            if header is not None:
                return header
    finally:
        sock.settimeout(previous)


def exact_read_size(data: bytes) -> int:
    """How many bytes to read next so as not to read past the header that
    ``data`` begins (``parse(data)`` said it is not whole yet): the v1
    prefix first; then v2's preamble and its length; v1 a byte at a time,
    as it ends at its CRLF. For a listener whose next byte is not the
    handler's to see in a buffer of ours (TLS: OpenSSL reads the socket)."""
    if len(data) < len(V1_PREFIX):
        return len(V1_PREFIX) - len(data)
    if data.startswith(V2_SIGNATURE[:6]):
        want = V2_PREAMBLE if len(data) < V2_PREAMBLE else parse_length(data)
        return want - len(data)
    return 1


def parse_length(data: bytes) -> int:
    return V2_PREAMBLE + int(_V2_LENGTH.unpack_from(data, 14)[0])


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise ProxyHeaderClosed("connection closed before the end of its PROXY header")
        chunks += chunk
    return bytes(chunks)


class TrustedPeers:
    """``--forwarded-allow-ips``: the peers allowed to send a PROXY header."""

    def __init__(self, networks: tuple[str, ...]) -> None:
        self.any = "*" in networks
        self.networks = [ipaddress.ip_network(n, strict=False) for n in networks if n != "*"]

    def __call__(self, peer: Any) -> bool:
        """Whether ``peer`` (a ``getpeername()`` result) may send a header.
        UNIX socket peers are local processes, let in by the file's mode."""
        if self.any or not isinstance(peer, tuple):
            return True
        try:
            address = ipaddress.ip_address(peer[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)
