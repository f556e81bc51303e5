"""The self-pipe that wakes a process's main loop when a signal arrives.

``signal.set_wakeup_fd`` makes the C-level signal handler write a byte to the
pipe; the loop waits on the read end beside its sockets, drains it, and then
acts on what the Python-level handlers recorded.
"""

from __future__ import annotations

import os
import signal


def open_wakeup_pipe() -> tuple[int, int]:
    """Create the pipe and hand its write end to ``signal``; return both ends."""
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    return read_end, write_end


def drain(fd: int) -> None:
    """Read everything waiting on a non-blocking descriptor."""
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass
