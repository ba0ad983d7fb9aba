"""Dropping root: bind the privileged ports first, then become an unprivileged user.

Started as root (to bind 25, 465 and 587), postier switches to `--user` (default `postier`
when that account exists) before it reads a single byte from the network. The directories
it must write (mail root, queue, the spool inside the mail root) are created and handed to
that user first, so the switch cannot leave it unable to store mail. If it stays root, it
says so loudly: a parser bug in a root process is a root compromise.
"""

from __future__ import annotations

import logging
import os
import pwd
from pathlib import Path

from postier import log
from postier.errors import ConfigError

_LOG = logging.getLogger("postier.privileges")

DEFAULT_USER = "postier"


def target_user(configured: str) -> pwd.struct_passwd | None:
    """The account to become, or None to stay as we are."""
    if os.geteuid() != 0:
        return None
    name = configured or DEFAULT_USER
    try:
        return pwd.getpwnam(name)
    except KeyError:
        if configured:
            raise ConfigError(f"--user: no such user {configured!r}") from None
        return None


def prepare_dirs(dirs: list[Path], account: pwd.struct_passwd) -> None:
    """Create the writable directories (0700) and give them to `account`."""
    for d in dirs:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = d.stat()
        if (st.st_uid, st.st_gid) != (account.pw_uid, account.pw_gid):
            os.chown(d, account.pw_uid, account.pw_gid)


def chown_tree(root: Path, account: pwd.struct_passwd) -> None:
    """Give a whole tree (the queue: small, and all of it ours) to `account`."""
    uid, gid = account.pw_uid, account.pw_gid
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            os.lchown(os.path.join(dirpath, name), uid, gid)
    os.chown(root, uid, gid)


def drop(account: pwd.struct_passwd) -> None:
    """Become `account` for good: groups, gid, then uid (the order matters)."""
    os.setgroups([])
    os.setgid(account.pw_gid)
    os.setuid(account.pw_uid)
    if os.getuid() == 0 or os.geteuid() == 0:  # pragma: no cover - the kernel said no
        raise OSError("could not drop root privileges")
    os.environ["HOME"] = account.pw_dir
    log.event("privileges-dropped", logger=_LOG, user=account.pw_name, uid=account.pw_uid)


def warn_if_root() -> None:
    if os.geteuid() == 0:
        log.event(
            "security-warning",
            logging.WARNING,
            _LOG,
            problem="RUNNING AS ROOT: create a 'postier' user or pass --user to drop privileges",
        )
