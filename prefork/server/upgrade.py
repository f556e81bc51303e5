"""Upgrading the master in place: USR2 starts a new master on the same sockets.

How it works (nginx's binary upgrade, gunicorn's USR2): the master forks and
execs ``python -m prefork`` with its own command line, so the prefork and the
Python now installed run. Every listening socket goes along as an inherited
descriptor, named in PREFORK_HANDED_OVER (``b0=5,p1.0=7,metrics=6``: the
i-th -b address, a --reuse-port position's copy, the metrics endpoint); the
new master adopts them instead of binding, so no queue is reset and no port
is ever free. It writes "ready" to the pipe named in PREFORK_UPGRADE_READY
once its workers are forked. Both masters' workers then accept on the same
sockets until the old one is told WINCH (its workers finish and go) and TERM.

The pid file follows the nginx convention: on USR2 the old master renames
FILE to FILE.oldbin and the new one writes FILE. A new master that exits
(before being ready, or after a rollback) gives FILE back to the old one.

While two masters share the sockets, neither may do what a last owner does
on its way out: attach the SYN filter (it would turn new clients away from
the other master too) or remove a UNIX socket file.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from prefork.settings import OLD_PID_SUFFIX, Address

HANDED_OVER_ENV = "PREFORK_HANDED_OVER"
# Set by a master started by systemd socket activation (its -b addresses are
# systemd's sockets, not its command line's): the count of them, so that a
# new master takes the handed-over b0..bN-1 in their place.
ACTIVATED_ENV = "PREFORK_ACTIVATED"
READY_ENV = "PREFORK_UPGRADE_READY"
PREDECESSOR_ENV = "PREFORK_UPGRADE_FROM"
READY = b"ready\n"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class HandOver:
    """What a new master received from the one it upgrades (empty for a
    master started the ordinary way). Read once at start, then removed from
    the environment: workers and handlers' subprocesses must not see it."""

    sockets: dict[str, int] = field(default_factory=dict)
    ready_fd: int = -1
    predecessor: int = 0

    @classmethod
    def from_environment(cls) -> HandOver:
        text = os.environ.pop(HANDED_OVER_ENV, "")
        ready = os.environ.pop(READY_ENV, "")
        predecessor = os.environ.pop(PREDECESSOR_ENV, "")
        return cls(
            cls.from_environment_text(text),
            int(ready) if ready.isdigit() else -1,
            int(predecessor) if predecessor.isdigit() else 0,
        )

    @staticmethod
    def from_environment_text(text: str) -> dict[str, int]:
        """``b0=5,p1.0=7,metrics=6`` as a dict."""
        sockets = {}
        for item in filter(None, text.split(",")):
            key, _, fd = item.partition("=")
            if key and fd.isdigit():
                sockets[key] = int(fd)
        return sockets

    def take_metrics(self) -> int | None:
        return self.sockets.get("metrics")

    def close_unused(self, used: set[int]) -> None:
        """Close what was handed over and not adopted (a setting changed)."""
        for fd in self.sockets.values():
            if fd not in used:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def report_ready(self) -> None:
        """Tell the old master this one serves (once)."""
        if self.ready_fd < 0:
            return
        try:
            os.write(self.ready_fd, READY)
        except OSError:
            pass  # the old master is gone: nobody is waiting
        finally:
            os.close(self.ready_fd)
            self.ready_fd = -1

    def predecessor_alive(self) -> bool:
        """Whether the master this one upgraded still holds the sockets."""
        return self.predecessor > 0 and alive(self.predecessor)


@dataclass
class Successor:
    """A new master started by USR2, seen from the old one."""

    pid: int
    ready_r: int  # readable: "ready", or end of file if it died first
    ready: bool = False


def activated_binds() -> tuple[Address, ...]:
    """In a new master whose predecessor was socket-activated: its systemd
    sockets, as they were handed over, in place of the command line's -b."""
    count = os.environ.get(ACTIVATED_ENV, "")
    if not count.isdigit() or HANDED_OVER_ENV not in os.environ:
        return ()
    handed = HandOver.from_environment_text(os.environ[HANDED_OVER_ENV])
    keys = [f"b{i}" for i in range(int(count))]
    return tuple(Address("fd", fd=handed[key]) for key in keys if key in handed)


def start_successor(
    sockets: dict[str, int], master_pid: int, notify_socket: str | None
) -> Successor:
    """Fork and exec a new master (``python -m prefork`` and this master's
    arguments) that inherits ``sockets`` (key -> descriptor) and systemd's
    ``notify_socket`` (this master took it out of its environment)."""
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    argv = [sys.executable, "-m", "prefork", *sys.argv[1:]]
    env = dict(os.environ)
    if notify_socket:  # the new master says MAINPID= and READY=1 there
        env["NOTIFY_SOCKET"] = notify_socket
    env[HANDED_OVER_ENV] = ",".join(f"{key}={fd}" for key, fd in sockets.items())
    env[READY_ENV] = str(ready_w)
    env[PREDECESSOR_ENV] = str(master_pid)
    pid = os.fork()
    if pid == 0:  # the child: become the new master, or die trying
        try:
            for fd in [*sockets.values(), ready_w]:
                os.set_inheritable(fd, True)
            os.execve(sys.executable, argv, env)
        except BaseException as exc:  # noqa: BLE001  nothing may run the old master's code here
            os.write(2, f"USR2: cannot start a new master: {exc}\n".encode())
        finally:
            os._exit(127)
    os.close(ready_w)
    os.set_blocking(ready_r, False)
    return Successor(pid, ready_r)


def read_ready(successor: Successor) -> bool | None:
    """Read the successor's pipe: True once it is ready, False if it closed
    the pipe without saying so (it failed), None if nothing came yet."""
    try:
        data = os.read(successor.ready_r, 64)
    except BlockingIOError:
        return None
    if data.startswith(READY):
        successor.ready = True
        return True
    return False


def old_pid_path(path: str) -> str:
    return path + OLD_PID_SUFFIX
