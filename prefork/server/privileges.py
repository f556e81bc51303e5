"""Who the workers run as: resolving --user/--group, and dropping root.

The master keeps its identity (it must be able to bind again on a reload and
remove its socket and pid files); each worker drops to ``--user``/``--group``
right after the fork, before it touches a client. The drop sets the real,
effective and saved ids and the supplementary groups, so nothing can take
root back; ``drop_privileges`` checks that by trying.
"""

from __future__ import annotations

import grp
import os
import pwd

from prefork.errors import ConfigError, PreforkError


def parse_user(text: str, option: str = "--user") -> int:
    """A user name or numeric uid that exists on this machine."""
    if text.isdigit():
        return int(text)
    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError:
        raise ConfigError(f"{option}: no such user {text!r}") from None


def parse_group(text: str, option: str = "--group") -> int:
    """A group name or numeric gid that exists on this machine."""
    if text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise ConfigError(f"{option}: no such group {text!r}") from None


def primary_gid(uid: int) -> int:
    """The user's login group, or the current gid for a uid with no passwd entry."""
    try:
        return pwd.getpwuid(uid).pw_gid
    except KeyError:
        return os.getgid()


def check_can_switch(uid: int | None, gid: int | None) -> None:
    """Fail early, in the master, if the workers will not be allowed to switch."""
    if os.geteuid() == 0:
        return
    if (uid is not None and uid != os.geteuid()) or (gid is not None and gid != os.getegid()):
        raise PreforkError("--user/--group: switching to another user needs root")


def drop_privileges(uid: int | None, gid: int | None) -> None:
    """Become ``uid``/``gid`` for good (in a worker, after the fork).

    Supplementary groups become the user's own groups (from the group
    database), or just ``gid`` for a uid with no passwd entry.
    """
    if uid is None and gid is None:
        return
    if os.geteuid() != 0:  # check_can_switch allowed it: already who we should be
        return
    if gid is None:
        gid = primary_gid(uid) if uid is not None else os.getgid()
    if uid is not None:
        try:
            os.initgroups(pwd.getpwuid(uid).pw_name, gid)
        except KeyError:
            os.setgroups([gid])
    else:
        os.setgroups([gid])
    os.setgid(gid)  # as root these set the real, effective and saved ids
    if uid is not None:
        os.setuid(uid)
        if uid != 0:
            try:
                os.setuid(0)
            except PermissionError:
                pass
            else:  # never serve clients with a way back to root
                raise RuntimeError("dropped privileges but setuid(0) still works")
