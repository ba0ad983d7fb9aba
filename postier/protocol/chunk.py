"""BDAT (RFC 3030 CHUNKING): the command's argument and the reader of its chunks.

Why BDAT is safer than DATA: the client says how many octets follow, so nothing inside the
content can end it early. There is no dot-stuffing, and a bare CR, LF or NUL is content
(RFC 3030 §2), never a line ending. The only sync rule is that exactly `size` octets
after the command line are chunk content, *whatever we answer*: a refused BDAT still has
its octets read and dropped, or they would be read as commands. So a BDAT whose size
cannot be parsed (missing, negative, not a number) ends the session: how much to skip is
unknowable, and guessing would let chunk bytes pass for commands.

`ChunkReader` reads one transaction's chunks from the shared receive buffer (the same
bytearray the command-line reader consumes, as `dot.DataReader` does). What it returns
keeps the octets exactly, with one guarantee for the consumer that converts CRLF to LF:
a piece never ends with a CR while more content may follow (the CR is held back and
returned with the next piece), so a CRLF split between two chunks or two reads is still
seen as one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from postier.protocol.replies import Reply

# RFC 3030 §2: bdat-cmd ::= "BDAT" SP chunk-size [ SP end-marker ] CR LF;
# chunk-size ::= 1*DIGIT. More than 20 digits is not a size anyone can send.
_SIZE: Final = re.compile(r"[0-9]{1,20}")
SYNTAX: Final = "Syntax: BDAT <octets> [LAST]"


@dataclass(frozen=True, slots=True)
class BdatCommand:
    """A BDAT line whose size is known: its chunk can always be read, or skipped."""

    size: int
    last: bool
    error: Reply | None = None  # the size parsed but the rest did not: skip, then answer


def parse_bdat(arg: str) -> BdatCommand | Reply:
    """The size and LAST flag, or the reply that ends the session (size unknowable)."""
    words = arg.split(" ")
    if not words or not _SIZE.fullmatch(words[0]):
        return Reply(501, "5.5.4", f"{SYNTAX}; chunk size unknown, closing")
    size = int(words[0])
    rest = words[1:]
    if not rest:
        return BdatCommand(size, last=False)
    if len(rest) == 1 and rest[0].upper() == "LAST":
        return BdatCommand(size, last=True)
    return BdatCommand(size, last=False, error=Reply(501, "5.5.4", SYNTAX))


def skip(buffer: bytearray, left: int) -> int:
    """Drop up to `left` octets from the front of `buffer`; return how many are still due."""
    take = min(left, len(buffer))
    del buffer[:take]
    return left - take


class ChunkReader:
    """All BDAT chunks of one transaction: size accounting across chunks, CR held back.

    `start()` begins a chunk; `read()` consumes what has arrived of it. Past `max_size`
    (counted over every chunk) the octets are still read, to keep the session in sync, but
    no longer returned: `overflow` is then set for good, and every later chunk of the
    transaction fails too (RFC 3030 §2: the transaction fails as a whole).
    """

    __slots__ = (
        "_buf",
        "_held_cr",
        "_last",
        "_left",
        "chunk_size",
        "max_size",
        "overflow",
        "size",
    )

    def __init__(self, max_size: int, buffer: bytearray) -> None:
        self.max_size = max_size
        self._buf = buffer
        self._left = 0
        self.chunk_size = 0  # octets announced by the current BDAT
        self._last = False
        self._held_cr = False
        self.size = 0  # octets of every chunk so far, counted even past the limit
        self.overflow = False

    def start(self, size: int, last: bool) -> None:
        self._left = size
        self.chunk_size = size
        self._last = last

    @property
    def chunk_complete(self) -> bool:
        return self._left == 0

    @property
    def last(self) -> bool:
        return self._last

    def read(self) -> bytes:
        """Consume the arrived part of the current chunk; the content to store (maybe b"")."""
        buf = self._buf
        take = min(self._left, len(buf))
        piece = bytes(buf[:take])
        del buf[:take]
        self._left -= take
        self.size += take
        if self.overflow or self.size > self.max_size:
            self.overflow = True
            self._held_cr = False
            return b""
        if self._held_cr:
            piece = b"\r" + piece
            self._held_cr = False
        end_of_content = self._left == 0 and self._last
        if piece.endswith(b"\r") and not end_of_content:
            self._held_cr = True
            piece = piece[:-1]
        return piece
