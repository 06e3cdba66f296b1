"""Which OS user runs the sandbox PostgreSQL, and what that user can reach.

PostgreSQL refuses to run as root. A root process therefore runs the server as the
``postgres`` OS user (made by the distributions' server packages) or, on a machine without
one (packaged binaries, no server package), as ``nobody``: any unprivileged account works
for a throwaway cluster whose data directory it owns. That user must be able to traverse
to the data directory and to execute the binaries; a virtual environment or cache under
``/root`` (mode 700) is out of its reach, which :func:`blocked_dir` detects so callers can
copy the binaries somewhere reachable or fail with a clear message.
"""

from __future__ import annotations

import os
import pwd
import stat
from typing import Optional, Set, Tuple

from pgrepl.errors import ConfigError

#: OS users tried, in order, when running as root.
SERVER_USERS = ("postgres", "nobody")


def server_user() -> Optional[pwd.struct_passwd]:
    """The OS user to run PostgreSQL as: None (ourselves) unless we are root, then ``postgres`` or ``nobody``."""
    if os.geteuid() != 0:
        return None
    for name in SERVER_USERS:
        try:
            user = pwd.getpwnam(name)
        except KeyError:
            continue
        if user.pw_uid != 0:
            return user
    raise ConfigError(
        "running as root, but PostgreSQL refuses root and there is neither a 'postgres' nor a 'nobody' OS user: "
        "create one (useradd -r postgres) or run as non-root"
    )


def _groups(user: pwd.struct_passwd) -> Set[int]:
    """The group IDs ``user`` belongs to."""
    return set(os.getgrouplist(user.pw_name, user.pw_gid))


def _allows(user: pwd.struct_passwd, groups: Set[int], st: os.stat_result, owner_bit: int, group_bit: int,
            other_bit: int) -> bool:
    """Whether ``user`` has the permission (given as its owner/group/other mode bits) on a file."""
    if st.st_uid == user.pw_uid:
        return bool(st.st_mode & owner_bit)
    if st.st_gid in groups:
        return bool(st.st_mode & group_bit)
    return bool(st.st_mode & other_bit)


def blocked_dir(user: Optional[pwd.struct_passwd], path: str) -> Optional[Tuple[str, int]]:
    """The first directory on the way to ``path`` that ``user`` cannot traverse, with its mode; None if all can be.

    ``user`` None means ourselves, who can reach whatever we are asked about.
    """
    if user is None:
        return None
    groups = _groups(user)
    current = os.path.abspath(path)
    while True:
        st = os.stat(current)
        if stat.S_ISDIR(st.st_mode) and not _allows(user, groups, st, stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH):
            return current, stat.S_IMODE(st.st_mode)
        parent = os.path.dirname(current)
        if parent == current:
            return None
        current = parent


def can_execute(user: Optional[pwd.struct_passwd], exe: str) -> bool:
    """Whether ``user`` (None: ourselves) can reach and execute ``exe`` (symlinks resolved)."""
    if user is None:
        return os.access(exe, os.X_OK)
    real = os.path.realpath(exe)
    try:
        st = os.stat(real)
    except OSError:
        return False
    return blocked_dir(user, real) is None and _allows(user, _groups(user), st, stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH)
