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
from pathlib import Path


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
            conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(self.schema)
            self._local.conn = conn
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
