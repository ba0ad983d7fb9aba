"""Slow down password guessing, per client address.

The per-session limit (three failures, then 421) stops one connection; this stops a client
that simply reconnects. Each recent failure from an address doubles the delay the session
applies before answering that address's next AUTH (base, 2*base, 4*base ... up to cap). A
quiet period lets the count drain one failure per `quiet` seconds, so a user who mistyped
twice is back to no delay within minutes while a guesser stays at the cap.

IPv6 clients are tracked per /64: one host usually owns the whole /64, and counting each of
its 2**64 addresses separately would make the throttle worthless.

Pure and synchronous: no sleeping here, `now` is injectable, and memory is bounded by
`max_tracked` (the address that failed least recently is forgotten first). Meant to be used
from the event loop thread only; it is not locked.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable


def throttle_key(ip: str) -> str:
    """The bucket an address counts in: IPv4 as is, IPv6 by /64, anything else verbatim."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


class FailureThrottle:
    """Exponential delay per client address after failed authentications."""

    def __init__(
        self,
        base: float = 1.0,
        cap: float = 30.0,
        max_tracked: int = 10000,
        quiet: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if base < 0 or cap < base or max_tracked < 1 or quiet <= 0:
            raise ValueError("need 0 <= base <= cap, max_tracked >= 1, quiet > 0")
        self.base, self.cap, self.max_tracked, self.quiet = base, cap, max_tracked, quiet
        self._clock = clock
        # key -> (failure count, time of the last failure); oldest failure first.
        self._seen: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def failures(self, ip: str, now: float | None = None) -> int:
        """Recent failures from `ip`'s bucket, after the quiet-period drain."""
        key = throttle_key(ip)
        item = self._seen.get(key)
        if item is None:
            return 0
        count, last = item
        now = self._clock() if now is None else now
        drained = int(max(0.0, now - last) // self.quiet)
        if drained >= count:
            del self._seen[key]
            return 0
        return count - drained

    def delay_for(self, ip: str, now: float | None = None) -> float:
        """Seconds to wait before answering this address's next AUTH (0 if it has no record)."""
        count = self.failures(ip, now)
        if count == 0:
            return 0.0
        # Exponent bounded so the float never overflows however long an attacker persists.
        return min(self.cap, self.base * 2.0 ** min(count - 1, 64))

    def record_failure(self, ip: str, now: float | None = None) -> float:
        """Count one failure; returns the delay now in force for that address."""
        now = self._clock() if now is None else now
        key = throttle_key(ip)
        count = self.failures(ip, now)
        self._seen[key] = (count + 1, now)
        self._seen.move_to_end(key)
        while len(self._seen) > self.max_tracked:
            self._seen.popitem(last=False)
        return self.delay_for(ip, now)

    def record_success(self, ip: str) -> None:
        """A correct password clears the address's record."""
        self._seen.pop(throttle_key(ip), None)
