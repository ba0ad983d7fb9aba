"""Maildir delivery (https://cr.yp.to/proto/maildir.html, as Dovecot and mutt read it).

`<root>/<mailbox>/{tmp,new,cur}` is created on first delivery (0700). A file appears in new/
only complete and fsync'd: the spool file (already fsync'd) is hard-linked into new/ under a
unique name, then new/ is fsync'd. Several recipients share one file through hard links; where
links are impossible (another filesystem, e.g. a home Maildir) the content is copied into the
mailbox's own tmp/, fsync'd and renamed into new/, as the Maildir specification describes.

Unique names: `<seconds>.M<microseconds>P<pid>Q<counter>.<hostname>,S=<size>`; the counter is
shared by every thread of the process and taken under a lock, the pid separates workers.
Dovecot reads `,S=` as the file size and checks it, so it is the exact size of the file.

Delivery is all-or-nothing per message: if any mailbox fails, the copies already placed are
removed again and every recipient gets a temporary failure, so the client's retry does not
produce duplicates.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from postier import log
from postier.delivery.base import (
    Recipient,
    RecipientResult,
    StoredMessage,
    delivered,
    temporary,
)
from postier.delivery.fsutil import describe_error, ensure_dir, fsync_dir, write_all

_LOG = logging.getLogger("postier.delivery.maildir")

_counter = itertools.count(1)
_counter_lock = threading.Lock()


class GroupSync:
    """fsync a directory once for all the entries linked into it before that fsync began.

    Twenty sessions delivering to one popular mailbox would otherwise queue twenty fsyncs of
    the same new/ directory; an fsync that starts after an entry was linked makes that entry
    durable, so every thread whose link precedes a running or finished fsync can rely on it.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        # directory -> [entries announced, entries covered by a finished fsync, fsync running]
        self._state: dict[str, list[int]] = {}

    def sync(self, directory: str) -> None:
        """Call after linking an entry into `directory`; returns once it is durable."""
        with self._cond:
            st = self._state.setdefault(directory, [0, 0, 0])
            st[0] += 1
            mine = st[0]
            while st[1] < mine:
                if st[2]:
                    self._cond.wait()
                    continue
                st[2] = 1
                covers = st[0]
                self._cond.release()
                try:
                    fsync_dir(directory)
                    ok = True
                except OSError:
                    ok = False
                    raise
                finally:
                    self._cond.acquire()
                    st[2] = 0
                    if ok:
                        st[1] = max(st[1], covers)
                    if st[1] >= st[0] and self._state.get(directory) is st:
                        del self._state[directory]
                    self._cond.notify_all()


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
    def __init__(self, root: Path, hostname: str, template: str = "") -> None:
        self.root = root
        self.hostname = hostname
        self.template = template
        self._known: set[Path] = set()  # maildirs verified to exist (saves syscalls)
        self._known_lock = threading.Lock()
        self._paths: dict[str, Path] = {}  # mailbox name -> path (names come from the users map)

    def maildir_for(self, recipient: Recipient) -> Path:
        if self.template:
            from postier.delivery.paths import mailbox_path

            return mailbox_path(self.root, recipient.mailbox, self.template, recipient.user)
        cached = self._paths.get(recipient.mailbox)
        if cached is None:
            cached = self._paths[recipient.mailbox] = self.root / recipient.mailbox
        return cached

    def _ensure(self, maildir: Path) -> None:
        """Create the Maildir if needed. Known ones are not checked again: if one vanishes,
        the link into it fails with ENOENT and `_place` creates it anew."""
        if maildir in self._known:
            return
        for sub in ("tmp", "new", "cur"):
            ensure_dir(maildir / sub, 0o700)
        with self._known_lock:
            self._known.add(maildir)

    def _place(self, message: StoredMessage, maildir: Path) -> Path:
        """Put one copy into maildir/new; return its path. Raises OSError."""
        self._ensure(maildir)
        new_dir = os.path.join(maildir, "new")
        source = os.fspath(message.path)
        for attempt in range(5):
            name = unique_name(self.hostname, message.size)
            target = os.path.join(new_dir, name)
            try:
                os.link(source, target)
            except FileExistsError:
                continue  # practically impossible; take the next counter value
            except FileNotFoundError:
                if attempt or not os.path.exists(source):
                    raise
                with self._known_lock:
                    self._known.discard(maildir)  # removed behind our back: recreate it
                self._ensure(maildir)
                continue
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                    raise
                self._copy_in(message, maildir, name, Path(target))
            _group_sync.sync(new_dir)
            return Path(target)
        raise OSError(errno.EEXIST, "could not find a unique file name", str(maildir))

    def _copy_in(self, message: StoredMessage, maildir: Path, name: str, target: Path) -> None:
        tmp = maildir / "tmp" / name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
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

    def deliver(
        self, message: StoredMessage, recipients: Sequence[Recipient]
    ) -> list[RecipientResult]:
        placed: dict[Path, Path] = {}
        maildirs: list[Path] = []
        try:
            for r in recipients:
                maildir = self.maildir_for(r)
                maildirs.append(maildir)
                if maildir not in placed:
                    placed[maildir] = self._place(message, maildir)
        except (OSError, ValueError) as exc:
            for path in placed.values():
                try:
                    os.unlink(path)
                except OSError:
                    pass
            problem = describe_error(exc) if isinstance(exc, OSError) else str(exc)
            _LOG.error(
                "event=delivery-failed %s",
                log.fields(qid=message.queue_id, format="maildir", error=problem),
            )
            return [temporary(r, f"Maildir delivery failed: {problem}") for r in recipients]
        return [
            delivered(r, f"Delivered to maildir as {placed[maildir].name}")
            for r, maildir in zip(recipients, maildirs, strict=True)
        ]
