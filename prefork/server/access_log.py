"""``--access-log``: the file the workers write one line per connection to.

The line's format is ``prefork._fastio_common.access_line`` (the event loops
format theirs without the GIL; the blocking workers call it). Each worker
opens the file itself, appending; ``-`` is standard output, reopened through
``/proc/self/fd/1`` so that the non-blocking flag is this worker's alone (a
socket, journald's standard output, cannot be reopened so: it is written
with ``send(MSG_DONTWAIT)`` instead). No write ever waits: a line the file
does not take at once is dropped and counted. USR1 reopens the file (for
logrotate) under the same descriptor number, so an event loop holding it
writes to the new file at its next flush.
"""

from __future__ import annotations

import os
import socket
import stat

from prefork.errors import PreforkError

_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK | os.O_CLOEXEC


def open_access_log(path: str) -> int:
    """A close-on-exec, non-blocking descriptor appending to ``path`` (made
    0644 if missing), or to standard output for ``-``. Raises OSError."""
    if path == "-":
        try:
            return os.open("/proc/self/fd/1", _FLAGS)
        except OSError:  # a socket: written with MSG_DONTWAIT, see above
            return os.dup(1)
    return os.open(path, _FLAGS | os.O_CREAT, 0o644)


def check_access_log(path: str | None) -> None:
    """At start, in the master: raise PreforkError (one line, exit 1) if
    ``path`` cannot be opened for appending."""
    if path is None:
        return
    try:
        os.close(open_access_log(path))
    except OSError as exc:
        raise PreforkError(f"--access-log {path}: cannot open: {exc.strerror}") from None


class AccessLog:
    """A worker's access log for the blocking workers: one write per line."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = open_access_log(path)
        self.socket = stat.S_ISSOCK(os.fstat(self.fd).st_mode)
        self.dropped = 0  # lines the file did not take at once

    def write(self, line: bytes) -> None:
        """Write ``line`` now or drop it (counted): never waits."""
        try:
            if self.socket:
                flags = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
                sock = socket.socket(fileno=self.fd)
                try:
                    written = sock.send(line, flags)
                finally:
                    sock.detach()
            else:
                written = os.write(self.fd, line)
        except OSError:  # full (EAGAIN), gone (EPIPE), no space...
            written = 0
        if written < len(line):
            self.dropped += 1

    def reopen(self) -> bool:
        """Open the path again onto the same descriptor (USR1); False if it
        cannot be opened, in which case the old file stays in use."""
        if self.path == "-":
            return True
        try:
            new = open_access_log(self.path)
        except OSError:
            return False
        os.dup2(new, self.fd, inheritable=False)
        os.close(new)
        return True

    def close(self) -> None:
        os.close(self.fd)
