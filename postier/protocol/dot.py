"""Incremental end-of-data detection and dot-unstuffing (RFC 5321 §4.1.1.4, §4.5.2).

Security rules, the reason this module exists:
- **Only CRLF.CRLF ends the data.** `\\n.\\n`, `\\r.\\r`, `\\n.\\r\\n`, `\\r\\n.\\n` and every other
  mix do not (the SMTP smuggling class of 2023). A bare CR or LF anywhere in the content marks
  the message as bad; we keep reading to the real CRLF.CRLF and then refuse the whole message
  (550 5.5.2), so nothing after the bare line ending can be taken as commands or as a second
  message.
- **Size is enforced while reading, never by stopping early.** Past the limit we discard content
  but keep scanning for the terminator, so the peer's next commands stay in sync and there is
  no way to make us treat message bytes as commands.

Speed: the content is processed a block of whole lines at a time with `bytes.find`, `count` and
`replace`, which run in C; the buffer never rescans what it already passed.

Input: the reader consumes from a receive buffer (a bytearray) it may share with the command
line reader (`buffer.LineBuffer`): the connection appends what arrives and calls `read()`;
bytes behind the terminator stay in the buffer for the next commands (h11's shape: one
buffer, one reader per phase). Standalone, `feed()` appends and reads in one call.

Output: `read()` and `feed()` return the unstuffed content of complete lines (CRLF endings
kept), so a consumer can convert line endings without worrying about a CRLF split between two
chunks. The
one exception is a line longer than 64 KiB, which is passed on in pieces so that memory stays
bounded; a piece never ends with CR and never contains a bare CR or LF.
"""

from __future__ import annotations

from typing import Final

_END: Final = b"\r\n.\r\n"
# A line longer than this is passed on in pieces instead of being held whole (a peer may send
# one 35 MB "line"); a piece never ends with a CR, so the CRLF -> LF conversion of the
# consumer stays exact.
_MAX_TAIL: Final = 65536


class DataReader:
    __slots__ = (
        "_buf",
        "_done",
        "_line_start",
        "_scanned",
        "bad_line_endings",
        "max_size",
        "overflow",
        "size",
    )

    def __init__(self, max_size: int, buffer: bytearray | None = None) -> None:
        self.max_size = max_size
        # The receive buffer; while reading, what is left in it is a partial line (no CRLF).
        self._buf = bytearray() if buffer is None else buffer
        self._line_start = True  # _buf starts at the beginning of a line
        self._scanned = 0  # bytes of _buf already searched (never search them again)
        self.size = 0  # unstuffed content bytes seen (counted even past the limit)
        self.overflow = False
        self.bad_line_endings = False
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    @property
    def rest(self) -> bytes:
        """After the end: the bytes behind CRLF.CRLF still in the buffer (pipelined commands)."""
        return bytes(self._buf) if self._done else b""

    def feed(self, data: bytes) -> bytes:
        """Append `data` to the buffer and `read()`."""
        self._buf += data
        return self.read()

    def read(self) -> bytes:
        """Consume from the buffer; return unstuffed content of the complete lines (may be b"").

        A line longer than _MAX_TAIL comes out in pieces (none ends with CR). After the end
        nothing more is consumed.
        """
        if self._done:
            return b""
        buf = self._buf
        # The bytes scanned before hold no CRLF; only their last byte (a CR) may pair with
        # the new ones.
        start = self._scanned - 1 if self._scanned else 0
        # The terminator at the very start of the buffer ("." line right after a CRLF).
        if self._line_start and buf[:3] == b".\r\n":
            self._finish(3)
            return b""
        end = buf.find(_END, start)
        if end >= 0:
            block = bytes(buf[: end + 2])
            self._finish(end + 5)
            return self._accept_block(block)
        last = buf.rfind(b"\r\n", start)
        if last < 0:
            self._scanned = len(buf)
            return self._guard_tail()
        block = bytes(buf[: last + 2])
        del buf[: last + 2]
        out = self._accept_block(block)
        self._line_start = True
        self._scanned = len(buf)
        piece = self._guard_tail()
        return out + piece if piece else out

    def _finish(self, consumed: int) -> None:
        del self._buf[:consumed]  # the rest belongs to whoever reads the buffer next
        self._done = True

    def _accept_block(self, block: bytes) -> bytes:
        """Validate line endings of a block of whole CRLF lines, unstuff it, count its size."""
        crlf = block.count(b"\r\n")
        if block.count(b"\n") != crlf or block.count(b"\r") != crlf:
            self.bad_line_endings = True
        # Dot-unstuffing: a leading "." is removed from every line that starts with one.
        # The block starts at a line start (unless a long line was cut), so handle its first
        # byte separately.
        if self._line_start and block[:1] == b".":
            block = block[1:]
        if b"\r\n." in block:
            block = block.replace(b"\r\n.", b"\r\n")
        return self._count(block)

    def _count(self, content: bytes) -> bytes:
        self.size += len(content)
        if self.overflow or self.bad_line_endings:
            return b""
        if self.size > self.max_size:
            self.overflow = True
            return b""
        return content

    def _guard_tail(self) -> bytes:
        """A partial line with no CRLF yet: past _MAX_TAIL bytes, pass all but its last byte on.

        The tail cannot contain the terminator (it has no CRLF), so only its last byte (a
        possible CR) matters for detection; any other CR or LF in it is bare.
        """
        buf = self._buf
        if len(buf) <= _MAX_TAIL:
            return b""
        cut = len(buf) - 1
        piece = bytes(buf[:cut])
        del buf[:cut]
        self._scanned = len(buf)
        if b"\n" in piece or b"\r" in piece:
            self.bad_line_endings = True
        if self._line_start and piece[:1] == b".":
            piece = piece[1:]
        self._line_start = False  # the kept byte is in the middle of a line
        return self._count(piece)
