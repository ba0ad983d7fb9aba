"""Reverse DNS names of clients, for our Received header, cached per worker.

The look-up never delays a session: it starts at connect, and a message sent before it
ends says "unknown". A name is only used when it holds hostname characters alone (it goes
into a header line).
"""

from __future__ import annotations

import asyncio
import socket
import time

LOOKUP_TIMEOUT = 3.0
CACHE_TTL = 300.0
CACHE_MAX = 10000


class ReverseNames:
    def __init__(self) -> None:
        self._cache: dict[str, tuple[str, float]] = {}

    def cached(self, ip: str) -> str | None:
        hit = self._cache.get(ip)
        if hit is None or hit[1] < time.monotonic():
            return None
        return hit[0]

    def remember(self, ip: str, name: str, ttl: float = CACHE_TTL) -> None:
        if len(self._cache) >= CACHE_MAX:
            self._cache.clear()
        self._cache[ip] = (name, time.monotonic() + ttl)

    async def look_up(self, ip: str) -> str:
        """The PTR name of `ip`, or "unknown" (failure, time-out, unsafe characters)."""
        loop = asyncio.get_running_loop()
        name = "unknown"
        try:
            host, _ = await asyncio.wait_for(
                loop.getnameinfo((ip, 0), socket.NI_NAMEREQD), timeout=LOOKUP_TIMEOUT
            )
            if host and all(c.isalnum() or c in "-._" for c in host):
                name = host
        except (OSError, TimeoutError, UnicodeError):
            pass
        self.remember(ip, name)
        return name
