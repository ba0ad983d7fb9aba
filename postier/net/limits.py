"""Connection limits: a total cap and a per-address cap, both answered with 421 4.7.0.

Addresses in the exempt networks (loopback by default, like Postfix's `$mynetworks`) skip the
per-address cap: a local load test or a webmail on the same host opens many connections from
one address. They still count towards the total cap, and exemption never permits relaying.
"""

from __future__ import annotations

from functools import lru_cache

from postier.netaddr import Network, in_networks
from postier.protocol import replies as R
from postier.protocol.replies import Reply


class ConnectionTracker:
    def __init__(
        self, max_total: int, max_per_ip: int, exempt_networks: tuple[Network, ...] = ()
    ) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.total = 0
        self.per_ip: dict[str, int] = {}
        # Parsing an address per connection is cheap, but a busy peer reconnects a lot.
        self.is_exempt = lru_cache(maxsize=4096)(lambda ip: in_networks(ip, exempt_networks))

    def admit(self, ip: str) -> Reply | None:
        """Count a new connection; return the refusal reply if it is over a limit."""
        if self.total >= self.max_total:
            return R.TOO_MANY_CONNECTIONS
        if self.per_ip.get(ip, 0) >= self.max_per_ip and not self.is_exempt(ip):
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
