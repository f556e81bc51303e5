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
``slot_view`` (layout: ``SLOT_LAYOUT``).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass

# heartbeat first: 8-byte aligned, so the compiled loop can store a double there
SLOT_LAYOUT = "<dqqqqq"  # heartbeat, pid, accepted, active, bytes_in, bytes_out
_SLOT = struct.Struct(SLOT_LAYOUT)
SLOT_SIZE = _SLOT.size
_HEARTBEAT = struct.Struct("<d")
MAX_SLOTS = 1024  # the most workers one master runs at once


@dataclass(frozen=True)
class WorkerStats:
    heartbeat: float
    pid: int
    accepted: int
    active: int
    bytes_in: int
    bytes_out: int


class Scoreboard:
    def __init__(self, slots: int = MAX_SLOTS) -> None:
        self.slots = slots
        self._map = mmap.mmap(-1, slots * _SLOT.size)  # MAP_SHARED|MAP_ANONYMOUS

    def write(
        self, slot: int, pid: int, accepted: int, active: int, bytes_in: int, bytes_out: int
    ) -> None:
        """The counters; the heartbeat is left as it is."""
        offset = slot * _SLOT.size + _HEARTBEAT.size
        struct.pack_into("<qqqqq", self._map, offset, pid, accepted, active, bytes_in, bytes_out)

    def beat(self, slot: int, when: float) -> None:
        _HEARTBEAT.pack_into(self._map, slot * _SLOT.size, when)

    def slot_view(self, slot: int) -> memoryview:
        """The whole slot, for a loop to write its heartbeat and counters."""
        start = slot * _SLOT.size
        return memoryview(self._map)[start : start + _SLOT.size]

    def read(self, slot: int) -> WorkerStats:
        return WorkerStats(*_SLOT.unpack_from(self._map, slot * _SLOT.size))

    def clear(self, slot: int) -> None:
        _SLOT.pack_into(self._map, slot * _SLOT.size, 0.0, 0, 0, 0, 0, 0)

    def close(self) -> None:
        self._map.close()
