"""The spool file: one message as it arrives, streamed to disk during DATA.

Format (postier/delivery/base.py): LF line endings; first `Return-Path: <sender>` (and
`Delivered-To:` for a sub-address or catch-all, inbound/delivered_to.py), then our
`Received:` header, then the content exactly as received (dot-unstuffed, CRLF → LF). The
protocol layer hands us CRLF lines (a line over 64 KiB in pieces, never split inside a CRLF)
and refuses any message with a bare CR or LF, so the CRLF → LF conversion here is lossless
and can be undone exactly when relaying.

Memory: chunks are kept in memory only up to `FLUSH_AT` bytes, then appended to the file by the
thread pool. A 2 KiB message never touches the file before end of data, so it costs one open,
one write, one fsync — done in a single thread-pool job together with the delivery.

Header lines can be added at any time before the message is delivered (submission's
Message-ID and Date, a check's Authentication-Results). They all belong to the prologue, the
part we write before the content: `Return-Path`, trace fields added above our `Received`, our
`Received`, then fields added below it. While nothing was flushed the prologue is only in
memory and an addition costs nothing. Once it is on disk, `finish()` writes a new file — the
new prologue, then the old content copied by the kernel (`copy_from`: sendfile, no pass
through Python memory), fsync'd — and renames it over the old name. The durable copies are
made from the finished file (hard links or copies by the deliveries, each fsync'd with its
directory), so the rename changes nothing in the durability promise.
"""

from __future__ import annotations

import enum
import os
from pathlib import Path

from postier.delivery.fsutil import copy_from, write_all
from postier.inbound.header_scan import DropField, HeaderScanner

FLUSH_AT = 256 * 1024

# Linux (and FreeBSD): an anonymous file in memory; elsewhere complete() writes the spool file.
_memfd_create = getattr(os, "memfd_create", None)


class _State(enum.Enum):
    MEMORY = "memory"  # nothing on disk yet
    OPEN = "open"  # the file is open for appending
    FINISHED = "finished"  # complete and fsync'd
    GONE = "gone"  # discarded


class SpoolWriter:
    """Accumulates one message; blocking methods are meant for the thread pool."""

    def __init__(
        self,
        directory: Path,
        queue_id: str,
        header: bytes,
        *,
        scan_headers: bool = False,
        drop_field: DropField | None = None,
        delivered_to: str = "",
    ) -> None:
        """`header` is `Return-Path:` and our `Received:` (LF-terminated lines).

        `delivered_to` adds `Delivered-To:` below Return-Path, for the local mailbox. Like
        Return-Path it lies before `content_offset`: only the mailbox copy (the whole file)
        carries it, never the queue's relay copy, LMTP or remote SMTP.

        `scan_headers` records the message's field names (`header_names`); `drop_field`
        removes matching fields from its header section as it streams in. With neither,
        the content is stored as it comes at no extra cost.
        """
        self.directory = directory
        self.queue_id = queue_id
        self.path = directory / f"{queue_id}.spool"
        end = header.index(b"\n") + 1  # after the Return-Path line
        self._return_path = header[:end]
        if delivered_to:
            self._return_path += f"Delivered-To: {delivered_to}\n".encode()
        self.content_offset = len(self._return_path)  # after the local-delivery-only lines
        self._received = header[end:]
        self._above: list[bytes] = []  # trace fields added above our Received
        self._below: list[bytes] = []  # fields added below it
        self._prologue_on_disk = 0  # bytes of prologue in the file; 0 while in memory
        self._stale = False  # the prologue changed after it was written
        self._parts: list[bytes] = []
        self._pending = 0
        self.size = 0  # bytes in the file
        self._fd: int | None = None
        self._state = _State.MEMORY
        self.failed = False  # a flush failed; the end of data answers 451
        # None when there is nothing to scan, and again once the header section has passed.
        self._scanner = HeaderScanner(drop_field) if scan_headers or drop_field else None
        self._names: set[bytes] = self._scanner.names if self._scanner else set()
        self._late_drop: DropField | None = None  # applied to the stored header at rewrite
        self._scanned = self._scanner  # kept after the header section, for its counts
        self._copy_fd: int | None = None  # the checks' in-memory copy (complete())
        self._copy_size = 0
        # The whole file as `finish()` wrote it in one piece (a message kept in memory to
        # the end), for `content`; None once the file was written otherwise or rewritten.
        self._whole: bytes | None = None

    @property
    def header_names(self) -> frozenset[bytes]:
        """Lower-case names of the message's own header fields (with `scan_headers`)."""
        return frozenset(self._names)

    @property
    def received_count(self) -> int:
        """`Received:` fields in the message's own header (with `scan_headers`; ours is
        not among them): the hops it has made, for loop detection."""
        return self._scanned.received if self._scanned is not None else 0

    @property
    def on_disk(self) -> bool:
        """True when `discard()` has a file to remove (else it needs no thread pool)."""
        return self._state in (_State.OPEN, _State.FINISHED)

    def add_header_lines(self, lines: bytes, *, above_received: bool = False) -> None:
        """Add LF-terminated header lines before the message's own header section.

        `above_received` puts them right below Return-Path (trace-like fields such as
        Authentication-Results, RFC 8601 §4); otherwise they go below our Received (fields
        of the message itself, such as submission's Message-ID and Date). Allowed until
        the message is delivered; after a flush it makes `finish()` rewrite the file.
        """
        if not lines:
            return
        (self._above if above_received else self._below).append(lines)
        if self._prologue_on_disk:
            self._stale = True

    def remove_fields(self, drop: DropField) -> None:
        """Remove the message's own header fields that `drop` matches, after the fact.

        For a verdict that arrives once the message is stored (rspamd's milter
        remove_headers, a rewritten Subject): `finish()` then rewrites the file, passing only
        the header section through the scanner and copying the body in the kernel.
        """
        self._late_drop = drop
        self._stale = True  # even before the first flush: the filter runs on the file

    def _prologue(self) -> bytes:
        return b"".join((self._return_path, *self._above, self._received, *self._below))

    def add(self, crlf_lines: bytes) -> bool:
        """Add CRLF content; True when enough is buffered that `flush()` should run."""
        data = crlf_lines.replace(b"\r\n", b"\n")
        if self._scanner is not None:
            data = self._scanner.feed(data)
            if self._scanner.done:
                self._scanner = None
        self._parts.append(data)
        self._pending += len(data)
        return self._pending >= FLUSH_AT

    @property
    def content(self) -> bytes | None:
        """The stored bytes after `content_offset`, from memory, when `finish()` wrote the
        file whole: the queue's commit hands them to the first relay attempt, which then
        reads nothing back from disk. None when the file was written in pieces."""
        return None if self._whole is None else self._whole[self.content_offset :]

    def flush(self) -> bytes:
        """Append what is buffered to the file (thread pool); returns what was written."""
        if self._state is _State.MEMORY:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
            try:
                self._fd = os.open(self.path, flags, 0o600)
            except FileNotFoundError:  # the daemon made it at start; someone removed it
                self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                self._fd = os.open(self.path, flags, 0o600)
            self._state = _State.OPEN
            prologue = self._prologue()
            self._parts.insert(0, prologue)
            self._prologue_on_disk = len(prologue)
        if self._parts:
            assert self._fd is not None
            data = b"".join(self._parts)
            write_all(self._fd, data)
            self.size += len(data)
            self._parts.clear()
            self._pending = 0
            return data
        return b""

    def complete(self) -> None:
        """Make the whole message readable at `readable_path`, for the checks. Thread pool.

        A message still in memory (all but the largest) is copied into an anonymous
        in-memory file (memfd), not into the spool file: the checks usually add a header
        line above our Received (Authentication-Results), and a spool file already written
        would then have to be written again, fsync'd and renamed over (a second file and a
        freed inode per message). This way `finish()` writes the spool file once, with
        every line the checks added. A message already on disk is completed there, without
        fsync (durability is `finish()`'s job, once).
        """
        self._close_scanner()
        if self._state is _State.MEMORY and self._copy_fd is None and _memfd_create:
            data = b"".join((self._prologue(), *self._parts))
            fd = _memfd_create(f"postier-{self.queue_id}")
            try:
                write_all(fd, data)
            except BaseException:
                os.close(fd)
                raise
            self._copy_fd, self._copy_size = fd, len(data)
        elif self._copy_fd is None and self._state is not _State.FINISHED:
            self.flush()

    @property
    def readable_path(self) -> Path:
        """Where `complete()` left the message to read: its in-memory copy or the file."""
        if self._copy_fd is not None:
            return Path(f"/proc/self/fd/{self._copy_fd}")
        return self.path

    @property
    def readable_size(self) -> int:
        return self._copy_size if self._copy_fd is not None else self.size

    def _close_scanner(self) -> None:
        if self._scanner is not None:  # the message ended inside its header section
            tail = self._scanner.close()
            self._scanner = None
            self._parts.append(tail)
            self._pending += len(tail)

    def finish(self) -> None:
        """Make the file complete and durable (fsync'd) with every header line added so far.

        May be called again (a check read the file, then added a header line): it only does
        the work that is left. Thread pool.
        """
        self._close_scanner()
        self._close_copy()
        if self._state is _State.FINISHED and not self._stale:
            return
        if self._state is not _State.FINISHED:
            in_memory = self._state is _State.MEMORY
            written = self.flush()
            if in_memory:  # the prologue and every part, in that one write
                self._whole = written
        if self._stale:
            self._rewrite()
        else:
            assert self._fd is not None
            os.fsync(self._fd)
        self._close_fd()
        self._state = _State.FINISHED

    def _rewrite(self) -> None:
        """New prologue + the old content (kernel copy) into a new file, fsync, rename over."""
        self._close_fd()  # the old file needs no fsync: it is replaced
        self._whole = None  # the content may change (remove_fields)
        new_path = self.path.with_name(self.path.name + ".new")
        prologue = self._prologue()
        src = os.open(self.path, os.O_RDONLY)
        try:
            dst = os.open(new_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                write_all(dst, prologue)
                offset, copied = self._old_prologue_and_header(src, dst)
                copied += copy_from(src, dst, offset)
                os.fsync(dst)
            finally:
                os.close(dst)
            os.replace(new_path, self.path)
        except BaseException:
            new_path.unlink(missing_ok=True)
            raise
        finally:
            os.close(src)
        self.size = len(prologue) + copied
        self._prologue_on_disk = len(prologue)
        self._stale = False

    def _old_prologue_and_header(self, src: int, dst: int) -> tuple[int, int]:
        """Skip the old prologue; with `remove_fields`, filter the header section onto
        `dst`. Returns the offset where the plain copy resumes and the bytes written."""
        offset = self._prologue_on_disk
        if self._late_drop is None:
            return offset, 0
        scanner = HeaderScanner(self._late_drop)
        written = 0
        with os.fdopen(os.dup(src), "rb") as f:
            f.seek(offset)
            while not scanner.done:
                line = f.readline(64 * 1024)  # a longer line arrives in pieces, as it may
                out = scanner.feed(line) if line else scanner.close()
                write_all(dst, out)
                written += len(out)
                if not line:
                    break
            offset = f.tell()
        self._late_drop = None
        return offset, written

    def _close_copy(self) -> None:
        if self._copy_fd is not None:
            os.close(self._copy_fd)
            self._copy_fd = None

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        """Forget the message (rejected, failed, or delivered everywhere). Safe to repeat."""
        self._parts.clear()
        self._whole = None
        self._close_copy()
        self._close_fd()
        if self.on_disk:
            self.path.unlink(missing_ok=True)
        self._state = _State.GONE
