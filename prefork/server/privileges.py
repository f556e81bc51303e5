"""Who the workers run as: dropping root to --user/--group.

``prefork.settings`` resolves the names and checks, in the master, that the
switch is allowed (``check_can_switch``); this module does the switch.

The master keeps its identity (it must be able to bind again on a reload and
remove its socket and pid files); each worker drops to ``--user``/``--group``
right after the fork, before it touches a client. The drop sets the real,
effective and saved ids and the supplementary groups, so nothing can take
root back; ``drop_privileges`` checks that by trying.
"""

from __future__ import annotations

import os
import pwd


def primary_gid(uid: int) -> int:
    """The user's login group, or the current gid for a uid with no passwd entry."""
    try:
        return pwd.getpwuid(uid).pw_gid
    except KeyError:
        return os.getgid()


def file_owner(uid: int | None, gid: int | None) -> tuple[int, int] | None:
    """Who the UNIX socket files and --log-file are handed to: the uid and
    gid the workers run as (-1: unchanged), or None when nothing changes.
    Without --group that is the user's login group, as for the workers
    themselves; a master that is not root switches nobody, so --user alone
    changes nothing then."""
    if uid is None and gid is None:
        return None
    if gid is None and os.geteuid() == 0:
        assert uid is not None
        gid = primary_gid(uid)
    return (-1 if uid is None else uid, -1 if gid is None else gid)


def drop_privileges(uid: int | None, gid: int | None) -> None:
    """Become ``uid``/``gid`` for good (in a worker, after the fork).

    Supplementary groups become the user's own groups (from the group
    database), or just ``gid`` for a uid with no passwd entry.
    """
    if uid is None and gid is None:
        return
    if os.geteuid() != 0:  # settings.check_can_switch allowed it: already who we should be
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
