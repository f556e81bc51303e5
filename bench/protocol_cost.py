"""What a user's protocol itself costs per message, with no loop and no kernel.

    python bench/protocol_cost.py [--rounds N] [--count N]

Calls each class of ``bench/peers/asyncio_echo.py`` the way a loop does for
one message of each compare.py workload (``data_received`` with the whole
request, or ``get_buffer`` + ``buffer_updated``), on a transport whose
``write`` does nothing, and prints the CPU microseconds per message (median
of the rounds). A server's CPU per message is this plus what its loop and the
kernel cost, so this bounds the ratio any loop can reach against another:
with the C epoll reference's CPU per message as the floor of loop + kernel,
no loop serving a class can cost less than ``floor + protocol``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))

import asyncio_echo  # noqa: E402

SIZES = {"50 x 1 KiB": 1024, "200 x 128 B": 128, "4 x 64 KiB": 65536}


class NullTransport:
    """Takes writes and drops them: a C builtin, so it adds no frame."""

    write = staticmethod(len)

    def close(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False


def message_for(name: str, size: int) -> bytes:
    if name in ("UpperLines", "Resp"):
        return asyncio_echo.exchange(name, size)[0]
    return bytes(size)


def per_message(name: str, size: int, count: int) -> float:
    """CPU microseconds per message for ``count`` messages of ``name``."""
    protocol = getattr(asyncio_echo, name)()
    protocol.connection_made(NullTransport())
    message = message_for(name, size)
    if name == "BufferedEcho":
        get_buffer, updated = protocol.get_buffer, protocol.buffer_updated
        start = time.process_time()
        for _ in range(count):
            get_buffer(-1)[: len(message)] = message
            updated(len(message))
        return (time.process_time() - start) / count * 1e6
    received = protocol.data_received
    start = time.process_time()
    for _ in range(count):
        received(message)
    return (time.process_time() - start) / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--count", type=int, default=100_000)
    args = parser.parse_args()
    print(f"protocol CPU us per message, no loop and no kernel (median of {args.rounds} rounds)")
    for name in ("Echo", "BufferedEcho", "UpperLines", "Resp"):
        cells = []
        for label, size in SIZES.items():
            count = args.count if size < 65536 else args.count // 20
            runs = [per_message(name, size, count) for _ in range(args.rounds)]
            cells.append(f"{label}: {statistics.median(runs):7.3f}")
        print(f"  {name:13s} " + "   ".join(cells))


if __name__ == "__main__":
    main()
