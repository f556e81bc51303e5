"""Per-worker counters in shared memory, written by workers, read by the master.

The master maps one anonymous shared region before it forks; each worker
owns one fixed-size slot (the master hands out slot numbers and reuses a
dead worker's slot). A slot is a handful of 64-bit integers written by one
process only, so readers need no lock: a figure read while it is being
updated is at worst one update old.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass

# pid, accepted, active, bytes_in, bytes_out
_SLOT = struct.Struct("<qqqqq")
MAX_SLOTS = 1024  # the most workers one master runs at once


@dataclass(frozen=True)
class WorkerStats:
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
        _SLOT.pack_into(self._map, slot * _SLOT.size, pid, accepted, active, bytes_in, bytes_out)

    def read(self, slot: int) -> WorkerStats:
        return WorkerStats(*_SLOT.unpack_from(self._map, slot * _SLOT.size))

    def clear(self, slot: int) -> None:
        self.write(slot, 0, 0, 0, 0, 0)

    def close(self) -> None:
        self._map.close()
