"""The durable outbound queue: one body file and one envelope file per message.

Layout under the queue directory (`-Q DIR`):

    DIR/body/<id>        the message in the spool-file format of `postier.delivery.base`
                         (a hard link to the session's spool file when it lives on the same
                         file system, else a copy); written once, never modified
    DIR/env/<id>.json    the envelope and per-recipient state; rewritten atomically
    DIR/tmp/             temporary files (removed at start-up)
    DIR/flush/           flush requests from `postier queue flush` (files `ALL` or `<id>`),
                         and the scheduler's wake-up socket `.wakeup` (postier.queue.wakeup)
    DIR/corrupt/         unreadable envelopes, kept for the operator, never delivered

Durability: the body is written and fsync'd (file and directory) first; then the envelope is
written to tmp/, fsync'd, renamed into env/ and env/ is fsync'd. Commits running at the same
time share their directory fsyncs (group commit, `postier.delivery.dirsync`): each still
returns only after an fsync begun after its own link and rename. **The envelope rename is the
commit point**: a body without an envelope is a half-written entry (a crash during commit)
and `recover()` removes it at start-up; it is never delivered. The session sends its 250 only
after `commit()` returns.

Deletion (`remove`, used both when every recipient is final and by `postier queue delete`
while the daemon runs) removes the envelope first, so the scheduler's next `load` misses the
entry, then the body. `update` and `remove` take an exclusive `flock` on the body file, and
`update` checks that the envelope still exists under that lock, so a scheduler finishing a
delivery can never resurrect an entry that was deleted meanwhile: it gets `EntryNotFound`.

Every method blocks (file I/O and fsync). The daemon calls them through its bounded thread
pool, `await loop.run_in_executor(pool, store.commit, ...)`; the CLI calls them directly.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

from postier.delivery.base import Recipient, StoredMessage
from postier.delivery.dirsync import DirSync
from postier.delivery.fsutil import copy_from, fsync_dir, read_small, write_all
from postier.errors import PostierError
from postier.protocol.dsn import MailDsn, RcptDsn
from postier.queue.entry import (  # noqa: F401 - the names users of the store import
    DELIVERED,
    FAILED,
    PENDING,
    QueueEntry,
    RecipientState,
)
from postier.queue.ids import is_queue_id, new_queue_id

log = logging.getLogger("postier.queue")

FLUSH_ALL = "ALL"


class EntryNotFound(PostierError):
    """No committed entry with this id (never existed, delivered, or deleted)."""


class EntryExists(PostierError):
    """An entry with this id is already committed (e.g. a maildrop file picked up twice)."""


class BadEntry(ValueError):
    """An envelope file that cannot be read as an entry (kept for the operator, never sent)."""

    def __init__(self, queue_id: str, why: str) -> None:
        super().__init__(f"{queue_id}: unreadable envelope: {why}")
        self.queue_id = queue_id


def _check_id(queue_id: str) -> str:
    if not is_queue_id(queue_id):
        raise EntryNotFound(f"not a queue id: {queue_id!r}")
    return queue_id


def _address(r: object) -> str:
    """A recipient given as text, a `Recipient`, or a protocol `Address` (its str())."""
    return r.address if isinstance(r, Recipient) else str(r)


def _recipient_state(address: str, dsn: Mapping[str, RcptDsn]) -> RecipientState:
    """A new pending recipient, with the NOTIFY/ORCPT its RCPT gave (if any)."""
    given = dsn.get(address)
    if given is None:
        return RecipientState(address)
    return RecipientState(address, notify=given.notify_text, orcpt=given.orcpt)


class QueueStore:
    """The queue directory; see the module docstring for layout and guarantees."""

    def __init__(self, directory: str | os.PathLike[str], *, create: bool = True) -> None:
        self.directory = Path(directory)
        self.body_dir = self.directory / "body"
        self.env_dir = self.directory / "env"
        self.tmp_dir = self.directory / "tmp"
        self.flush_dir = self.directory / "flush"
        self.corrupt_dir = self.directory / "corrupt"
        if create:
            # DIR itself stays traversable (0755) so `postier sendmail` run by any user can
            # reach DIR/maildrop; everything the queue holds is private to the daemon.
            self.directory.mkdir(mode=0o755, parents=True, exist_ok=True)
            for d in (self.body_dir, self.env_dir, self.tmp_dir, self.flush_dir, self.corrupt_dir):
                d.mkdir(mode=0o700, exist_ok=True)
        elif not self.env_dir.is_dir():
            raise FileNotFoundError(f"{self.directory}: not a queue directory (no env/)")
        # The same paths as text, for the per-message calls: a pathlib join and its str()
        # cost more than the system call they are for.
        self._body_prefix = os.path.join(self.body_dir, "")
        self._env_prefix = os.path.join(self.env_dir, "")
        self._tmp_prefix = os.path.join(self.tmp_dir, "")
        # Concurrent commits share their directory fsyncs (postier.delivery.dirsync).
        self._body_sync = DirSync(self.body_dir)
        self._env_sync = DirSync(self.env_dir)

    # -- paths -------------------------------------------------------------------------
    def body_path(self, queue_id: str) -> Path:
        return self.body_dir / _check_id(queue_id)

    def env_path(self, queue_id: str) -> Path:
        return self.env_dir / f"{_check_id(queue_id)}.json"

    def body_file(self, queue_id: str) -> str:
        """`body_path` as text (cheaper, for the per-message paths)."""
        return self._body_prefix + _check_id(queue_id)

    def env_file(self, queue_id: str) -> str:
        """`env_path` as text."""
        return f"{self._env_prefix}{_check_id(queue_id)}.json"

    def message(self, entry: QueueEntry) -> StoredMessage:
        """The entry's body as the `StoredMessage` a delivery backend takes."""
        return StoredMessage(
            path=self.body_path(entry.queue_id),
            size=entry.size,
            content_offset=entry.content_offset,
            sender=entry.sender,
            queue_id=entry.queue_id,
            received_at=entry.arrival,
            smtputf8=entry.smtputf8,
            body_8bit=entry.body_8bit,
            envelope_dsn=MailDsn(entry.ret, entry.envid),
            recipient_dsn={
                r.address: RcptDsn.from_text(r.notify, r.orcpt)
                for r in entry.recipients
                if r.notify or r.orcpt
            },
            requiretls=entry.requiretls,
        )

    # -- commit ------------------------------------------------------------------------
    def commit(
        self,
        spool: StoredMessage,
        sender: str,
        recipients: Iterable[object],
        *,
        prepend: bytes = b"",
    ) -> QueueEntry:
        """`commit_envelope`, the entry alone."""
        return self.commit_envelope(spool, sender, recipients, prepend=prepend)[0]

    def commit_envelope(
        self,
        spool: StoredMessage,
        sender: str,
        recipients: Iterable[object],
        *,
        prepend: bytes = b"",
    ) -> tuple[QueueEntry, bytes]:
        """Make a finished spool file durable in the queue under `spool.queue_id`.

        `spool.path` must already be on stable storage (fsync'd by whoever wrote it: the
        session's spool writer, the maildrop pickup, `commit_bytes`); a hard link to it needs
        only the directory fsync, a copy is fsync'd here.
        The spool file is hard-linked (same file system) or copied whole, so the body keeps
        its `Return-Path:` line and `content_offset` stays valid; it must not be modified
        afterwards (unlinking it is fine). Returns once the entry is durable: only then may
        the session answer 250. Raises `EntryExists` if the id is already queued.

        `prepend` is header lines (LF-terminated, spool format) to put at the top of the
        message, after Return-Path: the one place where the queued bytes may differ from the
        spool's (a DKIM-Signature made at commit). The body is then a copy, fsync'd here.

        Returns the entry and its envelope as written (JSON), which the caller may pass on
        (the wake-up datagram) instead of encoding the entry again.
        """
        queue_id = spool.queue_id or new_queue_id()
        env = self.env_file(queue_id)
        body = self.body_path(queue_id)
        if os.path.exists(env):
            raise EntryExists(queue_id)
        try:
            try:
                self._place_body(spool, body, prepend)
            except FileExistsError:
                # What an earlier, failed commit of this same id left (ids are unique; a
                # maildrop retry reuses its id): never committed, so it is replaced.
                body.unlink(missing_ok=True)
                self._place_body(spool, body, prepend)
            self._body_sync.sync()
            entry = QueueEntry(
                queue_id=queue_id,
                sender=sender,
                arrival=spool.received_at,
                size=body.stat().st_size,
                content_offset=spool.content_offset,
                recipients=[
                    _recipient_state(a, spool.recipient_dsn)
                    for a in dict.fromkeys(map(_address, recipients))
                ],
                smtputf8=spool.smtputf8,
                body_8bit=spool.body_8bit,
                ret=spool.envelope_dsn.ret,
                envid=spool.envelope_dsn.envid,
                requiretls=spool.requiretls,
            )
            envelope = self._write_env(entry)
        except BaseException:
            if not os.path.exists(env):  # not committed: leave no half-written entry behind
                body.unlink(missing_ok=True)
            raise
        return entry, envelope

    def commit_bytes(
        self,
        data: bytes,
        sender: str,
        recipients: Iterable[object],
        *,
        arrival: float,
        content_offset: int,
        queue_id: str | None = None,
        smtputf8: bool = False,
        body_8bit: bool = False,
    ) -> QueueEntry:
        """Queue a message we generated ourselves (a bounce), given in spool format."""
        queue_id = queue_id or new_queue_id()
        tmp = self.tmp_dir / f"{queue_id}.body"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        spool = StoredMessage(
            path=tmp,
            size=len(data),
            content_offset=content_offset,
            sender=sender,
            queue_id=queue_id,
            received_at=arrival,
            smtputf8=smtputf8,
            body_8bit=body_8bit,
        )
        try:
            return self.commit(spool, sender, recipients)
        finally:
            tmp.unlink(missing_ok=True)

    def _place_body(self, spool: StoredMessage, body: Path, prepend: bytes) -> None:
        """The body file, not yet fsync'd in its directory; FileExistsError if one is there."""
        if prepend:
            self._copy_into(spool.path, body, prepend, spool.content_offset)
            return
        try:
            os.link(spool.path, body)  # the same inode: its creator fsync'd it (see commit)
        except FileExistsError:
            raise
        except OSError:  # another file system, or links not permitted: copy
            self._copy_into(spool.path, body)

    def _copy_into(self, source: Path, dest: Path, insert: bytes = b"", at: int = 0) -> None:
        """Copy `source` to `dest` (fsync'd), with `insert` put in at offset `at`."""
        tmp = self.tmp_dir / f"{dest.name}.copy"
        with open(source, "rb") as src, open(tmp, "wb") as dst:
            if insert:
                write_all(dst.fileno(), src.read(at) + insert)
                copy_from(src, dst.fileno(), at)
            else:
                copy_from(src, dst.fileno())
            os.fsync(dst.fileno())
        try:
            os.link(tmp, dest)  # never replaces an existing body
        finally:
            tmp.unlink()

    def _write_env(self, entry: QueueEntry) -> bytes:
        """Write the envelope (tmp/, fsync, rename, fsync env/); returns what was written."""
        data = entry.to_json()
        tmp = f"{self._tmp_prefix}{entry.queue_id}.json"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.env_file(entry.queue_id))
        self._env_sync.sync()
        return data

    # -- read --------------------------------------------------------------------------
    def load(self, queue_id: str) -> QueueEntry:
        try:
            raw = read_small(self.env_file(queue_id))
        except FileNotFoundError:
            raise EntryNotFound(queue_id) from None
        try:
            return QueueEntry.from_json(raw)
        except ValueError as exc:
            raise BadEntry(queue_id, str(exc)) from None

    def ids(self) -> list[str]:
        """Committed ids in arrival order (ids sort by time)."""
        out = []
        for name in os.listdir(self.env_dir):
            stem, dot, ext = name.partition(".")
            if dot and ext == "json" and is_queue_id(stem):
                out.append(stem)
        return sorted(out)

    def list(self, on_bad: Callable[[BadEntry], None] | None = None) -> list[QueueEntry]:
        """Every committed entry; entries removed while listing are skipped. Read-only.

        An unreadable envelope is passed to `on_bad` (e.g. `postier queue list` prints it),
        else logged; either way the listing goes on.
        """
        entries = []
        for queue_id in self.ids():
            try:
                entries.append(self.load(queue_id))
            except EntryNotFound:
                continue
            except BadEntry as exc:
                if on_bad is None:
                    log.warning("queue %s", exc)
                else:
                    on_bad(exc)
        return entries

    def read_headers(self, entry: QueueEntry, limit: int = 256 * 1024) -> bytes:
        """The message's header section (after Return-Path, up to the blank line)."""
        with open(self.body_path(entry.queue_id), "rb") as f:
            f.seek(entry.content_offset)
            head = f.read(limit)
        end = head.find(b"\n\n")
        return head if end < 0 else head[: end + 1]

    # -- change ------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self, queue_id: str) -> Iterator[None]:
        """Hold the entry's lock (an exclusive `flock` on its body file) for a read-decide-
        write: `update(..., held=True)` and `remove(..., held=True)` inside. `EntryNotFound`
        when the entry is gone. Not re-entrant: a second `locked`, or `update`/`remove`
        without `held`, for the same entry inside would wait for itself."""
        try:
            fd = os.open(self.body_file(queue_id), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise EntryNotFound(queue_id) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def update(self, entry: QueueEntry, *, held: bool = False) -> None:
        """Atomically replace the envelope; `EntryNotFound` if it was removed meanwhile.
        `held`: the caller holds the entry's lock (`locked`)."""
        with contextlib.nullcontext() if held else self.locked(entry.queue_id):
            if not os.path.exists(self.env_file(entry.queue_id)):
                raise EntryNotFound(entry.queue_id)
            self._write_env(entry)

    def add_recipients(
        self,
        queue_id: str,
        recipients: Iterable[object],
        dsn: Mapping[str, RcptDsn] | None = None,
    ) -> QueueEntry:
        """Add recipients to a committed entry (those it has already are left as they are).

        For a message whose remote recipients were committed before its local delivery:
        the local recipients that did not get their copy join the same entry (one body, one
        id) rather than a second commit under the same id. Durable on return."""
        with self.locked(queue_id):
            entry = self.load(queue_id)
            known = {r.address for r in entry.recipients}
            new = [a for a in dict.fromkeys(map(_address, recipients)) if a not in known]
            if new:
                entry.recipients += [_recipient_state(a, dsn or {}) for a in new]
                self._write_env(entry)
            return entry

    def remove(self, queue_id: str, *, sync: bool = True, held: bool = False) -> bool:
        """Remove an entry (safe while the daemon runs); False if it was not there.

        `sync=False` leaves the envelope's deletion to the file system's next commit: the
        scheduler's removal of a finished entry, where a crash bringing the entry back only
        means a second delivery (at least once), never a lost message. `held`: the caller
        holds the entry's lock (`locked`)."""
        try:
            with contextlib.nullcontext() if held else self.locked(queue_id):
                try:
                    os.unlink(self.env_file(queue_id))
                except FileNotFoundError:
                    return False
                if sync:
                    self._env_sync.sync()  # the deletion's commit point
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.body_file(queue_id))
                return True
        except EntryNotFound:
            # No body: a stray envelope (should not happen) still gets removed.
            try:
                self.env_path(queue_id).unlink()
            except FileNotFoundError:
                return False
            return True

    # -- start-up ----------------------------------------------------------------------
    def lock_for_daemon(self) -> int:
        """Take DIR/lock (flock): one scheduler per queue, or mail goes out twice.

        Returns the descriptor to keep open while the daemon runs; `BlockingIOError` if
        another process holds it.
        """
        fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise
        return fd

    def recover(self) -> builtins.list[QueueEntry]:
        """Clean up after a crash and return every committed entry, oldest first.

        Only at daemon start-up, before any session can commit: a commit in progress looks
        exactly like a half-written entry and would be removed.
        """
        for name in os.listdir(self.tmp_dir):
            log.warning("queue: removing temporary file left by a crash: tmp/%s", name)
            (self.tmp_dir / name).unlink(missing_ok=True)
        entries: dict[str, QueueEntry] = {}
        for queue_id in self.ids():
            env = self.env_path(queue_id)
            try:
                entry = QueueEntry.from_json(env.read_bytes())
                if entry.queue_id != queue_id:
                    raise ValueError(f"envelope names {entry.queue_id}")
            except (ValueError, TypeError, KeyError) as exc:
                log.error("queue %s: unreadable envelope moved to corrupt/: %s", queue_id, exc)
                os.replace(env, self.corrupt_dir / env.name)
                continue
            if not self.body_path(queue_id).exists():
                log.error("queue %s: envelope without body, removed", queue_id)
                env.unlink()
                continue
            entries[queue_id] = entry
        for name in os.listdir(self.body_dir):
            if name not in entries:
                log.warning("queue %s: half-written entry (no envelope) removed", name)
                (self.body_dir / name).unlink(missing_ok=True)
        fsync_dir(self.body_dir)
        fsync_dir(self.env_dir)
        return [entries[k] for k in sorted(entries)]

    # -- flush requests (from `postier queue flush`, another process) ------------------
    def request_flush(self, queue_id: str | None = None) -> None:
        """Ask the running daemon to retry now: one entry, or everything."""
        name = FLUSH_ALL if queue_id is None else _check_id(queue_id)
        fd = os.open(self.flush_dir / name, os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)

    def take_flush_requests(self) -> tuple[bool, set[str]]:
        """Consume pending requests: (flush everything?, ids). One listdir; cheap to poll."""
        names = os.listdir(self.flush_dir)
        everything = False
        ids: set[str] = set()
        for name in names:
            if name.startswith("."):  # the scheduler's wake-up socket (postier.queue.wakeup)
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.flush_dir / name)
            if name == FLUSH_ALL:
                everything = True
            elif is_queue_id(name):
                ids.add(name)
        return everything, ids
