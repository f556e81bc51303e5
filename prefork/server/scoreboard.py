"""Per-worker counters in shared memory, written by workers, read by the master.

The master maps one anonymous shared region before it forks; each worker
owns one fixed-size slot (the master hands out slot numbers and reuses a
dead worker's slot). A slot is a handful of 64-bit fields written by one
process only, so readers need no lock: a figure read while it is being
updated is at worst one update old.

The heartbeat is a ``time.monotonic()`` timestamp (CLOCK_MONOTONIC, the same
clock in every process) that the worker's loop refreshes at least once a
second; 0.0 means "waiting on a peer", which is not silence. The event loop
writes its heartbeat and counters itself, without the GIL, through
``slot_view``.

This module owns what a slot means (``WorkerStats``, who writes what); the
bytes are laid out by ``prefork._fastio_common`` (``SLOT``, ``SLOT_FIELDS``),
where the hot loops, which import nothing from the server, take them too.
"""

from __future__ import annotations

import dataclasses
import mmap
import struct
from dataclasses import dataclass

from prefork._fastio_common import (
    CLIENT_HEADER,
    HEARTBEAT,
    HEARTBEAT_OFFSET,
    RATE_ENTRY_SIZE,
    SLOT,
    SLOT_FIELDS,
    SLOT_OFFSETS,
    SLOT_SIZE,
    SharedTable,
    client_table_start,
    client_tables_region,
)

# What a worker writes: every field after the heartbeat.
_AFTER_HEARTBEAT = struct.Struct("<" + SLOT.format[2:])
_PID_OFFSET = SLOT_OFFSETS["pid"]
_CLOSE_COUNTERS = len(SLOT_FIELDS) - SLOT_FIELDS.index("bytes_out") - 1
MAX_SLOTS = 1024  # the most workers one master runs at once


@dataclass(frozen=True)
class WorkerStats:
    heartbeat: float
    pid: int
    accepted: int
    active: int
    bytes_in: int
    bytes_out: int
    # Connections closed or turned away, and why (the loops count them).
    idle_closed: int = 0  # no byte either way for --idle-timeout
    max_buffer_closed: int = 0  # owed a non-reader more than --max-buffer
    handler_errors: int = 0  # a user handler raised
    proxy_rejected: int = 0  # an untrusted peer, or a malformed PROXY header
    # Datagrams the UDP guard dropped unanswered (_fastio_common.UDP_REFUSALS).
    udp_refused_loop: int = 0  # from a low port, or a port of ours: a loop could start
    udp_refused_source: int = 0  # from an address no reply may go to
    udp_refused_rate: int = 0  # over --udp-rate for its source prefix
    udp_rate_evictions: int = 0  # a prefix still limited pushed out of the rate table
    # Connections the per-client limits closed unserved (LIMIT_REFUSALS).
    limit_refused_conns: int = 0  # over --max-conns-per-ip
    limit_refused_rate: int = 0  # over --conn-rate-per-ip
    limit_evictions: int = 0  # a client still counted or limited pushed out of a full table


if tuple(field.name for field in dataclasses.fields(WorkerStats)) != SLOT_FIELDS:
    raise AssertionError("WorkerStats does not follow prefork._fastio_common.SLOT_FIELDS")
if SLOT_FIELDS[:2] != ("heartbeat", "pid") or _PID_OFFSET + _AFTER_HEARTBEAT.size != SLOT_SIZE:
    raise AssertionError("the slot is not the heartbeat, then the pid and the counters")


class Scoreboard:
    def __init__(
        self,
        slots: int = MAX_SLOTS,
        rate_entries: int = 0,
        client_entries: int = 0,
        conn_rate_entries: int = 0,
    ) -> None:
        """``rate_entries``: the size of the UDP rate limit's table, which
        lives beside the slots (``_fastio_common.RATE_ENTRY``), 0 for none;
        ``client_entries``: the size of each slot's table of open connections
        per client (--max-conns-per-ip, ``_fastio_common.CLIENT_ENTRY``), 0
        for none; ``conn_rate_entries``: --conn-rate-per-ip's table, 0 for none.
        Every region is mapped now and only touched pages cost memory."""
        self.slots = slots
        self._map = mmap.mmap(-1, slots * SLOT_SIZE)  # MAP_SHARED|MAP_ANONYMOUS
        # The rate tables are SharedTables: Python workers lock their sets.
        self._rates = (
            SharedTable.create(rate_entries * RATE_ENTRY_SIZE, "udp-rate") if rate_entries else None
        )
        self._client_entries = client_entries
        self._clients = None
        if client_entries:
            self._clients = mmap.mmap(-1, client_tables_region(slots, client_entries))
            CLIENT_HEADER.pack_into(self._clients, 0, 0, client_entries)  # none in use yet
        self._conn_rates = (
            SharedTable.create(conn_rate_entries * RATE_ENTRY_SIZE, "conn-rate")
            if conn_rate_entries
            else None
        )

    def client_tables(self) -> memoryview | None:
        """The per-client connection counts, a table per slot (None: none)."""
        return memoryview(self._clients) if self._clients is not None else None

    def conn_rate_table(self) -> SharedTable | None:
        """--conn-rate-per-ip's table, shared by every worker (None: none)."""
        return self._conn_rates

    def clear_clients(self, slot: int) -> None:
        """Forget slot ``slot``'s connection counts: its worker is gone, and
        its connections with it."""
        if self._clients is not None:
            start = client_table_start(slot, self._client_entries)
            end = client_table_start(slot + 1, self._client_entries)
            self._clients[start:end] = bytes(end - start)

    def rate_table(self) -> SharedTable | None:
        """The UDP rate limit's table, shared by every worker (None: none)."""
        return self._rates

    def write(
        self,
        slot: int,
        pid: int,
        accepted: int,
        active: int,
        bytes_in: int,
        bytes_out: int,
        *closes: int,
    ) -> None:
        """The counters, ``closes`` being the fields after ``bytes_out``
        (``idle_closed`` ...), zero if left out; the heartbeat is left as it is."""
        offset = slot * SLOT_SIZE + _PID_OFFSET
        rest = _CLOSE_COUNTERS - len(closes)
        if rest < 0:
            raise TypeError(f"at most {_CLOSE_COUNTERS} close counters, got {len(closes)}")
        _AFTER_HEARTBEAT.pack_into(
            self._map, offset, pid, accepted, active, bytes_in, bytes_out, *closes, *(0,) * rest
        )

    def beat(self, slot: int, when: float) -> None:
        HEARTBEAT.pack_into(self._map, slot * SLOT_SIZE + HEARTBEAT_OFFSET, when)

    def slot_view(self, slot: int) -> memoryview:
        """The whole slot, for a loop to write its heartbeat and counters."""
        start = slot * SLOT_SIZE
        return memoryview(self._map)[start : start + SLOT_SIZE]

    def read(self, slot: int) -> WorkerStats:
        return WorkerStats(*SLOT.unpack_from(self._map, slot * SLOT_SIZE))

    def clear(self, slot: int) -> None:
        """Ready ``slot`` for a new worker: zero counters, no connection counted;
        the loops sum the client counts of every slot below the highest
        ever cleared (the header's "in use")."""
        self._map[slot * SLOT_SIZE : (slot + 1) * SLOT_SIZE] = bytes(SLOT_SIZE)
        self.clear_clients(slot)
        if self._clients is not None:
            in_use = CLIENT_HEADER.unpack_from(self._clients, 0)[0]
            if slot >= in_use:
                CLIENT_HEADER.pack_into(self._clients, 0, slot + 1, self._client_entries)

    def close(self) -> None:
        self._map.close()
        for region in (self._rates, self._clients, self._conn_rates):
            if region is not None:
                region.close()
