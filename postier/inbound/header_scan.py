"""A streaming pass over the header section of a message as it arrives.

It does two jobs at once, so the header section is walked once: it notes which field names
occur (submission adds Message-ID and Date only when missing, RFC 6409 §8.2/8.3), and it
can drop fields the peer must not be trusted with (RFC 8601 §5: an incoming
`Authentication-Results:` that claims our own host name). The decision sees the whole
field, unfolded, so a field folded over several lines, or split between two chunks, is
kept or dropped whole.

Input is spool text (LF line endings, see `postier.spool`), in chunks of whole lines; only a
line longer than 64 KiB arrives in pieces. The header section ends at the first empty line;
after that every byte passes through untouched and the scanner costs nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable

# Given the field name (lower-case, no colon) and the whole field unfolded (without its
# line end), True removes the field from the stored message.
DropField = Callable[[bytes, bytes], bool]

# A field is held until its end is known (the next line that is not a continuation). Past
# this many bytes it is decided on what has arrived and the rest follows that decision, so a
# peer cannot make us hold a 35 MB "header" in memory.
MAX_HELD_FIELD = 64 * 1024

# A field's first line: its name, then the colon (a continuation line starts with white space).
_FIELD_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:", re.M)


class NamedDrop:
    """A `DropField` that can only ever drop fields of `names`.

    Knowing that lets the scanner take a whole chunk at C speed when none of those names
    occurs in it (the usual case): the field-by-field pass runs only when one may be dropped.
    """

    __slots__ = ("decide", "names")

    def __init__(self, names: frozenset[bytes], decide: DropField) -> None:
        self.names = names  # lower-case field names
        self.decide = decide

    def __call__(self, name: bytes, field: bytes) -> bool:
        return name in self.names and self.decide(name, field)


class HeaderScanner:
    __slots__ = (
        "_decided",
        "_droppable",
        "_dropping",
        "_held",
        "_partial",
        "done",
        "drop",
        "names",
        "received",
    )

    def __init__(self, drop: DropField | None = None) -> None:
        self.drop = drop
        self.names: set[bytes] = set()  # field names seen, lower-case
        self.received = 0  # Received: fields seen (hops so far; loop detection)
        self.done = False  # the empty line that ends the header section has passed
        self._held = bytearray()  # the current field (complete lines), not yet decided
        self._partial = False  # _held ends inside a line (a piece of a very long line)
        self._decided = False  # the current field outgrew MAX_HELD_FIELD and was decided
        self._dropping = False  # ...and the decision was to drop it
        # The names a filter may drop, when it says so (None: any field may be dropped).
        self._droppable: frozenset[bytes] | None = (
            frozenset() if drop is None else drop.names if isinstance(drop, NamedDrop) else None
        )

    def feed(self, data: bytes) -> bytes:
        """Take spool text; return what may be written now (fields decided so far)."""
        if self.done:
            return data
        if self._whole_chunk(data):
            return data
        out = bytearray()
        pos = 0
        end = len(data)
        while pos < end and not self.done:
            nl = data.find(b"\n", pos)
            stop = end if nl < 0 else nl + 1
            self._line(data[pos:stop], out, complete=nl >= 0)
            pos = stop
        if self.done and pos < end:
            out += data[pos:]
        return bytes(out)

    def _whole_chunk(self, data: bytes) -> bool:
        """Note the names of a chunk of whole lines at once when nothing in it can be dropped.

        The hot path: most messages bring their whole header section in one chunk, and
        nothing to drop. Falls back (False) to the field-by-field pass when a field is still
        held, the chunk ends inside a line, or a droppable name occurs in it.
        """
        if self._droppable is None or self._held or self._partial or not data.endswith(b"\n"):
            return False
        # Where the empty line that ends the header section starts, or -1: not in this chunk.
        end = 0 if data.startswith(b"\n") else data.find(b"\n\n")
        if end > 0:
            end += 1
        header = data if end < 0 else data[:end]
        if self._droppable and any(n in header.lower() for n in self._droppable):
            return False
        for raw in _FIELD_NAME.findall(header):
            name = raw.lower()
            self.names.add(name)
            if name == b"received":
                self.received += 1
        self.done = end >= 0
        return True

    def close(self) -> bytes:
        """The message ended inside its header section: decide the field still held."""
        out = bytearray()
        self._settle(out)
        self.done = True
        return bytes(out)

    def _line(self, line: bytes, out: bytearray, *, complete: bool) -> None:
        continuation = self._partial or line[:1] in (b" ", b"\t")
        if not continuation:
            self._settle(out)
            if line in (b"\n", b""):
                out += line
                self.done = line == b"\n"
                return
        self._partial = not complete
        if self._decided:
            if not self._dropping:
                out += line
            return
        self._held += line
        if len(self._held) > MAX_HELD_FIELD:
            self._dropping = self._should_drop()
            self._decided = True
            if not self._dropping:
                out += self._held
            self._held.clear()

    def _settle(self, out: bytearray) -> None:
        """The held field is complete: write it unless the filter drops it."""
        if self._held and not self._should_drop():
            out += self._held
        self._held.clear()
        self._decided = self._dropping = self._partial = False

    def _should_drop(self) -> bool:
        """Decide the held field (complete, or the start of a huge one); note its name."""
        if self._held[:1] in (b" ", b"\t"):
            return False  # the folded rest of a field a whole-chunk pass already let through
        field = bytes(self._held).rstrip(b"\n")
        name = field.split(b":", 1)[0].strip().lower()
        self.names.add(name)
        if name == b"received":
            self.received += 1
        return self.drop is not None and self.drop(name, field.replace(b"\n", b""))
