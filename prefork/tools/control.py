"""``prefork reload|stop|upgrade --pid FILE``: signal the master a pid file names.

Like ``nginx -s``: the pid file says who the master is, and nothing is sent
blindly. A file that is missing, unreadable, or names a process that is gone
or is not a prefork master is reported (exit 1) and no signal is sent.
``upgrade`` runs the whole USR2 sequence (see server/upgrade.py): USR2, wait for
the new master's workers, WINCH the old master, wait for its workers to
finish, TERM it; a new master that dies first leaves the old one serving.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

from prefork.errors import PreforkError
from prefork.settings import OLD_PID_SUFFIX

POLL = 0.05  # seconds between two looks at /proc


class ControlError(PreforkError):
    """The pid file names no master, or the master did not do what was asked."""

    exit_code = 1


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def is_master(pid: int) -> bool:
    """A live prefork master: its title (set once it has bound) or, before
    that, its command line ``... prefork serve ...``."""
    text = _cmdline(pid)
    return text.startswith(b"prefork: master") or (b"prefork" in text and b"serve" in text)


def workers_of(pid: int) -> list[int]:
    """The master's children that are workers (a USR2's new master is a child too)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except OSError:
        return []
    return [c for c in children if _cmdline(c).startswith(b"prefork: worker")]


def read_master(path: str) -> int:
    """The pid of the live master that ``path`` names (raises ControlError)."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError as exc:
        raise ControlError(f"--pid {path}: cannot read: {exc.strerror}") from None
    if not text.isdigit():
        raise ControlError(f"--pid {path}: does not hold a pid ({text[:20]!r})")
    pid = int(text)
    if not os.path.exists(f"/proc/{pid}"):
        raise ControlError(f"--pid {path}: stale, pid {pid} is not running")
    if not is_master(pid):
        raise ControlError(f"--pid {path}: pid {pid} is not a prefork master; nothing sent")
    return pid


def wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL)
    return True


def gone(pid: int) -> bool:
    """Exited (a zombie counts: its parent has yet to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def reload(path: str) -> int:
    pid = read_master(path)
    os.kill(pid, signal.SIGHUP)
    print(f"sent HUP to master {pid}: a new generation of workers starts")
    return 0


def stop(path: str, fast: bool, timeout: float) -> int:
    pid = read_master(path)
    sig = signal.SIGQUIT if fast else signal.SIGTERM
    os.kill(pid, sig)
    print(f"sent {sig.name} to master {pid}")
    if not wait_for(lambda: gone(pid), timeout):
        raise ControlError(f"master {pid} is still running after {timeout:g} s")
    print(f"master {pid} stopped")
    return 0


def upgrade(path: str, timeout: float) -> int:
    old = read_master(path)
    os.kill(old, signal.SIGUSR2)
    print(f"sent USR2 to master {old}")

    def new_master() -> int:
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            return 0
        return int(text) if text.isdigit() and int(text) != old else 0

    def new_serves() -> bool:
        pid = new_master()
        return bool(pid) and bool(workers_of(pid))

    began = False  # FILE.oldbin appeared: the old master has acted on USR2

    def failed() -> bool:  # the old master took FILE back, or it died
        nonlocal began
        moved = os.path.exists(path + OLD_PID_SUFFIX)
        began = began or moved
        return gone(old) or (began and not moved and not new_master())

    if not wait_for(lambda: new_serves() or failed(), timeout) or not new_serves():
        raise ControlError(
            f"the new master did not start within {timeout:g} s; master {old} keeps serving "
            "(its log says why)"
        )
    new = new_master()
    print(f"new master {new} is serving; sending WINCH to master {old}")
    os.kill(old, signal.SIGWINCH)
    if not wait_for(lambda: not workers_of(old), timeout):
        raise ControlError(f"master {old}'s workers still run after {timeout:g} s")
    os.kill(old, signal.SIGTERM)
    if not wait_for(lambda: gone(old), timeout):
        raise ControlError(f"master {old} is still running after {timeout:g} s")
    print(f"master {old} stopped; master {new} serves")
    return 0
