"""One small SQLite file per concern, shared by every worker process (greylist, rate counts).

Why SQLite and not a home-made server: workers are separate processes that must agree on
counts (a client spreading connections over workers must not get N times its allowance), the
state must survive a restart (a greylisted sender that passed yesterday passes today), and the
work per decision is one short transaction. WAL mode lets readers and one writer overlap;
`synchronous=NORMAL` is enough because losing the last second of counters in a power cut costs
a sender one more 451, never a message.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

# How long opening a state file may wait for the other workers opening it at the same time.
OPEN_TIMEOUT = 10.0


class StateFile:
    """A per-thread connection to one SQLite file, created with `schema` on first use."""

    def __init__(self, path: Path, schema: str) -> None:
        self.path = path
        self.schema = schema
        self._local = threading.local()

    def connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=OPEN_TIMEOUT, isolation_level=None)
            deadline = time.monotonic() + OPEN_TIMEOUT
            _until_unlocked(lambda: conn.execute("PRAGMA journal_mode=WAL"), deadline)
            conn.execute("PRAGMA synchronous=NORMAL")
            _until_unlocked(lambda: conn.executescript(self.schema), deadline)
            self._local.conn = conn
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def _until_unlocked(step: Callable[[], object], deadline: float) -> None:
    """Run `step`, again while SQLite says the file is locked, until `deadline`.

    The workers start together and open the same new file at once. Switching it to WAL
    (and creating its tables) needs an exclusive lock: of two connections that each hold a
    shared lock and want it, SQLite fails one at once with "database is locked" instead of
    calling its busy handler (that wait could deadlock), so the connect timeout does not
    cover this. The failed statement has let its lock go; trying again succeeds once the
    other connection is done."""
    while True:
        try:
            step()
            return
        except sqlite3.OperationalError as exc:
            busy = exc.sqlite_errorcode in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
            if not busy or time.monotonic() >= deadline:
                raise
            time.sleep(0.005)
