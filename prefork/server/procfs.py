"""What the kernel says about a process and about a listening socket's queue.

The master reads these for the metrics endpoint when a page is asked for,
never on its own: a page costs one read of ``/proc/PID/stat`` and one
listing of ``/proc/PID/fd`` per process, and one ``getsockopt`` per TCP
listener. A process gone between the listing of the workers and the read
has no figures (None), which is not an error.

The figures are the ones the Prometheus client's process collector exports
under the ``process_*`` names, computed the same way.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass
from functools import cache

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")  # the unit of /proc/PID/stat's times
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")  # the unit of its rss

# /proc/PID/stat after the ")" that ends the command name: field 3 (state)
# is index 0, so field N is index N - 3 (proc(5)).
_UTIME, _STIME, _STARTTIME, _RSS = 14 - 3, 15 - 3, 22 - 3, 24 - 3

# struct tcp_info (linux/tcp.h): eight one-byte fields, then 32-bit ones
# (rto, ato, snd_mss, rcv_mss, unacked, sacked ...). On a listening socket
# tcpi_unacked is the accept queue's length and tcpi_sacked its limit (the
# backlog as the kernel capped it): what ss shows as Recv-Q and Send-Q.
_TCP_INFO_HEAD = struct.Struct("<B23xII")  # tcpi_state ... tcpi_unacked, tcpi_sacked
_TCP_LISTEN = 10  # TCP_LISTEN in the kernel's state numbering


@dataclass(frozen=True)
class ProcessStats:
    cpu_seconds: float  # user + system, all its threads
    resident_bytes: int
    open_fds: int | None  # None where /proc/PID/fd may not be listed
    start_time: float  # seconds since the epoch


@dataclass(frozen=True)
class ListenQueue:
    length: int  # connections the kernel finished and nobody accepted yet
    limit: int  # the most it keeps: --backlog, capped at net.core.somaxconn


@cache
def boot_time() -> float:
    """The boot time in seconds since the epoch (``btime`` in /proc/stat)."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("btime "):
                return float(line.split()[1])
    raise OSError("/proc/stat has no btime line")


def process_stats(pid: int) -> ProcessStats | None:
    """``pid``'s CPU time, resident memory, open descriptors and start time;
    None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    try:
        listed = len(os.listdir(f"/proc/{pid}/fd"))
        # Our own listing counts the descriptor it reads the directory with.
        open_fds: int | None = listed - 1 if pid == os.getpid() else listed
    except (FileNotFoundError, ProcessLookupError):
        return None
    except PermissionError:  # another user's process and we are not root
        open_fds = None
    return ProcessStats(
        cpu_seconds=(int(fields[_UTIME]) + int(fields[_STIME])) / CLOCK_TICKS,
        resident_bytes=int(fields[_RSS]) * PAGE_SIZE,
        open_fds=open_fds,
        start_time=boot_time() + int(fields[_STARTTIME]) / CLOCK_TICKS,
    )


def listen_queue(sock: socket.socket) -> ListenQueue | None:
    """The accept queue of a listening TCP socket; None for any other socket
    (UNIX and UDP sockets, a closed one)."""
    if sock.fileno() < 0 or sock.type != socket.SOCK_STREAM:
        return None
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_HEAD.size)
    except OSError:
        return None
    if len(info) < _TCP_INFO_HEAD.size:
        return None
    state, length, limit = _TCP_INFO_HEAD.unpack(info)
    if state != _TCP_LISTEN:
        return None
    return ListenQueue(length, limit)
