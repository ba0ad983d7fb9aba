"""Maildir delivery (https://cr.yp.to/proto/maildir.html, as Dovecot and mutt read it).

`<root>/<mailbox>/{tmp,new,cur}` (or the `--mailbox-template` path) is created on first
delivery (0700). Mailboxes are resolved like every file backend's, through
`grouped.deliver_per_mailbox` (validated names, templates, one copy per mailbox, the owner).

A file appears in new/ only complete and fsync'd: the spool file (already fsync'd) is
hard-linked into new/ under a unique name, then new/ is fsync'd (group-committed: one fsync
covers every link made before it began). Several recipients share one file through hard
links. Where links are impossible (another filesystem) or wrong (a Maildir that belongs to a
user: a link would share the spool file's inode and owner), the content is copied into the
mailbox's own tmp/, given to its owner, fsync'd and renamed into new/, as the Maildir
specification describes; tmp/, new/ and cur/ then belong to that user too.

Unique names: `<seconds>.M<microseconds>P<pid>Q<counter>.<hostname>,S=<size>`; the counter is
shared by every thread of the process and taken under a lock, the pid separates workers.
Dovecot reads `,S=` as the file size and checks it, so it is the exact size of the file.

Delivery is all-or-nothing per message (`deliver_per_mailbox(all_or_nothing=True)`): if any
mailbox fails, the copies already placed are removed again and every recipient gets a
temporary failure, so the client's retry does not produce duplicates.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from postier.delivery.base import Recipient, RecipientResult, StoredMessage
from postier.delivery.dirsync import DirSync
from postier.delivery.fsutil import ensure_dir, write_all
from postier.delivery.grouped import Owner, deliver_per_mailbox

_LOG = logging.getLogger("postier.delivery.maildir")

_counter = itertools.count(1)
_counter_lock = threading.Lock()


class GroupSync:
    """One group-committed fsync (`DirSync`) per Maildir new/ directory.

    Twenty sessions delivering to one popular mailbox would otherwise queue twenty fsyncs of
    the same new/ directory; an fsync that starts after an entry was linked makes that entry
    durable, so every thread whose link precedes a running fsync waits for the next one, made
    once for all of them (the queue's body/ and env/ use the same `DirSync`).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._syncs: dict[str, DirSync] = {}

    def sync(self, directory: str) -> None:
        """Call after linking an entry into `directory`; returns once it is durable."""
        with self._lock:
            syncer = self._syncs.get(directory)
            if syncer is None:
                syncer = self._syncs[directory] = DirSync(Path(directory))
        syncer.sync()


_group_sync = GroupSync()


def _safe_hostname(hostname: str) -> str:
    # The Maildir spec: "/" and ":" cannot appear in a name; encode them as octal escapes.
    return hostname.replace("/", "\\057").replace(":", "\\072") or "localhost"


def unique_name(hostname: str, size: int) -> str:
    now = time.time()
    sec = int(now)
    usec = int((now - sec) * 1_000_000)
    with _counter_lock:
        n = next(_counter)
    return f"{sec}.M{usec}P{os.getpid()}Q{n}.{_safe_hostname(hostname)},S={size}"


class MaildirBackend:
    """Deliver into Maildirs; blocking, meant for the delivery thread pool."""

    def __init__(self, root: Path, hostname: str, template: str | None = None) -> None:
        self.root = Path(root)
        self.hostname = hostname
        self.template = template or None
        self._known: set[Path] = set()  # maildirs verified to exist (saves syscalls)
        self._known_lock = threading.Lock()

    def deliver(
        self, message: StoredMessage, recipients: Sequence[Recipient]
    ) -> list[RecipientResult]:
        """One file per distinct Maildir, all or nothing; one result per recipient, in order."""
        return deliver_per_mailbox(
            message, recipients, root=self.root, template=self.template,
            backend="maildir", logger=_LOG, store_one=self._place,
            all_or_nothing=True, undo=_remove_placed,
        )  # fmt: skip

    def _ensure(self, maildir: Path, owner: Owner) -> None:
        """Create the Maildir if needed. Known ones are not checked again: if one vanishes,
        the link into it fails with ENOENT and `_place` creates it anew."""
        if maildir in self._known:
            return
        for sub in ("tmp", "new", "cur"):
            ensure_dir(maildir / sub, 0o700, owner)
        with self._known_lock:
            self._known.add(maildir)

    def _place(self, message: StoredMessage, maildir: Path, owner: Owner) -> Path:
        """Put one copy into maildir/new; return its path. Raises OSError."""
        if message.spam:
            maildir = junk_folder(maildir)
        self._ensure(maildir, owner)
        new_dir = os.path.join(maildir, "new")
        source = os.fspath(message.path)
        for attempt in range(5):
            name = unique_name(self.hostname, message.size)
            target = os.path.join(new_dir, name)
            try:
                if owner is not None:  # the user's own file, not the spool's inode
                    self._copy_in(message, maildir, name, Path(target), owner)
                else:
                    os.link(source, target)
            except FileExistsError:
                continue  # practically impossible; take the next counter value
            except FileNotFoundError:
                if attempt or not os.path.exists(source):
                    raise
                with self._known_lock:
                    self._known.discard(maildir)  # removed behind our back: recreate it
                self._ensure(maildir, owner)
                continue
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                    raise
                self._copy_in(message, maildir, name, Path(target), owner)
            _group_sync.sync(new_dir)
            return Path(target)
        raise OSError(errno.EEXIST, "could not find a unique file name", str(maildir))

    def _copy_in(
        self, message: StoredMessage, maildir: Path, name: str, target: Path, owner: Owner
    ) -> None:
        tmp = maildir / "tmp" / name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if owner is not None:
                os.fchown(fd, *owner)
            with open(message.path, "rb") as src:
                while block := src.read(65536):
                    write_all(fd, block)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        os.rename(tmp, target)


def junk_folder(maildir: Path) -> Path:
    """The Maildir++ `.Junk` folder when the user has one (IMAP servers create it), else the
    inbox: spam is filed, never lost, and a folder is never created behind the user's back."""
    junk = maildir / ".Junk"
    return junk if os.path.isdir(junk / "new") else maildir


def _remove_placed(maildir: Path, placed: Path) -> None:
    """Undo one copy of an all-or-nothing delivery that failed elsewhere."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(placed)
