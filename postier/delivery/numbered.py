"""The numbered spool (`-F spool`): one directory per mailbox, one file per message.

Layout of `<root>/<mailbox>/` (directory 0700, files 0600):

    1, 2, 3 ...     the messages in arrival order from 1, each the spool file as we stored it
                    (Return-Path first, then Received, then the message; LF line endings)
    <N>.status      the state of message N: ONE line of space-separated IMAP flags, ending in
                    LF. A new message has `\\Recent`; a reader that has shown it may rewrite the
                    line, e.g. `\\Seen`, or leave it empty for "no flags". So
                    `grep -l '\\\\Recent' *.status` lists new mail.
    .lock           the lock file (see below); it also holds the last number handed out, as a
                    decimal line. That number is only a hint: it is checked against the
                    directory, so a lost or stale hint costs one directory scan, never a reuse.
    .tmp.*          a delivery in progress, or the leftover of a crash (removed, once 36 hours
                    old, by the next delivery that scans the directory).

A reader takes every name made of digits only as a message and ignores dot files and a
`<N>.status` whose message does not exist (possible only after a crash; see `_store`).

Concurrent deliveries to one mailbox are serialised under `fcntl.lockf` on `.lock`. The number
is chosen and both renames done while the lock is held, so two arrivals can never pick the same
N. Files are written under unique temporary names and fsync'd first (outside the lock, so
arrivals overlap their slow part), renamed into place under the lock, and the directory fsync'd:
a crash leaves either the message with its status, or no message at that number (and the number
is reused by the next arrival: no gap, no duplicate).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from postier.delivery.base import (
    Recipient,
    RecipientResult,
    StoredMessage,
)
from postier.delivery.fsutil import (
    copy_from,
    ensure_dir,
    fsync_dir,
    open_locked,
    write_all,
)
from postier.delivery.grouped import deliver_per_mailbox
from postier.log import event as log_event

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
NEW_STATUS = b"\\Recent\n"
STALE_TMP_AGE = 36 * 3600
FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class NumberedSpoolBackend:
    """Deliver into numbered spool directories; blocking, meant for the delivery thread pool."""

    def __init__(self, root: Path, template: str | None = None, *, lock_timeout: float = 30.0):
        self.root = Path(root)
        self.template = template
        self.lock_timeout = lock_timeout
        # Directories whose hint this process has checked against a full scan. Read and added
        # to under that directory's lock; set operations are atomic in CPython.
        self._verified: set[Path] = set()

    def deliver(
        self, message: StoredMessage, recipients: Sequence[Recipient]
    ) -> list[RecipientResult]:
        """Store one copy per distinct mailbox; one result per recipient, in order."""
        return deliver_per_mailbox(
            message, recipients, root=self.root, template=self.template,
            backend="spool", logger=log, store_one=self._deliver_one,
        )  # fmt: skip

    def _deliver_one(
        self, message: StoredMessage, directory: Path, owner: tuple[int, int] | None
    ) -> int:
        ensure_dir(directory, 0o700, owner)
        # The slow part (copying and fsyncing both files) needs no number, so it runs before
        # the lock, in parallel with other deliveries; only renames happen under the lock.
        tag = f".tmp.{os.getpid()}.{threading.get_ident()}.{secrets.token_hex(4)}"
        tmp_msg, tmp_status = directory / tag, directory / f"{tag}.status"
        try:
            with open(message.path, "rb") as src:
                _write_file(tmp_msg, owner, lambda fd: copy_from(src, fd, 0))
            _write_file(tmp_status, owner, lambda fd: write_all(fd, NEW_STATUS))
            # lockf cannot lock a directory: it locks byte ranges of a file and needs a
            # descriptor open for writing. So the lock is a file inside the mailbox.
            with open_locked(
                directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, self.lock_timeout
            ) as lock_fd:
                if owner is not None and os.fstat(lock_fd).st_uid != owner[0]:
                    os.fchown(lock_fd, *owner)
                number = self._next_number(lock_fd, directory)
                _place(directory, number, tmp_msg, tmp_status)
                _write_hint(lock_fd, number)
                return number
        finally:
            for path in (tmp_msg, tmp_status):  # gone after success; leftovers on failure
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    def _next_number(self, lock_fd: int, directory: Path) -> int:
        """The next free N. Called under the lock; scans only when the hint is in doubt."""
        hint = _read_hint(lock_fd)
        if (
            hint is None
            or directory not in self._verified
            or os.path.lexists(directory / str(hint + 1))
        ):
            # max with the hint: numbers of messages a reader deleted are not handed out again
            hint = max(hint or 0, _scan(directory))
            self._verified.add(directory)
        return hint + 1


def _place(directory: Path, number: int, tmp_msg: Path, tmp_status: Path) -> None:
    """Rename the written files to N (under the lock); on failure remove what was placed.

    Order: status renamed into place (and the directory fsync'd) BEFORE the message. A crash in
    between leaves `<N>.status` without `<N>`: invisible to readers (no message), and the next
    arrival, seeing no `<N>`, takes N again and renames its status over it. The other order
    could leave a message without a status, which a reader cannot interpret. The directory
    fsync between the renames is what makes the order hold on disk, not just in the cache.
    """
    final_msg, final_status = directory / str(number), directory / f"{number}.status"
    placed: list[Path] = []
    try:
        os.rename(tmp_status, final_status)
        placed.append(final_status)
        fsync_dir(directory)
        os.rename(tmp_msg, final_msg)
        placed.append(final_msg)
        fsync_dir(directory)
    except BaseException:
        for path in reversed(placed):
            with contextlib.suppress(OSError):
                os.unlink(path)
        with contextlib.suppress(OSError):
            fsync_dir(directory)
        raise


def _write_file(path: Path, owner: tuple[int, int] | None, fill: Callable[[int], object]) -> None:
    """Create `path` 0600 (owned by `owner`), let `fill(fd)` write it, then fsync and close."""
    fd = os.open(path, FILE_FLAGS, 0o600)
    try:
        os.fchmod(fd, 0o600)
        if owner is not None:
            os.fchown(fd, *owner)
        fill(fd)
        os.fsync(fd)
    finally:
        os.close(fd)


def _scan(directory: Path) -> int:
    """Return the highest message number present, and remove temporary files old enough to
    be crash leftovers (younger ones may be deliveries in progress, written before the lock;
    36 hours is the Maildir rule for tmp/)."""
    highest = 0
    old = time.time() - STALE_TMP_AGE
    with os.scandir(directory) as entries:
        for entry in entries:
            name = entry.name
            if name.isascii() and name.isdigit():
                highest = max(highest, int(name))
            elif name.startswith(".tmp."):
                with contextlib.suppress(OSError):
                    if entry.stat(follow_symlinks=False).st_mtime < old:
                        os.unlink(entry.path)
    return highest


def _read_hint(lock_fd: int) -> int | None:
    raw = os.pread(lock_fd, 32, 0).strip()
    return int(raw) if raw.isascii() and raw.isdigit() else None


def _write_hint(lock_fd: int, number: int) -> None:
    """Record the last number. Not fsync'd, and a failure is not an error: the message is
    already in place (reporting failure now would bring a duplicate on retry), and
    `_next_number` checks the hint against the directory anyway."""
    data = f"{number}\n".encode()
    try:
        os.pwrite(lock_fd, data, 0)
        os.ftruncate(lock_fd, len(data))
    except OSError as exc:
        log_event("spool_hint_failed", logging.WARNING, log, number=number, error=repr(exc))
