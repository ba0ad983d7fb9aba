"""Group commit for the queue's directory fsyncs: one fsync serves every commit waiting.

A commit is durable once the directory entries it made are: `fsync` of body/ after the body's
link, of env/ after the envelope's rename (the commit point). An fsync of a directory that
*starts* after a caller's rename covers that rename, whoever calls it. Under load several
sessions commit at the same moment from the thread pool, so a caller arriving while an fsync
of the same directory runs waits for the next one, which the first of the waiters makes for
all of them (the leader/follower group commit of databases). Alone, a caller makes its own
fsync at once, exactly as before; what changes under load is the number of fsyncs, not what
any one of them guarantees.
"""

from __future__ import annotations

import threading
from pathlib import Path

from postier.delivery.fsutil import fsync_dir


class _Round:
    """One fsync; its callers keep a reference and read the outcome once it is finished."""

    __slots__ = ("error", "finished")

    def __init__(self) -> None:
        self.finished = False
        self.error: OSError | None = None


class DirSync:
    """`sync()` returns once an fsync of `path` that began after the call has succeeded."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._cond = threading.Condition()
        self._next = _Round()  # the round that will cover callers arriving now
        self._running: _Round | None = None
        self._started = 0

    @property
    def rounds(self) -> int:
        """fsyncs begun so far (at most one per `sync` call; fewer under concurrency)."""
        return self._started

    def sync(self) -> None:
        """Blocking. Raises the OSError of the round that was to cover this call."""
        with self._cond:
            mine = self._next  # the first round to begin after now
            while not mine.finished:
                if self._running is None:
                    # Nothing runs, so `mine` has not begun: it is still `_next`. Lead it.
                    self._running, self._next = mine, _Round()
                    self._started += 1
                    break
                self._cond.wait()
            else:
                if mine.error is not None:
                    raise mine.error
                return
        try:
            fsync_dir(self.path)
        except OSError as exc:
            mine.error = exc
        with self._cond:
            mine.finished = True
            self._running = None
            self._cond.notify_all()
        if mine.error is not None:
            raise mine.error
