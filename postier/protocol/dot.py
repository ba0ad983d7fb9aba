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

Output: `feed()` returns the unstuffed content of complete lines (CRLF endings kept), so a
consumer can convert line endings without worrying about a CRLF split between two chunks.
"""

from __future__ import annotations

from typing import Final

_END: Final = b"\r\n.\r\n"


class DataReader:
    __slots__ = (
        "_buf",
        "_done",
        "bad_line_endings",
        "max_size",
        "overflow",
        "rest",
        "size",
    )

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._buf = bytearray()  # always starts at the beginning of a line
        self.size = 0  # unstuffed content bytes seen (counted even past the limit)
        self.overflow = False
        self.bad_line_endings = False
        self._done = False
        self.rest = b""  # bytes after CRLF.CRLF: the next commands (pipelined)

    @property
    def done(self) -> bool:
        return self._done

    def feed(self, data: bytes) -> bytes:
        """Consume bytes; return unstuffed content of the complete lines found (may be b"")."""
        if self._done:
            self.rest += data
            return b""
        buf = self._buf
        buf += data
        # The terminator at the very start of the buffer ("." line right after a CRLF).
        if buf[:3] == b".\r\n":
            self._finish(3)
            return b""
        end = buf.find(_END)
        if end >= 0:
            block = bytes(buf[: end + 2])
            self._finish(end + 5)
            return self._accept_block(block)
        last = buf.rfind(b"\r\n")
        if last < 0:
            self._guard_tail()
            return b""
        block = bytes(buf[: last + 2])
        del buf[: last + 2]
        out = self._accept_block(block)
        self._guard_tail()
        return out

    def _finish(self, consumed: int) -> None:
        self.rest = bytes(self._buf[consumed:])
        self._buf = bytearray()
        self._done = True

    def _accept_block(self, block: bytes) -> bytes:
        """Validate line endings of a block of whole CRLF lines, unstuff it, count its size."""
        crlf = block.count(b"\r\n")
        if block.count(b"\n") != crlf or block.count(b"\r") != crlf:
            self.bad_line_endings = True
        # Dot-unstuffing: a leading "." is removed from every line that starts with one.
        # The block starts at a line start, so handle its first byte separately.
        if block[:1] == b".":
            block = block[1:]
        if b"\r\n." in block:
            block = block.replace(b"\r\n.", b"\r\n")
        self.size += len(block)
        if self.overflow or self.bad_line_endings:
            return b""
        if self.size > self.max_size:
            self.overflow = True
            return b""
        return block

    def _guard_tail(self) -> None:
        """A partial line with no CRLF yet: bound its memory once it exceeds the size limit.

        The tail cannot contain the terminator (it has no CRLF), so only its last byte (a
        possible CR) matters for detection; the rest is counted and dropped.
        """
        tail = len(self._buf)
        if tail > self.max_size or (self.overflow and tail > 65536):
            keep = 1
            dropped = tail - keep
            if b"\n" in self._buf[:dropped] or b"\r" in self._buf[: dropped]:
                self.bad_line_endings = True
            self.size += dropped
            self.overflow = True
            del self._buf[:dropped]
            # The kept byte no longer starts a line; make sure a leading "." is not mistaken
            # for a terminator line by prefixing a harmless byte.
            self._buf[0:0] = b"x"
