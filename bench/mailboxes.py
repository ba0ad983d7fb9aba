"""Counting the messages that landed, per mailbox format, and clearing them between runs.

A 250 that did not land is a lost message: every run compares what the load generator saw
accepted with what these counters find on disk. Clearing keeps directories from growing run
after run; the numbered spool belongs to the server, so it is counted by difference instead.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from bench.harness import USERS


def count_maildir(root: Path, mailboxes: Iterable[str] = USERS) -> int:
    n = 0
    for mb in mailboxes:
        for sub in ("new", "cur"):
            with contextlib.suppress(FileNotFoundError):
                n += sum(1 for e in os.scandir(root / mb / sub) if not e.name.startswith("."))
    return n


def clear_maildir(root: Path, mailboxes: Iterable[str] = USERS) -> None:
    """Move the delivered files aside (`root/.cleared/`), do not delete them.

    These machines' ext4 has no journal, and there every inode freed makes the file
    creations that follow scan past it for as long as its inode block stays dirty (the
    kernel's `recently_deleted`, up to minutes): deleting a run's thousands of files would
    tax whichever server runs next, not the one that wrote them. A rename frees nothing;
    run.py removes the whole work directory once, after the last run.
    """
    aside = root / ".cleared"
    aside.mkdir(exist_ok=True)
    for mb in mailboxes:
        for sub in ("new", "cur"):
            with contextlib.suppress(FileNotFoundError):
                for e in os.scandir(root / mb / sub):
                    os.rename(e.path, aside / f"{mb}-{sub}-{e.name}")


def count_mbox(root: Path, mailboxes: Iterable[str] = USERS) -> int:
    n = 0
    for mb in mailboxes:
        with contextlib.suppress(FileNotFoundError), open(root / mb, "rb") as f:
            # our bodies never contain a line starting "From ", so each one is a message
            n += sum(1 for line in f if line.startswith(b"From "))
    return n


def clear_mbox(root: Path, mailboxes: Iterable[str] = USERS) -> None:
    for mb in mailboxes:
        with contextlib.suppress(FileNotFoundError), open(root / mb, "r+b") as f:
            f.truncate(0)


def count_spool(root: Path, mailboxes: Iterable[str] = USERS) -> int:
    n = 0
    for mb in mailboxes:
        with contextlib.suppress(FileNotFoundError):
            n += sum(1 for e in os.scandir(root / mb) if e.name.isdigit())
    return n


def _leave_spool(root: Path) -> None:
    """The spool's numbering belongs to the server: its files stay and are counted by
    difference."""


COUNTERS: dict[str, Callable[[Path], int]] = {
    "maildir": count_maildir,
    "mbox": count_mbox,
    "spool": count_spool,
}
CLEARERS: dict[str, Callable[[Path], None]] = {
    "maildir": clear_maildir,
    "mbox": clear_mbox,
    "spool": _leave_spool,
}
