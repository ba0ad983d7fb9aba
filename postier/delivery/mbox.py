"""mbox delivery (`-F mbox`): one file per mailbox, `<root>/<mailbox>`, as exim and Postfix do.

Each message is appended as

    From <envelope sender or MAILER-DAEMON> <asctime of arrival, local time>
    <the spool file from offset 0: Return-Path, Received, the message>, mboxrd-quoted
    <one blank line>

mboxrd quoting prefixes one `>` to every line matching `>*From ` so a reader can undo it
exactly (`>From ` -> `From `), unlike mboxo where `>From ` in the original is lost. The
Return-Path line stays as the first header, as Postfix's local(8) writes it.

Locking is what mutt, Dovecot and procmail expect in /var/mail: a `<file>.lock` dotlock
(O_CREAT|O_EXCL, with a bounded wait and stale-lock removal) *then* an fcntl lock on the mbox,
the order Dovecot uses (`mbox_write_locks = dotlock fcntl`), so we never deadlock with it.

Failure is all-or-nothing: the length of the file is noted under the lock, and on any error the
file is truncated back to it (or removed if we created it), so readers never see half a
message; the recipient gets 451 4.3.0 and the client retries. Success is reported only after
fsync (and a directory fsync when the file is new).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import stat
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from postier.delivery.base import (
    Recipient,
    RecipientResult,
    StoredMessage,
)
from postier.delivery.fsutil import (
    BLOCK,
    ensure_dir,
    fsync_dir,
    lockf_exclusive,
    path_lock,
    write_all,
)
from postier.delivery.grouped import deliver_per_mailbox
from postier.log import event as log_event

log = logging.getLogger(__name__)

FROM_LINE = re.compile(rb">*From ")
UNSAFE_IN_FROM = re.compile(r"[\s\x00-\x1f\x7f]")  # would break the separator's fields


class MboxBackend:
    """Append messages to mbox files; blocking, meant for the delivery thread pool."""

    def __init__(
        self,
        root: Path,
        template: str | None = None,
        *,
        lock_timeout: float = 30.0,
        stale_lock_age: float = 300.0,
    ) -> None:
        # lock_timeout bounds how long one delivery waits for a busy mailbox; 30 s stays far
        # below the 10 minutes an SMTP client waits for the reply to DATA (RFC 5321 4.5.3.2).
        # stale_lock_age: a dotlock untouched this long belongs to a crashed writer (mutt and
        # procmail use 5 minutes too).
        self.root = Path(root)
        self.template = template
        self.lock_timeout = lock_timeout
        self.stale_lock_age = stale_lock_age

    def deliver(
        self, message: StoredMessage, recipients: Sequence[Recipient]
    ) -> list[RecipientResult]:
        """Append one copy per distinct mailbox; one result per recipient, in order."""
        return deliver_per_mailbox(
            message, recipients, root=self.root, template=self.template,
            backend="mbox", logger=log, store_one=self._append,
        )  # fmt: skip

    def _append(self, message: StoredMessage, path: Path, owner: tuple[int, int] | None) -> None:
        deadline = time.monotonic() + self.lock_timeout
        guard = path_lock(path)  # threads of this process: lockf alone cannot tell them apart
        if not guard.acquire(timeout=self.lock_timeout):
            raise TimeoutError(errno.ETIMEDOUT, "mailbox busy in this process")
        try:
            # A shared spool directory (/var/mail) must stay traversable for each user's IMAP
            # server; a per-user one (/home/alice/mail) is private to its owner.
            ensure_dir(path.parent, 0o755 if owner is None else 0o700, owner)
            with dotlock(path.with_name(path.name + ".lock"), deadline, self.stale_lock_age):
                fd, created = _open_mbox(path)
                try:
                    if created:
                        os.fchmod(fd, 0o600)
                        if owner is not None:
                            os.fchown(fd, *owner)
                    lockf_exclusive(fd, max(0.0, deadline - time.monotonic()))
                    self._append_locked(fd, message, path, created)
                finally:
                    os.close(fd)  # releases the fcntl lock
        finally:
            guard.release()

    def _append_locked(self, fd: int, message: StoredMessage, path: Path, created: bool) -> None:
        old_size = os.fstat(fd).st_size  # read under the lock: this is what we restore
        try:
            os.lseek(fd, old_size, os.SEEK_SET)
            with open(message.path, "rb") as src:
                _write_message(fd, old_size, message, src)
            os.fsync(fd)
            if created:
                fsync_dir(path.parent)
        except BaseException:
            try:
                if created:
                    os.unlink(path)
                else:
                    os.ftruncate(fd, old_size)
                    os.fsync(fd)
            except OSError as exc:  # the disk may be gone; say so loudly, keep the first error
                log_event(
                    "undo_failed",
                    logging.ERROR,
                    log,
                    qid=message.queue_id,
                    backend="mbox",
                    mailbox=path,
                    error=repr(exc),
                )
            raise


def _write_message(fd: int, old_size: int, message: StoredMessage, src: BinaryIO) -> None:
    """Write separator, quoted content and the closing blank line, in 64 KiB writes."""
    out = bytearray(_separator_gap(fd, old_size))
    out += from_line(message.sender, message.received_at)
    last = b"\n"
    for piece in mboxrd_quote(src):
        out += piece
        last = piece[-1:]
        if len(out) >= BLOCK:
            write_all(fd, out)
            out.clear()
    if last != b"\n":
        out += b"\n"
    out += b"\n"  # the blank line that ends every message in an mbox
    write_all(fd, out)


def from_line(sender: str, when: float) -> bytes:
    """The `From ` separator; whitespace in an address would split its fields, so it becomes _."""
    envelope = UNSAFE_IN_FROM.sub("_", sender) if sender else "MAILER-DAEMON"
    return f"From {envelope} {time.asctime(time.localtime(when))}\n".encode()


def mboxrd_quote(src: BinaryIO) -> Iterator[bytes]:
    """Yield the file's bytes with `>` added before each line matching `>*From `.

    Reads bounded pieces (never a whole huge line); when a piece ends inside a run of `>` at
    the start of a line it reads on, so the test is exact at any length.
    """
    at_line_start = True
    while chunk := src.readline(BLOCK):
        if at_line_start:
            while not chunk.endswith(b"\n") and len(chunk.lstrip(b">")) < 5:
                more = src.readline(BLOCK)
                if not more:
                    break
                chunk += more
            if FROM_LINE.match(chunk):
                yield b">"
        yield chunk
        at_line_start = chunk.endswith(b"\n")


def _separator_gap(fd: int, size: int) -> bytes:
    """Newlines needed so our `From ` line follows a blank line even after a sloppy writer."""
    if size == 0:
        return b""
    tail = os.pread(fd, 2, max(0, size - 2))
    if tail.endswith(b"\n\n") or tail == b"\n":
        return b""
    return b"\n" if tail.endswith(b"\n") else b"\n\n"


def _open_mbox(path: Path) -> tuple[int, bool]:
    """Open the mbox for read/write, creating it if needed; never through a symlink.

    O_NOFOLLOW matters: root appending to a symlink that a user planted in /var/mail is the
    classic local-delivery hole.
    """
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
    while True:
        try:
            return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600), True
        except FileExistsError:
            pass
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            continue  # removed between the two opens: try to create it again
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, "mailbox is not a regular file", str(path))
        return fd, False


@contextlib.contextmanager
def dotlock(lock_path: Path, deadline: float, stale_age: float) -> Iterator[None]:
    """Hold `<mbox>.lock` (created with O_EXCL, containing our pid) until the block ends."""
    pause = 0.001
    while True:
        try:
            fd = os.open(lock_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            if _remove_if_stale(lock_path, stale_age):
                continue
            if time.monotonic() >= deadline:
                raise TimeoutError(errno.ETIMEDOUT, "dotlock held", str(lock_path)) from None
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
            continue
        try:
            with contextlib.suppress(OSError):  # the pid is a courtesy; the file is the lock
                write_all(fd, f"{os.getpid()}\n".encode())
        finally:
            os.close(fd)
        break
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)


def _remove_if_stale(lock_path: Path, stale_age: float) -> bool:
    """Remove a dotlock left by a dead writer; True if the caller should retry at once.

    Stale means: its pid is not a live process here, or it is older than `stale_age`. A lock
    that is brand new may still be empty (its owner has not written the pid yet): only its age
    can judge it then. The inode is compared before unlinking so we do not remove a lock that
    a peer took in the meantime.
    """
    try:
        before = os.lstat(lock_path)
        with open(lock_path, "rb") as f:
            content = f.read(32)
    except FileNotFoundError:
        return True
    stale = time.time() - before.st_mtime > stale_age
    if not stale and content.strip().isdigit():
        pid = int(content)
        stale = pid != os.getpid() and not _alive(pid)
    if not stale:
        return False
    try:
        now = os.lstat(lock_path)
    except FileNotFoundError:
        return True
    if (now.st_ino, now.st_mtime_ns) != (before.st_ino, before.st_mtime_ns):
        return True
    with contextlib.suppress(FileNotFoundError):
        os.unlink(lock_path)
    log_event("stale_lock_removed", logging.WARNING, log, lock=lock_path)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
