"""What every session of one daemon process shares."""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from postier.config import Config
from postier.net.limits import ConnectionTracker
from postier.policy import Policy
from postier.router import Router

if TYPE_CHECKING:
    from postier.auth.passwd import PasswordFile
    from postier.auth.throttle import FailureThrottle
    from postier.net.outbound import Outbound
    from postier.net.session import SmtpSession
    from postier.tls import CertificateStore


@dataclass(slots=True)
class ServerContext:
    config: Config
    policy: Policy
    router: Router
    executor: ThreadPoolExecutor
    connections: ConnectionTracker
    tls: CertificateStore | None = None
    passwords: PasswordFile | None = None
    throttle: FailureThrottle | None = None
    shutting_down: bool = False
    sessions: set[SmtpSession] = field(default_factory=set)
    spool_dir: Path = Path(".")
    outbound: Outbound | None = None
    _free_checked_at: float = -10.0
    _free_bytes: int = -1
    _rdns_cache: dict[str, tuple[str, float]] = field(default_factory=dict)
    # Password hashing (ARGON2ID: ~64 MiB and ~170 ms of CPU each) runs at most this many at
    # a time per worker; more would only trade memory for nothing on a machine this size.
    hash_slots: asyncio.Semaphore | None = None

    def password_slots(self) -> asyncio.Semaphore:
        if self.hash_slots is None:
            self.hash_slots = asyncio.Semaphore(max(1, (os.cpu_count() or 1)))
        return self.hash_slots

    def begin_shutdown(self) -> None:
        """Stop taking work: idle sessions close now, busy ones after their transaction."""
        self.shutting_down = True
        for s in list(self.sessions):
            s.wake()

    def low_on_disk(self, extra: int = 0) -> bool:
        """True when storing `extra` more bytes would leave less than min_free_space.

        The free space is read at most once a second: a statvfs per MAIL is measurable at
        hundreds of messages a second, and a second-old figure is precise enough.
        """
        now = time.monotonic()
        if now - self._free_checked_at > 1.0:
            self._free_checked_at = now
            try:
                st = os.statvfs(self.config.mail_root)
                self._free_bytes = st.f_bavail * st.f_frsize
            except OSError:
                self._free_bytes = -1
        if self._free_bytes < 0:
            return False
        return self._free_bytes < self.config.min_free_space + extra

    def cached_rdns(self, ip: str) -> str | None:
        hit = self._rdns_cache.get(ip)
        if hit is None or hit[1] < time.monotonic():
            return None
        return hit[0]

    def remember_rdns(self, ip: str, name: str, ttl: float = 300.0) -> None:
        if len(self._rdns_cache) >= 10000:
            self._rdns_cache.clear()
        self._rdns_cache[ip] = (name, time.monotonic() + ttl)
