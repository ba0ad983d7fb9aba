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
    for mb in mailboxes:
        for sub in ("new", "cur"):
            with contextlib.suppress(FileNotFoundError):
                for e in os.scandir(root / mb / sub):
                    os.unlink(e.path)


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
