"""The spool file: one message as it arrives, streamed to disk during DATA.

Format (postier/delivery/base.py): LF line endings; first `Return-Path: <sender>`, then our
`Received:` header, then the content exactly as received (dot-unstuffed, CRLF → LF). The
protocol layer hands us CRLF lines (a line over 64 KiB in pieces, never split inside a CRLF)
and refuses any message with a bare CR or LF, so the CRLF → LF conversion here is lossless
and can be undone exactly when relaying.

Memory: chunks are kept in memory only up to `FLUSH_AT` bytes, then appended to the file by the
thread pool. A 2 KiB message never touches the file before end of data, so it costs one open,
one write, one fsync — done in a single thread-pool job together with the delivery.
"""

from __future__ import annotations

import os
from pathlib import Path

from postier.delivery.fsutil import write_all

FLUSH_AT = 256 * 1024


class SpoolWriter:
    """Accumulates one message; blocking methods are meant for the thread pool."""

    def __init__(self, directory: Path, queue_id: str, header: bytes) -> None:
        self.directory = directory
        self.queue_id = queue_id
        self.path = directory / f"{queue_id}.spool"
        self._parts: list[bytes] = [header]
        self._pending = len(header)
        self.content_offset = header.index(b"\n") + 1  # after the Return-Path line
        self.size = 0
        self._fd: int | None = None
        self.failed = False  # a flush failed; the end of data answers 451
        self._watch: set[bytes] = set()
        self.headers_seen = set()
        self._in_headers = False

    def watch_headers(self, names: tuple[bytes, ...]) -> None:
        """Note which of these header names (lower-case) the message's header section has.

        Used for submission (RFC 6409 §8): a message without Message-ID or Date gains one.
        """
        self._watch = set(names)
        self.headers_seen: set[bytes] = set()
        self._in_headers = True

    def _scan_headers(self, data: bytes) -> None:
        for line in data.split(b"\n"):
            if not line:
                self._in_headers = False  # the empty line that ends the header section
                return
            if line[:1] in (b" ", b"\t"):
                continue
            name = line.split(b":", 1)[0].strip().lower()
            if name in self._watch:
                self.headers_seen.add(name)

    def add_headers(self, lines: bytes) -> bool:
        """Insert extra header lines after our trace headers, if nothing was written yet."""
        if self._fd is not None:
            return False
        self._parts.insert(1, lines)
        self._pending += len(lines)
        return True

    def add(self, crlf_lines: bytes) -> bool:
        """Add CRLF content; True when enough is buffered that `flush()` should run."""
        data = crlf_lines.replace(b"\r\n", b"\n")
        if self._in_headers:
            self._scan_headers(data)
        self._parts.append(data)
        self._pending += len(data)
        return self._pending >= FLUSH_AT

    def flush(self) -> None:
        """Append what is buffered to the file (thread pool)."""
        if self._fd is None:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        if self._parts:
            data = b"".join(self._parts)
            write_all(self._fd, data)
            self.size += len(data)
            self._parts.clear()
            self._pending = 0

    def finish(self) -> None:
        """Write the rest and fsync: after this the bytes are on stable storage (thread pool)."""
        self.flush()
        assert self._fd is not None
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None

    def discard(self) -> None:
        """Forget the message (rejected, failed, or delivered everywhere). Safe to repeat."""
        self._parts.clear()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
