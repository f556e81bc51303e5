"""What the compiled hot loop (``_fastio.pyx``) and its specification
(``_fastio_py.py``) share: every fact both need, defined here once.

Rules: the hot loops and their specs import nothing from ``prefork.server``
or ``prefork.tools``; a compiled module never imports its spec (both import
this module); every fact the two loops share is defined once, here, and the
compiled module checks at import (``check_facts``) that what it compiled in
(its C enums and array sizes) equals it. This module imports neither
implementation.

The facts: the service list (the compiled ``Service`` enum follows its
order), the batch and buffer sizes, the daytime format, the scoreboard
slot's byte layout (the loops write their heartbeat and counters into it;
``prefork.server.scoreboard`` reads it), and the argument checks that make
both reject the same bad arguments before touching a descriptor.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Mapping
from typing import Any

# EventLoop's limits when the caller gives none (the settings' defaults too).
DEFAULT_MAX_CONNECTIONS = 1024  # connections one event worker serves at once
DEFAULT_MAX_BUFFER = 256 * 1024  # bytes a connection may owe its peer
DEFAULT_IDLE_TIMEOUT = 300.0  # seconds without a byte either way; 0 = never

# The services, in the order of the compiled loop's ``Service`` enum.
SERVICES = ("echo", "discard", "chargen", "daytime", "protocol")
# Bytes per recv: what uvloop reads at once (64 KiB reads cost bulk echo
# twice the system calls and callbacks per byte). A read takes at most half
# of max_buffer (read_size_for): what a read makes a service or protocol
# write must fit there beside what it already owes.
READ_SIZE = 256 * 1024


def read_size_for(max_buffer: int) -> int:
    """The bytes one recv takes under ``max_buffer``."""
    return max(1, min(READ_SIZE, max_buffer // 2))


MAX_EVENTS = 256  # events taken per epoll_wait
ACCEPT_BATCH = 16  # connections accepted per wake-up before re-arming
DRAIN_MAX = 4096  # connections a draining loop takes at most (more than any backlog)
EMFILE_PAUSE = 0.1  # seconds without accepting after EMFILE/ENFILE
SWEEP_INTERVAL = 1.0  # seconds between idle sweeps (shorter for short timeouts)
DATAGRAM_BATCH = 16  # datagrams served per wake-up of one datagram socket
DATAGRAM_SIZE = 65536  # receive buffer per datagram: larger than any UDP payload
CHARGEN_DATAGRAM_MAX = 512  # RFC 864: a UDP reply holds 0 to 512 characters
# A protocol's transport asks it to pause_writing() when it owes more than
# the high-water mark and to resume_writing() at the low one: asyncio's
# defaults, changed by set_write_buffer_limits(). --max-buffer stays the hard
# ceiling for a protocol that does not pause.
WRITE_HIGH_WATER = 64 * 1024
WRITE_LOW_WATER = WRITE_HIGH_WATER // 4
# What a protocol writes while it handles a read (data_received,
# buffer_updated) goes out in one system call when it returns, not one per
# write: at most CORK_CHUNKS writes of CORK_BYTES in all; a write past either
# sends what came before it first.
CORK_CHUNKS = 16
CORK_BYTES = 64 * 1024
# RFC 867 leaves the format free; this is its suggested one, in UTC. ASCII, so
# C's strftime (the compiled loop) and time.strftime give the same bytes.
DAYTIME_FORMAT = "%A, %B %d, %Y %H:%M:%S-UTC\r\n"


def write_buffer_limits(high: int | None = None, low: int | None = None) -> tuple[int, int]:
    """``Transport.set_write_buffer_limits``' arguments as asyncio reads them:
    (high, low); a missing one follows from the other (high = 4 x low,
    low = high / 4). Raises ValueError unless high >= low >= 0."""
    if high is None:
        high = WRITE_HIGH_WATER if low is None else 4 * low
    if low is None:
        low = high // 4
    if not high >= low >= 0:
        raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
    return high, low


def daytime_line(now: float | None = None) -> bytes:
    """The daytime service's reply at ``now`` (default: the current time)."""
    stamp = time.gmtime(time.time() if now is None else now)
    return time.strftime(DAYTIME_FORMAT, stamp).encode("ascii")


# -- the scoreboard slot -------------------------------------------------------------
#
# One per worker, in memory the master shares with its workers: the loop
# writes the heartbeat (a time.monotonic() value) and its counters at every
# wake-up, without the GIL; the worker writes the pid. The heartbeat comes
# first so that it is 8-byte aligned: the compiled loop stores a C double
# there. The loop's counters are contiguous 64-bit integers: what it served,
# then why it closed or turned away connections (idle timeout, --max-buffer,
# a user handler that raised, a PROXY header refused), then the datagrams the
# UDP guard and the UDP rate limit left unanswered, by reason (UDP_REFUSALS),
# and the rate table's evictions of a prefix still limited; then the
# connections the per-client limits refused, by reason (LIMIT_REFUSALS), and
# the client tables' evictions of a client still counted or limited.
SLOT_FIELDS = (
    "heartbeat",
    "pid",
    "accepted",
    "active",
    "bytes_in",
    "bytes_out",
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
SLOT = struct.Struct("<dqqqqqqqqqqqqqqqq")
SLOT_SIZE = SLOT.size
SLOT_OFFSETS = {
    name: struct.calcsize(SLOT.format[: index + 1]) for index, name in enumerate(SLOT_FIELDS)
}
HEARTBEAT = struct.Struct("<d")  # at HEARTBEAT_OFFSET
HEARTBEAT_OFFSET = SLOT_OFFSETS["heartbeat"]
LOOP_COUNTERS = SLOT_FIELDS[2:]  # what the loops write
LOOP_COUNTERS_STRUCT = struct.Struct("<" + "q" * len(LOOP_COUNTERS))  # at COUNTERS_OFFSET
COUNTERS_OFFSET = SLOT_OFFSETS[LOOP_COUNTERS[0]]


def _check_slot_layout() -> None:
    """The slot's names, its format and the loops' two writes agree."""
    codes = SLOT.format[1:]
    if len(codes) != len(SLOT_FIELDS) or SLOT.format[0] != "<":
        raise AssertionError(f"slot format {SLOT.format} does not hold {SLOT_FIELDS}")
    if codes[SLOT_FIELDS.index("heartbeat")] != "d" or HEARTBEAT_OFFSET % 8:
        raise AssertionError("the heartbeat is not an aligned double")
    for index, name in enumerate(LOOP_COUNTERS):
        offset, code = SLOT_OFFSETS[name], codes[SLOT_FIELDS.index(name)]
        if offset != COUNTERS_OFFSET + 8 * index or code != "q":
            raise AssertionError(f"the loop's counters are not contiguous int64s: {name}")
    if len(LOOP_COUNTERS_STRUCT.format) - 1 != len(LOOP_COUNTERS):
        raise AssertionError("LOOP_COUNTERS_STRUCT does not hold LOOP_COUNTERS")


_check_slot_layout()


# -- the UDP guard ---------------------------------------------------------------------
#
# A UDP service answers whoever the source address names, and that can be
# forged: a datagram "from" another echo-like service starts a packet storm
# between the two that never ends (CVE-1999-0103), and one "from" a victim
# makes the server a reflector. So both loops (and -k asyncio) drop, without
# a reply, a datagram whose reply could feed a loop, reason "loop": from a
# port below LOW_PORT_LIMIT (the system services live there: echo 7, discard
# 9, daytime 13, chargen 19; OpenBSD inetd's rule), unless low ports are
# allowed, or from a port this server serves UDP on (FreeBSD inetd's
# check_loop; by port, whatever the address: the forger picks the address);
# and, reason "source", a datagram from an address no reply may go to, or
# from port 0: IPv4 0/8 (unspecified), 224/4 (multicast), 240/4 (reserved,
# with the broadcast 255.255.255.255); IPv6 :: and ff00::/8 (multicast); an
# IPv4-mapped IPv6 address by its IPv4 rule.
# The slot's udp_refused_* fields, in order; "rate" is the rate limit's (below).
UDP_REFUSALS = ("loop", "source", "rate")
LOW_PORT_LIMIT = 1024


def _bad_ipv4(first_octet: int) -> bool:
    return first_octet == 0 or first_octet >= 224


def datagram_refusal(sender: Any, loop_ports: frozenset[int], allow_low_ports: bool) -> str | None:
    """Why a datagram from ``sender`` (recvfrom's address) must go
    unanswered: ``"loop"``, ``"source"``, or None to answer it. Anything
    that is not an IPv4 or IPv6 address (a UNIX datagram peer) is answered."""
    if not isinstance(sender, tuple) or len(sender) < 2 or not isinstance(sender[0], str):
        return None
    host, port = sender[0], sender[1]
    try:
        packed = socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:  # a scoped IPv6 address (fe80::1%lo): never one of the bad ones
        packed = b"\xfe"
    if len(packed) == 16 and packed[:12] == b"\0" * 10 + b"\xff\xff":  # IPv4-mapped
        packed = packed[12:]
    if len(packed) == 4:
        bad = _bad_ipv4(packed[0])
    else:
        bad = packed[0] == 0xFF or packed == bytes(16)
    if bad or port == 0:
        return "source"
    if (port < LOW_PORT_LIMIT and not allow_low_ports) or port in loop_ports:
        return "loop"
    return None


def datagram_loop_ports(fds: list[int], extra: Any) -> frozenset[int]:
    """The ports a datagram must not come from: those the sockets ``fds``
    (the loop's own datagram sockets, borrowed) are bound to, and ``extra``
    (the server's other UDP services), each 1 to 65535."""
    ports = {int(port) for port in extra}
    if any(not 0 < port < 65536 for port in ports):
        raise ValueError("udp_loop_ports must be ports, 1 to 65535")
    for fd in fds:
        sock = socket.socket(fileno=fd)
        try:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                ports.add(sock.getsockname()[1])
        finally:
            sock.detach()
    return frozenset(ports)


# -- the UDP rate limit ----------------------------------------------------------------
#
# A token bucket per source prefix (/24 and /56 by default), shared by every
# worker: a table in memory the master maps before it forks (like the
# scoreboard), so a limit holds across workers, HUPs and respawns. Each
# bucket is kept as GCRA does (the generic cell rate algorithm, what a token
# bucket is when read as time): one "theoretical arrival time" (TAT, in
# CLOCK_MONOTONIC nanoseconds, the same clock in every process) per prefix.
# A datagram at ``now`` is answered if TAT <= now + (burst - 1) * interval,
# and then TAT = max(TAT, now) + interval; so over any window W a prefix gets
# at most rate * W + burst replies. The others go unanswered, counted as
# udp_refused_rate.
#
# The table: RATE_WAYS entries per set, sets a power of two; a prefix lives
# in the set its hash names (``rate_set``). An entry is RATE_ENTRY: family
# (4 or 6; 0 = empty), prefix (the address's first 32 or 64 bits, masked,
# as an unsigned big-endian number), TAT. A new prefix takes the entry of
# its set with the smallest TAT; one whose TAT is past is as good as empty
# (its bucket is full), but one still in the future holds a limit that is
# lost: that eviction is counted (udp_rate_evictions) and logged, never
# silent, and a bigger table is the cure.
#
# Workers admit concurrently, so an update must not be lost: two workers
# reading one TAT and both writing TAT + interval would answer one datagram
# more per overlap, without bound under a flood. The compiled loop updates
# the TAT with a compare-and-swap and claims a new entry by swapping its
# family to RATE_CLAIMING; Python code (the twin, the asyncio worker) holds
# an fcntl lock on the set's bytes of a SharedTable's memfd while it reads
# and writes (the kernel drops it if the process dies). One table is used
# by one kind at a time: a server's workers are all compiled or all Python.
RATE_ENTRY = struct.Struct("<QQq")
RATE_ENTRY_SIZE = RATE_ENTRY.size
RATE_WAYS = 4
RATE_HASH = 0x9E3779B97F4A7C15  # 2**64 / the golden ratio: Fibonacci hashing
DEFAULT_RATE_PREFIX = (24, 56)  # IPv4, IPv6
_U64 = (1 << 64) - 1


def rate_key(sender: Any, prefix4: int, prefix6: int) -> tuple[int, int] | None:
    """The (family, prefix) a datagram from ``sender`` is limited by, or
    None for a sender that is not IPv4 or IPv6. An IPv4-mapped IPv6 address
    is its IPv4 address."""
    if not isinstance(sender, tuple) or len(sender) < 2 or not isinstance(sender[0], str):
        return None
    host = sender[0].split("%", 1)[0]
    packed = socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    if len(packed) == 16 and packed[:12] == b"\0" * 10 + b"\xff\xff":
        packed = packed[12:]
    if len(packed) == 4:
        mask = ((1 << prefix4) - 1) << (32 - prefix4)
        return 4, int.from_bytes(packed, "big") & mask
    mask = ((1 << prefix6) - 1) << (64 - prefix6)
    return 6, int.from_bytes(packed[:8], "big") & mask


def rate_set(family: int, prefix: int, sets: int) -> int:
    """The set a prefix lives in, of ``sets`` (a power of two)."""
    mixed = (((family * RATE_HASH) & _U64) ^ prefix) * RATE_HASH & _U64
    return (mixed >> 32) & (sets - 1)


RATE_CLAIMING = _U64  # an entry's family while the compiled loop writes it


class SharedTable(mmap.mmap):
    """A table every worker maps (MAP_SHARED over a memfd the master makes
    before forking), with the descriptor Python code locks it by."""

    lock_fd: int

    @classmethod
    def create(cls, size: int, name: str) -> SharedTable:
        fd = os.memfd_create(f"prefork-{name}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            table = cls(fd, size)
        except BaseException:
            os.close(fd)
            raise
        table.lock_fd = fd  # mmap keeps its own duplicate; this one is ours to lock
        return table

    def close(self) -> None:
        if not self.closed:
            super().close()
            os.close(self.lock_fd)


def table_lock_fd(table: Any) -> int:
    """The descriptor rate_admit locks ``table``'s sets by (-1: a table only
    this process uses)."""
    return getattr(table, "lock_fd", -1)


def rate_admit(
    table: memoryview,
    key: tuple[int, int],
    now: int,
    interval: int,
    tolerance: int,
    lock_fd: int = -1,
) -> tuple[bool, bool]:
    """Whether a datagram of prefix ``key`` at ``now`` (ns) is answered, and
    whether making room for it evicted a prefix still limited. ``interval``
    is 1/rate and ``tolerance`` (burst - 1) * interval, in ns; ``lock_fd``
    (``table_lock_fd``) locks the prefix's set while it is read and written."""
    family, prefix = key
    size = RATE_ENTRY.size * RATE_WAYS
    start = rate_set(family, prefix, len(table) // size) * size
    if lock_fd < 0:
        return _rate_admit_set(table, start, key, now, interval, tolerance)
    fcntl.lockf(lock_fd, fcntl.LOCK_EX, size, start)
    try:
        return _rate_admit_set(table, start, key, now, interval, tolerance)
    finally:
        fcntl.lockf(lock_fd, fcntl.LOCK_UN, size, start)


def _rate_admit_set(
    table: memoryview, start: int, key: tuple[int, int], now: int, interval: int, tolerance: int
) -> tuple[bool, bool]:
    """rate_admit in the set at byte ``start``, the caller holding it."""
    family, prefix = key
    found = victim = -1
    victim_tat = 0
    for way in range(RATE_WAYS):
        offset = start + way * RATE_ENTRY.size
        entry_family, entry_prefix, tat = RATE_ENTRY.unpack_from(table, offset)
        if entry_family == family and entry_prefix == prefix:
            found = offset
            break
        held = tat if entry_family else 0  # empty: older than any
        if victim < 0 or held < victim_tat:
            victim, victim_tat = offset, held
    evicted = False
    if found < 0:
        family_before, _, tat_before = RATE_ENTRY.unpack_from(table, victim)
        evicted = family_before != 0 and tat_before > now
        found, tat = victim, now
        RATE_ENTRY.pack_into(table, victim, 0, prefix, now)  # the family last: whole
        struct.pack_into("<Q", table, victim, family)
    if tat > now + tolerance:
        return False, evicted
    struct.pack_into("<q", table, found + 16, max(tat, now) + interval)
    return True, evicted


def check_rate_args(
    rate: float, burst: int, prefix: Any, table: Any
) -> tuple[memoryview | None, int, int, int, int]:
    """Validate the rate limit's arguments: the table's view (None when the
    limit is off), interval and tolerance in ns, and the two prefix lengths.
    Without a ``table`` a limited loop makes its own (this process only)."""
    prefix4, prefix6 = prefix
    if not 1 <= prefix4 <= 32 or not 1 <= prefix6 <= 64:
        raise ValueError("udp_rate_prefix must be (1..32, 1..64)")
    if not rate >= 0 or burst < 1:
        raise ValueError("udp_rate must be >= 0 and udp_burst >= 1")
    if rate == 0:
        return None, 0, 0, prefix4, prefix6
    if table is None:
        table = bytearray(RATE_ENTRY.size * RATE_WAYS * 1024)
    view = memoryview(table).cast("B")
    sets = len(view) // (RATE_ENTRY.size * RATE_WAYS)
    if view.readonly or sets < 1 or sets & (sets - 1) or len(view) % (RATE_ENTRY.size * RATE_WAYS):
        raise ValueError(
            "udp_rate_table must be a writable table of 2**k sets of RATE_WAYS entries"
        )
    interval = max(1, round(1e9 / rate))
    return view, interval, (burst - 1) * interval, prefix4, prefix6


# -- the per-client connection limits (TCP) ----------------------------------------
#
# --max-conns-per-ip caps the connections one client address holds open at
# once, --conn-rate-per-ip how fast it opens them, both across every worker.
# The client is the PROXY header's source when a trusted balancer sends one,
# else the peer; a connection over a limit is closed before any byte is
# served and counted (limit_refused_conns, limit_refused_rate).
#
# Open connections are counted in CLIENT tables, in memory the master maps
# before it forks: one table per scoreboard slot, written by that slot's
# worker only (no lock, no atomic: the compiled loop and the pure twin do
# the same plain stores), read by all. A connection is admitted while the
# sum of its client's counts over the slots in use is below the limit. A
# worker that dies takes its counts with it: the master clears its table
# when it reaps it. Two workers accepting the same client at the same
# instant can both see N - 1 and both admit: the limit can be passed by the
# number of workers minus one, for as long as those connections last.
#
# The region: CLIENT_HEADER (the slots in use, then the entries per table,
# two int64s, written by the master) and the tables. A table holds sets of
# CLIENT_WAYS entries; a client lives in the set its hash names. An entry
# is CLIENT_ENTRY: the address as 16 bytes (IPv4 as IPv4-mapped IPv6) in two
# big-endian words, and its connections in this worker (0: the entry is
# free). A new client takes a free entry of its set or, when all hold
# clients, the one with the fewest connections: those connections are
# forgotten (that client may pass its limit by as many), which is counted
# (limit_evictions) and logged, never silent; a bigger table is the cure.
#
# The rate is a GCRA bucket per client (rate_admit), in a table of
# RATE_ENTRYs shared by all workers, keyed by the whole IPv4 address or the
# IPv6 /64 (one host's usual allocation); a bucket still limited that a full
# table pushes out counts in limit_evictions too.
LIMIT_REFUSALS = ("conns", "rate")  # the slot's limit_refused_* fields, in order
CLIENT_HEADER = struct.Struct("<qq")  # slots in use, entries per table
CLIENT_HEADER_SIZE = 64  # a cache line: the tables start aligned
CLIENT_ENTRY = struct.Struct("<QQq")
CLIENT_ENTRY_SIZE = CLIENT_ENTRY.size
CLIENT_WAYS = 4
CLIENT_RATE_PREFIX = (32, 64)  # what --conn-rate-per-ip counts by


def client_key(peer: Any) -> tuple[int, int] | None:
    """The 16-byte address a connection from ``peer`` is counted by, as two
    big-endian words, or None for a peer that is not IPv4 or IPv6 (a UNIX
    socket's). An IPv4 address is counted as its IPv4-mapped IPv6 form."""
    if not isinstance(peer, tuple) or len(peer) < 2 or not isinstance(peer[0], str):
        return None
    host = peer[0].split("%", 1)[0]
    try:
        if ":" in host:
            packed = socket.inet_pton(socket.AF_INET6, host)
        else:
            packed = b"\0" * 10 + b"\xff\xff" + socket.inet_pton(socket.AF_INET, host)
    except OSError:
        return None
    return int.from_bytes(packed[:8], "big"), int.from_bytes(packed[8:], "big")


def client_address(key: tuple[int, int]) -> str:
    """A client's address as logs name it: ``127.0.0.2``, ``::1``."""
    high, low = key
    if high == 0 and low >> 32 == 0xFFFF:
        return socket.inet_ntop(socket.AF_INET, (low & 0xFFFFFFFF).to_bytes(4, "big"))
    return socket.inet_ntop(socket.AF_INET6, high.to_bytes(8, "big") + low.to_bytes(8, "big"))


def client_rate_key(key: tuple[int, int]) -> tuple[int, int]:
    """The (family, prefix) --conn-rate-per-ip limits ``key`` by (see
    rate_admit): the IPv4 address, or the IPv6 address's /64."""
    high, low = key
    if high == 0 and low >> 32 == 0xFFFF:
        return 4, low & 0xFFFFFFFF
    return 6, high


def client_set(key: tuple[int, int], sets: int) -> int:
    """The set a client lives in, of ``sets`` (a power of two)."""
    high, low = key
    mixed = (((high * RATE_HASH) & _U64) ^ low) * RATE_HASH & _U64
    return (mixed >> 32) & (sets - 1)


def client_tables_region(slots: int, entries: int) -> int:
    """The bytes of a region of ``slots`` tables of ``entries`` each."""
    return client_table_start(slots, entries)


def client_table_start(slot: int, entries: int) -> int:
    """Where table ``slot`` starts in a region of tables of ``entries`` each."""
    return CLIENT_HEADER_SIZE + slot * entries * CLIENT_ENTRY_SIZE


def _client_find(view: memoryview, slot: int, key: tuple[int, int]) -> tuple[int, int, int]:
    """In table ``slot``: the offset of the entry counting ``key`` (-1 if
    none), and the offset and count of the entry a newcomer would take (the
    first free one, or the first with the fewest connections)."""
    entries = CLIENT_HEADER.unpack_from(view, 0)[1]
    base = (
        client_table_start(slot, entries)
        + client_set(key, entries // CLIENT_WAYS) * CLIENT_WAYS * CLIENT_ENTRY_SIZE
    )
    victim, victim_count = -1, 0
    for offset in range(base, base + CLIENT_WAYS * CLIENT_ENTRY_SIZE, CLIENT_ENTRY_SIZE):
        high, low, count = CLIENT_ENTRY.unpack_from(view, offset)
        if count > 0 and (high, low) == key:
            return offset, victim, victim_count
        if victim < 0 or count < victim_count:
            victim, victim_count = offset, count
    return -1, victim, victim_count


def _count_at(view: memoryview, offset: int) -> int:
    return int(struct.unpack_from("<q", view, offset + 16)[0])


def client_count(view: memoryview, key: tuple[int, int]) -> int:
    """The connections ``key`` holds open, summed over the slots in use."""
    total = 0
    for slot in range(CLIENT_HEADER.unpack_from(view, 0)[0]):
        found = _client_find(view, slot, key)[0]
        if found >= 0:
            total += _count_at(view, found)
    return total


def client_acquire(view: memoryview, slot: int, key: tuple[int, int]) -> bool:
    """Count one connection of ``key`` in table ``slot`` (this worker's);
    whether making room evicted a client still counted."""
    found, victim, victim_count = _client_find(view, slot, key)
    if found >= 0:
        struct.pack_into("<q", view, found + 16, _count_at(view, found) + 1)
        return False
    # The count last, after the address: a reader never sees a count under
    # another client's address.
    struct.pack_into("<q", view, victim + 16, 0)
    struct.pack_into("<QQ", view, victim, *key)
    struct.pack_into("<q", view, victim + 16, 1)
    return victim_count > 0


def client_release(view: memoryview, slot: int, key: tuple[int, int]) -> None:
    """One connection of ``key`` ended (not found: it was evicted)."""
    found = _client_find(view, slot, key)[0]
    if found >= 0:
        struct.pack_into("<q", view, found + 16, _count_at(view, found) - 1)


def check_client_args(
    limit: int, tables: Any, slot: int, rate: float, burst: int, rate_table: Any
) -> tuple[memoryview | None, memoryview | None, int, int]:
    """Validate the per-client limits' arguments: the client tables' view
    (None without --max-conns-per-ip), the rate table's (None without a
    rate), and the rate's interval and tolerance in ns. Without ``tables``
    (or ``rate_table``) a limited loop makes its own (this process only)."""
    if limit < 0 or slot < 0:
        raise ValueError("conn_limit and conn_slot must be >= 0")
    view = None
    if limit:
        if tables is None:
            tables = bytearray(client_tables_region(1, 1024))
            CLIENT_HEADER.pack_into(tables, 0, 1, 1024)
        view = memoryview(tables).cast("B")
        in_use, entries = CLIENT_HEADER.unpack_from(view, 0) if len(view) >= 16 else (0, 0)
        sets = entries // CLIENT_WAYS
        if (
            view.readonly
            or sets < 1
            or sets & (sets - 1)
            or entries % CLIENT_WAYS
            or not 0 <= slot < in_use
            or len(view) < client_tables_region(slot + 1, entries)
        ):
            raise ValueError(
                "conn_tables must be a writable client region whose header names 2**k sets "
                "of CLIENT_WAYS entries and conn_slot among its slots in use"
            )
    rate_view, interval, tolerance, _, _ = check_rate_args(
        rate, burst, CLIENT_RATE_PREFIX, rate_table
    )
    return view, rate_view, interval, tolerance


class ClientLimits:
    """The per-client limits as one loop or worker applies them (the spec of
    the compiled loop's): ``admit`` a new connection, ``release`` it when it
    ends. Safe to share between threads."""

    def __init__(
        self,
        limit: int = 0,
        tables: Any = None,
        slot: int = 0,
        rate: float = 0.0,
        burst: int = 1,
        rate_table: Any = None,
    ) -> None:
        self.limit = limit
        self.slot = slot
        self._tables, self._rates, self._interval, self._tolerance = check_client_args(
            limit, tables, slot, rate, burst, rate_table
        )
        self._rates_lock_fd = table_lock_fd(rate_table)
        self.enabled = self._tables is not None or self._rates is not None
        self._lock = threading.Lock()  # the thread worker's threads share our table

    def admit(self, peer: Any) -> tuple[str | None, tuple[int, int] | None, bool]:
        """Whether a connection from ``peer`` may be served: the reason it
        may not (one of LIMIT_REFUSALS) or None; the client's key (None: a
        peer that is not limited), which an admitted connection hands to
        ``release`` when it ends; whether a client still counted or limited
        was evicted to make room."""
        key = client_key(peer) if self.enabled else None
        if key is None:
            return None, None, False
        evicted = False
        with self._lock:
            if self._tables is not None and client_count(self._tables, key) >= self.limit:
                return "conns", key, False
            if self._rates is not None:
                admitted, evicted = rate_admit(
                    self._rates,
                    client_rate_key(key),
                    time.monotonic_ns(),
                    self._interval,
                    self._tolerance,
                    self._rates_lock_fd,
                )
                if not admitted:
                    return "rate", key, evicted
            if self._tables is not None:
                evicted = client_acquire(self._tables, self.slot, key) or evicted
        return None, key, evicted

    def release(self, key: tuple[int, int] | None) -> None:
        if key is not None and self._tables is not None:
            with self._lock:
                client_release(self._tables, self.slot, key)


# -- the access log --------------------------------------------------------------------
#
# One line per connection when it ends (--access-log), the same bytes from
# both loops and the blocking workers, fields separated by one space:
#   TIME CLIENT PID DURATION BYTES_IN BYTES_OUT END
#   2026-12-01T18:27:48.123Z 127.0.0.1:54321 4242 0.001234 5 5 eof
# TIME is UTC with milliseconds (truncated); CLIENT the PROXY header's source
# when there was one, else the peer (``format_client``); DURATION seconds
# from accept to close; the bytes are the service's (a PROXY header is not
# counted); END one of END_REASONS. The loops buffer lines (at most
# ACCESS_LOG_BUFFER bytes) and write them when the buffer is full and at the
# end of every ``run``; what the file does not take at once waits in the
# buffer, and a line that finds it full is dropped and counted, never waited for.
END_REASONS = (
    "eof",  # the peer closed (or left before its PROXY header was whole)
    "reset",  # a socket error ended it: reset, broken pipe...
    "idle-timeout",  # nothing either way for --idle-timeout
    "max-buffer",  # owed a peer that does not read more than --max-buffer
    "proxy-rejected",  # an untrusted peer or a malformed PROXY header
    "limit-refused",  # over --max-conns-per-ip or --conn-rate-per-ip: no byte served
    "handler-error",  # a user handler raised
    "shutdown",  # the worker closed it on its way out
    "closed",  # the server ended it: daytime's line sent, a protocol's close()
    "tls-failed",  # no TLS handshake (none in time, or a bad one), or a fatal TLS error
)
ACCESS_LOG_BUFFER = 64 * 1024  # bytes of lines a loop holds before writing
# A pipe takes a write of at most PIPE_BUF bytes whole or not at all, never
# mixed with another writer's: lines go to a pipe in such writes, whole lines.
ACCESS_PIPE_WRITE = 4096
ACCESS_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"  # then .mmmZ


def format_client(peer: Any) -> str:
    """A peer address as the access log writes it: ``1.2.3.4:56``,
    ``[::1]:56``, ``unix`` for a UNIX socket's peer, ``-`` when unknown."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if isinstance(peer, (str, bytes)):
        return "unix"
    return "-"


def access_line(
    wall_ns: int, client: str, pid: int, duration: float, nin: int, nout: int, end: str
) -> bytes:
    """One access log line (see above); ``wall_ns`` is ``time.time_ns()``."""
    seconds, nanoseconds = divmod(wall_ns, 1_000_000_000)
    stamp = time.strftime(ACCESS_TIME_FORMAT, time.gmtime(seconds))
    return (
        f"{stamp}.{nanoseconds // 1_000_000:03d}Z {client} {pid} {duration:.6f} "
        f"{nin} {nout} {end}\n"
    ).encode()


# -- checking a compiled module ------------------------------------------------------


def enum_order(values: Mapping[str, int]) -> tuple[str, ...]:
    """The names of a C enum's members ordered by value: ``{"b": 1, "a": 0}``
    gives ``("a", "b")``. Raises AssertionError unless the values are 0..n-1."""
    names = tuple(sorted(values, key=values.__getitem__))
    if [values[name] for name in names] != list(range(len(names))):
        raise AssertionError(f"enum values are not 0..{len(names) - 1}: {dict(values)}")
    return names


def check_facts(module: str, compiled: Mapping[str, Any], common: Mapping[str, Any]) -> None:
    """Raise AssertionError naming every fact on which ``compiled`` (what the
    compiled ``module`` built in, by the common module's names) differs from
    ``common`` (that module's namespace). Called at the compiled module's
    import, so a stale or edited copy cannot load; an explicit raise, not an
    ``assert``, so ``python -O`` checks too. AssertionError, not ImportError:
    ``prefork.fastio`` falls back to the spec on ImportError only, and a
    broken build must fail loudly."""
    wrong = [
        f"{name} = {value!r}, common says "
        + (repr(common[name]) if name in common else "nothing (missing)")
        for name, value in compiled.items()
        if name not in common or common[name] != value
    ]
    if wrong:
        raise AssertionError(f"{module} disagrees with its common module: " + "; ".join(wrong))


# -- argument checks: both implementations reject the same arguments ----------------


def fileno_of(obj: Any) -> int:
    """Return the descriptor of an ``int`` or an object with ``fileno()``."""
    fd = obj if isinstance(obj, int) else obj.fileno()
    if not isinstance(fd, int):
        raise TypeError(f"fileno() returned {type(fd).__name__}, not int")
    if fd < 0:
        raise ValueError(f"negative file descriptor: {fd}")
    return fd


def byte_view(data: Any, *, writable: bool) -> memoryview:
    """A flat, non-empty byte view of ``data``; checks done before any I/O."""
    view = memoryview(data)
    if writable and view.readonly:
        raise TypeError("buffer must be writable")
    view = view.cast("B")  # TypeError for non-contiguous buffers
    if len(view) == 0:
        raise ValueError("buffer must not be empty")
    return view


def check_loop_args(
    service: str,
    max_connections: int,
    max_buffer: int,
    idle_timeout: float,
    pattern: Any,
    protocol_factory: Any,
) -> memoryview | None:
    """Validate ``EventLoop`` arguments; return chargen's pattern view."""
    if service not in SERVICES:
        raise ValueError(f"unknown service {service!r}")
    if max_connections < 1 or max_buffer < 1 or not idle_timeout >= 0:
        raise ValueError("max_connections and max_buffer must be >= 1, idle_timeout >= 0")
    if (service == "protocol") != callable(protocol_factory):
        raise ValueError("protocol_factory is required for, and only for, service 'protocol'")
    return byte_view(pattern, writable=False) if service == "chargen" else None


def stats_view(buffer: Any) -> memoryview | None:
    """A byte view of a writable ``SLOT_SIZE``-byte stats buffer (None stays None)."""
    if buffer is None:
        return None
    view = memoryview(buffer)
    if view.readonly or view.nbytes != SLOT_SIZE:
        raise ValueError(f"stats must be a writable {SLOT_SIZE}-byte buffer")
    return view.cast("B")


def proxy_fds(proxy_listeners: Any, fds: list[int]) -> frozenset[int]:
    """The descriptors of ``proxy_listeners``, which must be among ``fds``."""
    proxied = frozenset(fileno_of(listener) for listener in proxy_listeners)
    if not proxied <= set(fds):
        raise ValueError("proxy_listeners must be among the listeners")
    return proxied


# -- peers -----------------------------------------------------------------------------


def peer_name(sock: socket.socket) -> Any:
    """A connected socket's peer address, or None once the peer is gone."""
    try:
        return sock.getpeername()
    except OSError:
        return None


def peer_of_fd(fd: int) -> Any:
    """``peer_name`` of the connection on descriptor ``fd`` (borrowed)."""
    sock = socket.socket(fileno=fd)
    try:
        return peer_name(sock)
    finally:
        sock.detach()


# -- TLS in the loops --------------------------------------------------------------------

DEFAULT_TLS_HANDSHAKE_TIMEOUT = 10.0  # seconds (--tls-handshake-timeout)
# Handshake steps a loop takes per turn (one epoll_wait's events), at most: a
# step with a signature costs about a millisecond, so a flood of new clients
# cannot hold the established ones for long; the rest wait for the next turn
# (epoll is level-triggered: they are reported again). h2o#2872 is the anchor.
TLS_HANDSHAKES_PER_TURN = 16


def check_tls_args(
    service: str, context: Any, listeners: Any, fds: list[int], timeout: float
) -> set[int]:
    """The descriptors among ``fds`` whose connections speak TLS (both
    loops), or ValueError/TypeError: TLS serves the built-in services (a
    protocol gets it from the worker, around itself), with an
    ``ssl.SSLContext`` for a server and a positive handshake timeout."""
    secured = {fileno_of(listener) for listener in listeners}
    if not secured:
        return set()
    if service == "protocol":
        raise ValueError("TLS listeners serve the built-in services (protocols: see tls_protocol)")
    if not isinstance(context, ssl.SSLContext):
        raise TypeError(f"tls_context must be an ssl.SSLContext, got {type(context).__name__}")
    if context.protocol != ssl.PROTOCOL_TLS_SERVER:
        raise ValueError("tls_context must be a server context (ssl.PROTOCOL_TLS_SERVER)")
    if context.sni_callback is not None:
        # Python's SNI callback finds its ssl socket through the SSL's app
        # data, which a loop driving OpenSSL itself has not set.
        raise ValueError("a tls_context with an sni_callback is served through Python's ssl")
    if not timeout > 0:
        raise ValueError(f"tls_handshake_timeout must be > 0, got {timeout!r}")
    unknown = secured - set(fds)
    if unknown:
        raise ValueError(f"tls_listeners must be among the listeners: {sorted(unknown)}")
    return secured
