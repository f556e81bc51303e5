"""pytest-benchmark: the compiled hot loop against the fallback, ping-pong
over a socket pair at 1 B, 1 KiB and 64 KiB. Not part of the default run:

    python -m pytest bench/test_bench_fastio.py --benchmark-group-by=param:size

(``bench/pingpong.py`` gives interleaved medians and paired ratios.)
"""

from __future__ import annotations

import os

import pytest

from pingpong import IMPLEMENTATIONS, SIZES, EchoPeer, pin, round_trips

BATCH = 100  # round trips per timed call, so timer overhead does not count


@pytest.fixture(scope="module", autouse=True)
def client_core():
    pin(1)


@pytest.mark.parametrize("size", list(SIZES.values()), ids=list(SIZES))
@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_pingpong(benchmark, implementation, size):
    message = os.urandom(size)
    reply = bytearray(size)
    with EchoPeer(implementation) as peer:
        benchmark.extra_info["round_trips_per_call"] = BATCH
        benchmark(round_trips, peer.sock, message, reply, BATCH)
