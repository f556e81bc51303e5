"""The master's pid file: written when it starts, removed when it stops."""

from __future__ import annotations

import os

from prefork.errors import PreforkError


class PidFile:
    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)

    def create(self, pid: int) -> None:
        """Write ``pid`` atomically (a reader never sees half a number)."""
        tmp = f"{self.path}.{pid}.tmp"
        try:
            with open(tmp, "w") as f:
                f.write(f"{pid}\n")
            os.replace(tmp, self.path)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise PreforkError(f"--pid {self.path}: cannot write: {exc.strerror}") from None

    def remove(self, pid: int) -> None:
        """Remove the file if it still names ``pid`` (not a successor's)."""
        try:
            with open(self.path) as f:
                if f.read().strip() == str(pid):
                    os.unlink(self.path)
        except OSError:
            pass
