"""systemd integration: socket activation and sd_notify, both optional.

Socket activation: systemd binds the sockets of a ``.socket`` unit and starts
us with them as descriptors 3, 4, ... and ``LISTEN_FDS``/``LISTEN_PID`` in the
environment; ``inherited_fds`` claims them (and clears the variables so that
no child takes them for its own).

sd_notify: with ``Type=notify`` systemd passes ``NOTIFY_SOCKET``, a datagram
socket (``@`` means the abstract namespace) on which the master says
``READY=1``, ``RELOADING=1``, ``STOPPING=1`` and, under ``WatchdogSec=``,
``WATCHDOG=1``. Without ``NOTIFY_SOCKET`` every call is a no-op.
"""

from __future__ import annotations

import os
import socket
import time

from prefork.server.log import get_logger

SD_LISTEN_FDS_START = 3


def inherited_fds() -> list[int]:
    """The descriptors systemd passed to this process, or none."""
    pid = os.environ.get("LISTEN_PID", "")
    count = os.environ.get("LISTEN_FDS", "")
    if not pid.isdigit() or int(pid) != os.getpid() or not count.isdigit():
        return []
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    return list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)))


class Notifier:
    """Sends state changes to systemd when ``NOTIFY_SOCKET`` is set."""

    def __init__(self) -> None:
        self.address: str | None = os.environ.pop("NOTIFY_SOCKET", None) or None
        if self.address and self.address.startswith("@"):
            self.address = "\0" + self.address[1:]
        self.sock: socket.socket | None = None
        if self.address:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        # WatchdogSec=: ping at half the interval, as sd_watchdog_enabled advises.
        usec = os.environ.pop("WATCHDOG_USEC", "")
        watchdog_pid = os.environ.pop("WATCHDOG_PID", "")
        self.watchdog_interval = 0.0
        if usec.isdigit() and int(usec) > 0 and watchdog_pid in ("", str(os.getpid())):
            self.watchdog_interval = int(usec) / 2e6
        self.watchdog_due = 0.0
        self.failed = False

    @property
    def enabled(self) -> bool:
        return self.sock is not None

    def notify(self, state: str) -> None:
        """Send ``state`` (lines of KEY=VALUE); a failure is logged once."""
        if self.sock is None or self.address is None:
            return
        try:
            self.sock.sendto(state.encode(), self.address)
        except OSError as exc:
            if not self.failed:
                get_logger().warning("sd_notify to %r failed: %s", self.address, exc.strerror)
                self.failed = True

    def ping(self, now: float | None = None) -> float | None:
        """Send WATCHDOG=1 when due; return seconds until the next one."""
        if not self.watchdog_interval:
            return None
        now = time.monotonic() if now is None else now
        if now >= self.watchdog_due:
            self.notify("WATCHDOG=1")
            self.watchdog_due = now + self.watchdog_interval
        return self.watchdog_due - now

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
