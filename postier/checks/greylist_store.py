"""Greylisting state: the (client network, sender, recipient) triplets and the clients that
passed, in one SQLite file shared by all workers and kept across restarts.

The rule (as in postgrey and Postfix's postscreen): the first attempt of a triplet is deferred;
a retry after `delay` and before `expire` passes, and from then on the whole client network
passes for `pass_ttl` (36 days by default), so a real MTA is greylisted once, not once per
sender. The client is counted by its /24 (IPv4) or /64 (IPv6), because large senders retry
from another address of the same pool.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from postier import netaddr
from postier.checks.sqlite_state import StateFile

_SCHEMA = """
CREATE TABLE IF NOT EXISTS triplet (
    net TEXT NOT NULL, sender TEXT NOT NULL, rcpt TEXT NOT NULL,
    first_seen REAL NOT NULL,
    PRIMARY KEY (net, sender, rcpt)
);
CREATE TABLE IF NOT EXISTS passed (net TEXT PRIMARY KEY, until REAL NOT NULL);
"""


def client_network(ip: str) -> str:
    """Greylisting's unit: a /24 or a /64, since large senders retry from their pool."""
    return netaddr.client_network(ip, 24)


@dataclass(frozen=True, slots=True)
class GreylistDecision:
    passed: bool
    retry_after: float = 0.0  # seconds until a retry can pass (for the log)
    reason: str = ""  # "known-client", "retry-in-window", "new", "too-early", "expired"


class GreylistStore:
    def __init__(
        self,
        path: Path,
        *,
        delay: float = 300.0,
        expire: float = 86400.0,
        pass_ttl: float = 36 * 86400.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._state = StateFile(path, _SCHEMA)
        self.delay = delay
        self.expire = expire
        self.pass_ttl = pass_ttl
        self._clock = clock

    def check(self, ip: str, sender: str, recipient: str) -> GreylistDecision:
        """Decide one triplet and record what was seen (blocking: run it in the thread pool)."""
        now = self._clock()
        net = client_network(ip)
        sender, recipient = sender.lower(), recipient.lower()
        conn = self._state.connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            decision = self._decide(conn, now, net, sender, recipient)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return decision

    def _decide(self, conn, now: float, net: str, sender: str, rcpt: str) -> GreylistDecision:  # type: ignore[no-untyped-def]
        row = conn.execute("SELECT until FROM passed WHERE net = ?", (net,)).fetchone()
        if row is not None and row[0] > now:
            return GreylistDecision(True, reason="known-client")
        key = (net, sender, rcpt)
        row = conn.execute(
            "SELECT first_seen FROM triplet WHERE net = ? AND sender = ? AND rcpt = ?", key
        ).fetchone()
        if row is None or now - row[0] > self.expire:
            conn.execute(
                "INSERT INTO triplet (net, sender, rcpt, first_seen) VALUES (?, ?, ?, ?) "
                "ON CONFLICT DO UPDATE SET first_seen = excluded.first_seen",
                (*key, now),
            )
            return GreylistDecision(False, self.delay, "new" if row is None else "expired")
        waited = now - row[0]
        if waited < self.delay:
            return GreylistDecision(False, self.delay - waited, "too-early")
        conn.execute(
            "INSERT INTO passed (net, until) VALUES (?, ?) "
            "ON CONFLICT DO UPDATE SET until = excluded.until",
            (net, now + self.pass_ttl),
        )
        conn.execute("DELETE FROM triplet WHERE net = ?", (net,))
        conn.execute("DELETE FROM triplet WHERE first_seen < ?", (now - self.expire,))
        conn.execute("DELETE FROM passed WHERE until < ?", (now,))
        return GreylistDecision(True, reason="retry-in-window")

    def close(self) -> None:
        self._state.close()
