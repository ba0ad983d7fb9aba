"""Rate limits per key (client network, authenticated user), shared by all workers.

The algorithm is GCRA (the "generic cell rate algorithm", a leaky bucket kept as one number
per key): each key stores the theoretical arrival time `tat`; a request of cost c is allowed
when `max(tat, now) + c·T - now <= period`, with T = period / limit. So exactly `limit`
requests pass at once, the next is refused, and the allowance refills steadily (one every T)
instead of resetting at a minute boundary, which would let a client send 2·limit across it.
Times are integer nanoseconds, so "exactly N" holds without floating-point edge cases.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from postier.checks.sqlite_state import StateFile
from postier.netaddr import client_network

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rate (key TEXT PRIMARY KEY, tat INTEGER NOT NULL);
"""
_NS = 1_000_000_000
# Rows whose bucket is full again carry no information; they are swept now and then.
_SWEEP_EVERY = 1000


def client_key(ip: str) -> str:
    """The unit a client is counted by: its IPv4 address, or its IPv6 /64."""
    return client_network(ip, 32)


class RateLimiter:
    """`allow(key, limit, period)` answers and counts in one SQLite transaction (blocking)."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self._state = StateFile(path, _SCHEMA)
        self._clock = clock
        self._calls = 0

    def allow(self, key: str, limit: int, period: float, cost: int = 1) -> bool:
        """True, and counted, when `cost` more fits in `limit` per `period` seconds for `key`.

        A limit of 0 or less means no limit (nothing is stored).
        """
        if limit <= 0:
            return True
        now = int(self._clock() * _NS)
        period_ns = int(period * _NS)
        interval = period_ns // limit
        conn = self._state.connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute("SELECT tat FROM rate WHERE key = ?", (key,)).fetchone()
            tat = max(row[0] if row else now, now)
            new_tat = tat + interval * cost
            allowed = new_tat - now <= period_ns
            if allowed:
                conn.execute(
                    "INSERT INTO rate (key, tat) VALUES (?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET tat = excluded.tat",
                    (key, new_tat),
                )
            self._calls += 1
            if self._calls % _SWEEP_EVERY == 0:
                conn.execute("DELETE FROM rate WHERE tat < ?", (now,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return allowed

    def close(self) -> None:
        self._state.close()
