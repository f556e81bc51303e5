"""What the reliability scenarios share: sizes, /proc readings, a load generator.

Every scenario has a fast version (the normal suite, a few seconds each) and a
soak version selected with ``PREFORK_SOAK=1``; ``scaled(fast, soak)`` picks the
number. Loads are bounded twice, by count and by time, so a server that stops
answering fails the test instead of hanging it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import resource
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

import support
from support import children_of, process_state

SOAK = os.environ.get("PREFORK_SOAK", "") not in ("", "0")


def scaled(fast, soak):
    """The fast figure in the normal suite, the soak figure with PREFORK_SOAK=1."""
    return soak if SOAK else fast


def timeout(fast: float, soak: float) -> pytest.MarkDecorator:
    return pytest.mark.timeout(scaled(fast, soak))


# -- /proc ------------------------------------------------------------------------


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pid: int) -> int:
    """Resident bytes of ``pid``; 0 once it is gone (samplers race with exits)."""
    try:
        return support.rss_bytes(pid)
    except (FileNotFoundError, ProcessLookupError):
        return 0


def zombie_children(pid: int) -> list[int]:
    return [c for c in children_of(pid) if process_state(c) == "Z"]


@contextlib.contextmanager
def descriptor_limit(needed: int) -> Iterator[None]:
    """Raise this process's soft RLIMIT_NOFILE to ``needed`` (children inherit
    it), and put it back afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {needed} descriptors needed")
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


# -- payloads -----------------------------------------------------------------------

# One random block; payloads are slices of it at random offsets, so making a
# payload costs nothing and every byte still matters to the comparison.
BLOCK = random.Random(7007).randbytes(1 << 20)
_DOUBLE = BLOCK + BLOCK


def payload(rng: random.Random, size: int) -> bytes:
    start = rng.randrange(len(BLOCK))
    return _DOUBLE[start : start + size]


class Stream:
    """An endless byte stream (BLOCK from ``shift``, repeated) that can be
    checked piece by piece, so a gigabyte needs no gigabyte of memory."""

    def __init__(self, shift: int) -> None:
        self.shift = shift % len(BLOCK)

    def at(self, offset: int, size: int) -> bytes:
        out = bytearray()
        while size:
            start = (self.shift + offset) % len(BLOCK)
            piece = _DOUBLE[start : start + min(size, len(BLOCK))]
            out += piece
            offset += len(piece)
            size -= len(piece)
        return bytes(out)


# -- a bounded echo load ------------------------------------------------------------------

# A connection on a worker that dies ends like this: the kernel closes the
# worker's socket, so the client sees a reset or an early end of file.
ESTABLISHED_LOSS = (errno.ECONNRESET, errno.EPIPE)


@dataclass
class Failure:
    started: float  # time.monotonic() before connect
    ended: float
    phase: str  # "connect": never got in; "established": lost after connecting
    error: str


@dataclass
class EchoLoad:
    """``threads`` clients, each looping connect / echo / close until
    ``stop()``, ``duration`` seconds or ``limit`` connections each."""

    address: tuple[str, int]
    threads: int
    duration: float
    limit: int = 100_000
    max_size: int = 32 * 1024  # fits the socket buffers: sendall, then read
    completed: int = 0
    corrupt: int = 0
    failures: list[Failure] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)  # the load's own bugs
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> EchoLoad:
        self._threads = [
            threading.Thread(target=self._client, args=(seed,), daemon=True)
            for seed in range(self.threads)
        ]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        assert not any(t.is_alive() for t in self._threads), "load threads hang"
        assert not self.errors, self.errors

    def _client(self, seed: int) -> None:
        rng = random.Random(seed)
        deadline = time.monotonic() + self.duration
        try:
            for _ in range(self.limit):
                if self._stop.is_set() or time.monotonic() > deadline:
                    return
                self._one(rng)
        except BaseException as exc:
            self.errors.append(exc)

    def _one(self, rng: random.Random) -> None:
        data = payload(rng, rng.randint(1, self.max_size))
        started = time.monotonic()
        try:
            sock = socket.create_connection(self.address, timeout=5)
        except OSError as exc:
            self._fail(started, "connect", exc)
            return
        with sock:
            received = bytearray()
            try:
                sock.sendall(data)
                while len(received) < len(data):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    received += chunk
            except OSError as exc:
                self._fail(started, "established", exc)
                return
        if len(received) < len(data) and data.startswith(received):
            self._fail(started, "established", EOFError(f"EOF after {len(received)} bytes"))
            return
        with self._lock:
            if received == data:
                self.completed += 1
            else:
                self.corrupt += 1

    def _fail(self, started: float, phase: str, exc: BaseException) -> None:
        with self._lock:
            self.failures.append(Failure(started, time.monotonic(), phase, repr(exc)))
