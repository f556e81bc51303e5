"""The master's pid file: written when it starts, removed when it stops.

A file that names a live prefork master is not taken over: the start fails
(a second master would otherwise overwrite it, then remove it on its way out,
leaving the first one without a pid file). A file naming a process that is
gone, or that is no prefork, is stale: it is replaced (as gunicorn does).
"""

from __future__ import annotations

import os

from prefork.errors import PreforkError


def _running_prefork(pid: int) -> bool:
    """Whether ``pid`` is a live process that looks like prefork (a pid
    reused by another program since a crash does not count)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, someone else's
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except FileNotFoundError:  # gone meanwhile
        return False
    except OSError:  # no /proc: trust the pid, as gunicorn does
        return True
    return b"prefork" in cmdline


class PidFile:
    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)

    def owner(self) -> int | None:
        """The live prefork the file names, if any."""
        try:
            with open(self.path) as f:
                text = f.read().strip()
        except OSError:
            return None
        if not text.isdigit():
            return None
        pid = int(text)
        return pid if pid != os.getpid() and _running_prefork(pid) else None

    def create(self, pid: int) -> None:
        """Write ``pid`` atomically (a reader never sees half a number).
        Raises PreforkError if the file names another live server."""
        tmp = f"{self.path}.{pid}.tmp"
        try:
            with open(tmp, "w") as f:
                f.write(f"{pid}\n")
            try:
                os.link(tmp, self.path)  # only if there is none: two starts cannot both win
                linked = True
            except OSError:  # there is one (or no hard links on this file system)
                linked = False
            if linked:
                os.unlink(tmp)
            else:
                running = self.owner()
                if running is not None:
                    raise PreforkError(f"already running as pid {running} (from {self.path})")
                os.replace(tmp, self.path)  # stale: a dead server's
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise PreforkError(f"--pid {self.path}: cannot write: {exc.strerror}") from None
        except PreforkError:
            os.unlink(tmp)
            raise

    def remove(self, pid: int) -> None:
        """Remove the file if it still names ``pid`` (not a successor's)."""
        try:
            with open(self.path) as f:
                if f.read().strip() == str(pid):
                    os.unlink(self.path)
        except OSError:
            pass
