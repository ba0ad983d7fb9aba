"""Connection limits: a total cap and a per-address cap, both answered with 421 4.7.0."""

from __future__ import annotations

from postier.protocol import replies as R
from postier.protocol.replies import Reply


class ConnectionTracker:
    def __init__(self, max_total: int, max_per_ip: int) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.total = 0
        self.per_ip: dict[str, int] = {}

    def admit(self, ip: str) -> Reply | None:
        """Count a new connection; return the refusal reply if it is over a limit."""
        if self.total >= self.max_total:
            return R.TOO_MANY_CONNECTIONS
        if self.per_ip.get(ip, 0) >= self.max_per_ip:
            return R.TOO_MANY_FROM_IP
        self.total += 1
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        return None

    def release(self, ip: str) -> None:
        self.total -= 1
        left = self.per_ip.get(ip, 1) - 1
        if left <= 0:
            self.per_ip.pop(ip, None)
        else:
            self.per_ip[ip] = left
