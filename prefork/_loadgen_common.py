"""What the compiled load generator (``_loadgen.pyx``) and its specification
(``_loadgen_py.py``) share: every fact both need, defined here once.

Rules: the load generator's loops import nothing from ``prefork.server`` or
``prefork.tools``; the compiled one never imports its spec (both import this
module); every fact they share is defined once, here, and the compiled
module checks at import that its C enums equal it (``COMPILED_FACTS``).

The facts: the modes, the error kinds and the slot and window states (the
compiled enums follow their order and values), the stream pattern, the
datagram header, the buffer and batch sizes, the histogram's buckets, and
the argument checks. ``prefork.loadgen`` re-exports the public ones.
"""

from __future__ import annotations

import ipaddress
import math
import socket
import ssl
import struct
from typing import Any

MODES = ("stream", "connect", "datagram")
ERROR_KINDS = ("connect", "reset", "closed", "mismatch", "excess", "timeout", "lost", "tls")
N_ERRORS = len(ERROR_KINDS)
PERIOD = 251  # the stream pattern's period: a prime, so no message size is a multiple
CHUNK = 64 * 1024  # bytes per recv, and at most per send
MAX_EXCHANGE = 1024 * 1024  # the largest request or reply of a request/reply run
MAX_DATAGRAM = 65507  # the largest UDP payload over IPv4
DATAGRAM_BATCH = 16  # replies read per wake-up of one UDP socket
HEADER = struct.Struct("=II")  # a datagram's window position and sequence number
HEADER_SIZE = HEADER.size
MAX_EVENTS = 256  # events taken per epoll_wait
SWEEP_INTERVAL_NS = 50_000_000  # how often timeouts are checked
SUB_BITS = 5  # histogram: 32 buckets per power of two
MAX_BITS = 42  # latencies of 2**42 ns (73 minutes) and more share the last bucket
BUCKETS = (MAX_BITS - SUB_BITS + 1) << SUB_BITS

# A slot (a connection, or a UDP socket) is in one of these states.
IDLE = 0  # no socket; ``connect`` mode opens one at the next turn
CONNECTING = 1
OPEN = 2
DEAD = 3  # failed for good (stream and datagram modes)
HANDSHAKING = 4  # connected, the TLS handshake under way

# A datagram window position: what its last datagram became.
EMPTY = 0  # nothing sent yet, or sending failed
WAITING = 1
ANSWERED = 2
LOST = 3


def bucket_high(index: int) -> int:
    """The largest latency in ns that falls into bucket ``index``."""
    if index < 1 << SUB_BITS:
        return index
    shift = (index >> SUB_BITS) - 1
    mantissa = (index & ((1 << SUB_BITS) - 1)) + (1 << SUB_BITS)
    return ((mantissa + 1) << shift) - 1


def percentile(histogram: list[int], fraction: float, largest: int) -> int:
    """The latency (ns) below which ``fraction`` of the recorded ones fall:
    the top of the bucket holding that rank, never above ``largest`` (the
    exact maximum). 0 for an empty histogram."""
    total = sum(histogram)
    if total == 0:
        return 0
    rank = max(1, math.ceil(round(fraction * total, 6)))  # round: 0.999 * 1000 is 999
    seen = 0
    for index, count in enumerate(histogram):
        seen += count
        if seen >= rank:
            return min(bucket_high(index), largest)
    return largest


def make_pattern(length: int) -> bytes:
    """``length`` bytes of the stream pattern: byte ``i`` is ``i % PERIOD``."""
    return bytes(i % PERIOD for i in range(length))


def check_args(
    family: int, mode: str, connections: int, size: int, depth: int, timeout: float
) -> None:
    """Raise ValueError for arguments no run can use (shared by both twins)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    families = [socket.AF_INET, socket.AF_INET6]
    if mode != "datagram":
        families.append(socket.AF_UNIX)
    if family not in families:
        raise ValueError(f"address family {family} cannot be used in {mode} mode")
    if connections < 1 or size < 1 or depth < 1:
        raise ValueError("connections, size and depth must be at least 1")
    if mode == "connect" and depth != 1:
        raise ValueError("connect mode has one message per connection: depth must be 1")
    if mode == "datagram" and not HEADER.size <= size <= MAX_DATAGRAM:
        raise ValueError(f"a datagram must hold {HEADER.size} to {MAX_DATAGRAM} bytes")
    if not 0 < timeout < float("inf"):
        raise ValueError("timeout must be a positive number of seconds")


def check_exchange(mode: str, request: Any, reply: Any) -> tuple[bytes, bytes] | None:
    """A request/reply run's ``request`` and ``reply`` as bytes, None for an
    echo run (both None); ValueError (TypeError) for a pair no run can use."""
    if request is None and reply is None:
        return None
    if request is None or reply is None:
        raise ValueError("a request and its reply go together: give both or neither")
    pair = bytes(request), bytes(reply)  # TypeError for what is not bytes-like
    if mode == "datagram":
        raise ValueError("a request and its reply are for streams: datagrams are echoed")
    for name, data in zip(("request", "reply"), pair, strict=True):
        if not 0 < len(data) <= MAX_EXCHANGE:
            raise ValueError(f"a {name} must hold 1 to {MAX_EXCHANGE:,} bytes, not {len(data):,}")
    return pair


def repeated(data: bytes, length: int) -> bytes:
    """``length`` bytes of ``data`` repeated: byte ``i`` is ``data[i % len(data)]``."""
    return (data * (length // len(data) + 1))[:length]


def check_tls_args(mode: str, tls: Any, server_hostname: str | None) -> None:
    """Raise ValueError (TypeError) for a TLS setting no run can use."""
    if tls is None:
        if server_hostname is not None:
            raise ValueError("server_hostname is only for TLS")
        return
    if not isinstance(tls, ssl.SSLContext):
        raise TypeError(f"tls must be an ssl.SSLContext, not {type(tls).__name__}")
    if mode == "datagram":
        raise ValueError("TLS is for streams: datagram mode has no TLS")
    if tls.protocol == ssl.PROTOCOL_TLS_SERVER:
        raise ValueError("a server-side TLS context cannot connect")
    if tls.check_hostname and not server_hostname:
        raise ValueError("the TLS context checks host names: a server_hostname is needed")
    if server_hostname is not None and (not server_hostname or "\0" in server_hostname):
        raise ValueError(f"not a usable server name: {server_hostname!r}")


def is_ip_address(name: str) -> bool:
    """Whether a server name is an IP address: checked against the
    certificate's IP entries, and never sent as SNI (RFC 6066)."""
    try:
        ipaddress.ip_address(name.partition("%")[0])
    except ValueError:
        return False
    return True


def sockaddr_bytes(family: int, address: Any) -> bytes:
    """``address`` (as ``socket.getaddrinfo`` gives it, or a UNIX path) as the
    C ``struct sockaddr`` that ``connect(2)`` takes; for the compiled twin
    (the spec calls it too, for the same ValueError)."""
    native_family = struct.pack("=H", family)
    if family in (socket.AF_INET, socket.AF_INET6):
        host, port = address[:2]
        try:
            raw = socket.inet_pton(family, host.partition("%")[0])
        except OSError:
            raise ValueError(f"not a numeric address: {host!r}") from None
    if family == socket.AF_INET:
        return native_family + struct.pack("!H", port) + raw + bytes(8)
    if family == socket.AF_INET6:
        flowinfo, scope_id = (address[2], address[3]) if len(address) == 4 else (0, 0)
        scope = struct.pack("=I", scope_id)
        return native_family + struct.pack("!HI", port, flowinfo) + raw + scope
    path = address.encode() if isinstance(address, str) else bytes(address)
    if len(path) >= 108 or b"\0" in path:  # sun_path holds 108 bytes with the NUL
        raise ValueError(f"not a usable UNIX socket path: {address!r}")
    return native_family + path + b"\0"
