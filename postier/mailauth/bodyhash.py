"""DKIM body hashes computed while streaming over the spooled file (RFC 6376 §3.4, §3.7).

Why not dkimpy's own verify: it canonicalizes the whole body as one bytes object, so a 35 MB
message would cost 35 MB (several times over) of memory per verification. dkimpy still does all
of the header work and the signature check (dkim_verify.py); here we only compute the body hash,
in blocks. Simple and relaxed body canonicalization are a few lines each; a property test holds
them to dkimpy's whole-body functions for any body and block size. What block-wise hashing
must get right:

- "Ignore all empty lines at the end of the body": empty lines are counted, not hashed, until a
  non-empty line shows they were not at the end.
- relaxed: whitespace runs become one SP and trailing whitespace goes; a block therefore never
  ends inside a whitespace run (the reader cuts long lines after a non-whitespace byte).
- `l=`: only the first `l` octets of the canonical body are hashed.
- The spool stores LF line ends; CRLF is restored here (the protocol refused bare CR and LF,
  so the conversion is exact), and a file with CRLF line ends reads the same.

`hash_bodies` feeds every requested (canonicalization, hash, l=) combination in one pass.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

BLOCK = 64 * 1024  # read size, and the longest piece of one line held in memory
_WSP = b" \t"
_SPACES = re.compile(b"  +")  # starts with a two-byte literal: re skips to it at C speed


def compress_whitespace(data: bytes) -> bytes:
    """Relaxed: "reduce all sequences of WSP within a line to a single SP character".

    dkimpy's `[\t ]+` regex stops at every space, one match per word (about 60 ms per MB);
    tabs become spaces with bytes.replace, then only runs of two or more are rewritten.
    """
    return _SPACES.sub(b" ", data.replace(b"\t", b" "))


def relaxed_lines(block: bytes) -> bytes:
    """Relaxed body canonicalization of complete CRLF lines (RFC 6376 §3.4.4).

    Whitespace is compressed first, so what is left at a line end is one SP: removing
    " CRLF" then equals dkimpy's strip-then-compress (the property test checks it).
    """
    return compress_whitespace(block).replace(b" \r\n", b"\r\n")


@dataclass(frozen=True, slots=True)
class BodySpec:
    """What one signature needs hashed: body canonicalization, hash name, l= (None: all)."""

    canonicalization: str  # "simple" | "relaxed"
    algorithm: str  # "sha256" | "sha1"
    length: int | None = None


class BodyHasher:
    """Canonicalizes and hashes a body given as complete CRLF lines and pieces of long lines."""

    def __init__(self, spec: BodySpec) -> None:
        self.relaxed = spec.canonicalization == "relaxed"
        self._hash = hashlib.new(spec.algorithm)
        self._left = spec.length  # octets still to hash under l=, None for no limit
        self._empty_lines = 0  # empty lines seen but not hashed (maybe at the end of the body)
        self._in_line = False  # a piece of the current line was hashed already
        self._wsp = False  # relaxed: the last piece ended in whitespace, not hashed yet
        self._any = False  # anything hashed at all

    def _emit(self, data: bytes) -> None:
        if self._empty_lines:
            data = b"\r\n" * self._empty_lines + data
            self._empty_lines = 0
        if self._left is not None:
            data = data[: self._left]
            self._left -= len(data)
        if data:
            self._hash.update(data)
            self._any = True

    def piece(self, data: bytes) -> None:
        """A part of a line that continues; `data` ends in non-whitespace or is all whitespace."""
        if not data:
            return
        if self.relaxed:
            if not data.strip(_WSP):
                self._wsp = True  # a run of any length: one SP if the line goes on, else nothing
                return
            if self._wsp:
                data = b" " + data
                self._wsp = False
            data = compress_whitespace(data)
        self._emit(data)
        self._in_line = True

    def lines(self, block: bytes) -> None:
        """Complete lines, each ending in CRLF."""
        if not block:
            return
        if self.relaxed:
            if self._wsp:
                block = b" " + block
                self._wsp = False
            block = relaxed_lines(block)
        if self._in_line:  # the first line ends a line whose start was hashed: never "empty"
            end = block.index(b"\r\n") + 2
            self._emit(block[:end])
            self._in_line = False
            block = block[end:]
        core = block.rstrip(b"\r\n")
        if not core:
            self._empty_lines += len(block) // 2
            return
        trailing = (len(block) - len(core)) // 2  # CRLFs after the last non-empty line
        self._emit(core + b"\r\n")
        self._empty_lines += trailing - 1

    def digest(self) -> bytes:
        """The hash; call once, after the whole body (an unterminated last line is closed)."""
        if self._in_line or self._wsp:
            self._wsp = False
            self.lines(b"\r\n")
        if not self._any and not self.relaxed:
            self._empty_lines = 0  # simple: an empty body is one CRLF (RFC 6376 §3.4.3)
            self._emit(b"\r\n")
        return self._hash.digest()


def _blocks(f: BinaryIO) -> Iterator[tuple[bytes, bool]]:
    """(data, complete) from `f`: CRLF lines (complete) or a piece of an over-long line."""
    carry = b""
    while True:
        chunk = f.read(BLOCK)
        if not chunk:
            break
        data = carry + chunk
        cut = data.rfind(b"\n") + 1
        if cut:
            yield data[:cut].replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"), True
            carry = data[cut:]
        else:
            carry = data
        if len(carry) >= BLOCK:  # a line longer than BLOCK: hand on all but its tail
            keep = carry[-1:] if carry.endswith(b"\r") else b""
            body = carry[: len(carry) - len(keep)]
            stripped = len(body.rstrip(_WSP)) or len(body)
            yield body[:stripped], False
            carry = body[stripped:] + keep
    if carry:
        yield carry.replace(b"\r", b""), False


def hash_bodies(f: BinaryIO, specs: Iterable[BodySpec]) -> dict[BodySpec, bytes]:
    """Hash the body read from `f` (positioned at its first byte) for each spec, in one pass."""
    hashers = {spec: BodyHasher(spec) for spec in set(specs)}
    if not hashers:
        return {}
    for data, complete in _blocks(f):
        for hasher in hashers.values():
            if complete:
                hasher.lines(data)
            else:
                hasher.piece(data)
    return {spec: hasher.digest() for spec, hasher in hashers.items()}
