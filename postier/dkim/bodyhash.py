"""The DKIM body hash (`bh=`) of relaxed canonicalization, computed while streaming.

dkimpy canonicalizes a body that it holds whole: it splits the message into lines, joins
them, and rewrites the result three more times, so a 35 MB message costs about 150 MB at
once. Relaxed body canonicalization (RFC 6376 §3.4.4) is line-local except for one rule
(empty lines at the end are ignored), so we feed dkimpy's own canonicalization functions one
block of whole lines at a time and hold back trailing empty lines until more content shows
they were not the end. Memory stays at one block; the result is byte for byte dkimpy's, as
tests/test_dkim_bodyhash.py checks against `Relaxed.canonicalize_body` on generated bodies.
"""

from __future__ import annotations

import base64
import hashlib
from typing import BinaryIO

from dkim.canonicalization import compress_whitespace, strip_trailing_whitespace

BLOCK = 64 * 1024
_CRLF = b"\r\n"


def _to_crlf(block: bytes) -> bytes:
    """Line ends as dkimpy's parser makes them: every LF, with or without its CR, is CRLF."""
    return block.replace(b"\r\n", b"\n").replace(b"\n", _CRLF)


def _content_end(canon: bytes) -> int:
    """Where the trailing empty lines of a block of whole canonical lines begin."""
    end = len(canon)
    while end >= 2 and canon.endswith(_CRLF, 0, end) and (end == 2 or canon[end - 3] == 10):
        end -= 2
    return end


class RelaxedBodyHash:
    """Feed the body in blocks of any size (LF or CRLF line ends); then `digest()`."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._partial = b""  # the start of a line whose end has not arrived yet
        self._held_empty = 0  # empty lines seen since the last content: maybe the end

    def update(self, data: bytes) -> None:
        data = self._partial + data if self._partial else data
        cut = data.rfind(b"\n") + 1
        self._partial = data[cut:]
        if cut:
            self._lines(_to_crlf(data[:cut]))

    def _lines(self, block: bytes) -> None:
        canon = compress_whitespace(strip_trailing_whitespace(block))
        end = _content_end(canon)
        if end:
            if self._held_empty:
                self._hash.update(_CRLF * self._held_empty)
            self._hash.update(canon[:end] if end < len(canon) else canon)
            self._held_empty = 0
        self._held_empty += (len(canon) - end) // 2

    def digest(self) -> bytes:
        """The SHA-256 of the canonical body. A last line without its LF ends as dkimpy ends it:
        canonicalized as it stands, then given a CRLF."""
        if self._partial:
            tail = compress_whitespace(strip_trailing_whitespace(_to_crlf(self._partial)))
            self._partial = b""
            if self._held_empty:
                self._hash.update(_CRLF * self._held_empty)
                self._held_empty = 0
            self._hash.update(tail + _CRLF)
        return self._hash.digest()

    def b64(self) -> bytes:
        """The `bh=` value."""
        return base64.b64encode(self.digest())


def hash_stream(source: BinaryIO, block: int = BLOCK) -> bytes:
    """The `bh=` value of everything left to read in `source`, one block in memory at a time."""
    hasher = RelaxedBodyHash()
    while chunk := source.read(block):
        hasher.update(chunk)
    return hasher.b64()
