"""Receive buffer for command lines: CRLF-terminated, with a hard length limit.

Why a class of our own: a peer controls how bytes are split across reads, so the buffer must
(1) never rescan bytes it already searched (a slow trickle of a long line must stay linear),
(2) never grow without bound (a million bytes without CRLF must not cost a million bytes of
memory), and (3) report an over-long line once, then resynchronise on the next CRLF so the
session can go on (RFC 5321 §4.5.3.1.4 gives 512 octets for a command line).

The bytes live in one receive buffer (a bytearray) that the DATA reader (`dot.DataReader`)
may share: the connection appends what arrives, and the reader of the current phase consumes
from the front. Nothing is copied from one reader to the other when DATA starts or ends.

Only CRLF ends a command line. A bare LF is kept inside the line, so the command parser sees it
and rejects the command; it never splits one line into two commands.
"""

from __future__ import annotations

from typing import Final


class LineTooLong:
    """Marker returned by `next_line()` for a line that exceeded the limit (already discarded)."""

    __slots__ = ("length",)

    def __init__(self, length: int) -> None:
        self.length = length

    def __repr__(self) -> str:
        return f"LineTooLong({self.length})"


class LineBuffer:
    __slots__ = ("_buf", "_discarded", "_overflow", "_scan_from", "max_line")

    def __init__(self, max_line: int, buffer: bytearray | None = None) -> None:
        # max_line counts the line without its CRLF.
        self.max_line: int = max_line
        self._buf = bytearray() if buffer is None else buffer  # the receive buffer
        self._scan_from = 0  # bytes before this index hold no CRLF (never rescan them)
        self._overflow = False  # inside a too-long line: discard until CRLF
        self._discarded = 0

    def feed(self, data: bytes) -> None:
        self._buf += data

    def __len__(self) -> int:
        return len(self._buf)

    def take_all(self) -> bytes:
        """Everything buffered, leaving the buffer empty (used when DATA content starts)."""
        data = bytes(self._buf)
        self._buf.clear()
        self._scan_from = 0
        return data

    def clear(self) -> int:
        """Drop everything buffered (STARTTLS: plaintext sent before the handshake must die)."""
        n = len(self._buf)
        self._buf.clear()
        self._scan_from = 0
        self._overflow = False
        self._discarded = 0
        return n

    def next_line(self) -> bytes | LineTooLong | None:
        """The next complete line without its CRLF, a LineTooLong marker, or None (need more)."""
        buf = self._buf
        # Start one byte back: a CR at the end of the previous scan may pair with a new LF.
        start = self._scan_from - 1 if self._scan_from else 0
        idx = buf.find(b"\r\n", start)
        if idx < 0:
            if self._overflow or len(buf) > self.max_line + 1:
                # Keep only a possible trailing CR; count the rest as discarded.
                keep = 1 if buf.endswith(b"\r") else 0
                self._discarded += len(buf) - keep
                del buf[: len(buf) - keep]
                self._overflow = True
            self._scan_from = len(buf)
            return None
        if self._overflow:
            total = self._discarded + idx
            del buf[: idx + 2]
            self._overflow = False
            self._discarded = 0
            self._scan_from = 0
            return LineTooLong(total)
        line = bytes(buf[:idx])
        del buf[: idx + 2]
        self._scan_from = 0
        if idx > self.max_line:
            return LineTooLong(idx)
        return line


CRLF: Final = b"\r\n"
