"""A queued message's content in memory for its relay attempt: read once, or kept from commit.

A relay attempt needs the content twice (its header section for `TLS-Required:`, all of it
for DATA). A small message (at most `WHOLE` bytes) is read whole in one thread-pool job, and
that copy serves both; a larger one is streamed from the file in pieces.

`Preloaded` goes one step further for the first attempt: whoever commits a small message to
the queue reads it back right there (the commit runs in the thread pool, and the file is in
the page cache) and leaves it here under its body path; the attempt takes it instead of
reading the file again. It is a cache and nothing else: bounded in bytes, the oldest dropped
first, and an attempt that finds nothing reads the file as usual.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

from postier.delivery.base import StoredMessage

WHOLE = 256 * 1024  # content up to this is read and sent whole; a larger one is streamed
PRELOAD_BYTES = 8 * 1024 * 1024  # what `Preloaded` keeps at most, all messages together


def read_body(path: Path | str, content_offset: int, size: int) -> bytes | None:
    """Blocking: the content of the spool-format file `path` (after `Return-Path:`) when it
    is at most `WHOLE` bytes, else None. None as well when the file cannot be read: whoever
    reads it next reports that."""
    if size - content_offset > WHOLE:
        return None
    try:
        with open(path, "rb", buffering=0) as f:
            f.seek(content_offset)
            data = f.read(WHOLE + 1)  # never more, whatever `size` said
    except OSError:
        return None
    return data if len(data) <= WHOLE else None


def read_content(message: StoredMessage) -> bytes | None:
    """`read_body` of a message's file."""
    return read_body(message.path, message.content_offset, message.size)


class Preloaded:
    """Content of freshly queued messages, by body path, for their first attempt.

    `put` is called from the thread pool (the commit) and `take` from the event loop (the
    attempt), hence the lock; both are a few dictionary operations."""

    def __init__(self, max_bytes: int = PRELOAD_BYTES) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, path: Path | str, content: bytes) -> None:
        if len(content) > self.max_bytes:
            return
        key = str(path)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            self._items[key] = content
            self._bytes += len(content)
            while self._bytes > self.max_bytes:  # the oldest go: their attempt reads the file
                _, dropped = self._items.popitem(last=False)
                self._bytes -= len(dropped)

    def take(self, path: Path | str) -> bytes | None:
        """The content left for this body path (once), or None."""
        with self._lock:
            content = self._items.pop(str(path), None)
            if content is not None:
                self._bytes -= len(content)
            return content

    def __len__(self) -> int:
        return len(self._items)
