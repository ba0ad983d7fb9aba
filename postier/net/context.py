"""What every session of one daemon process shares.

Nothing here imports the session: the sessions are known only as `LiveSession`, which is
what shutdown needs, so `net/` has no import circle.
"""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from postier.checks.base import CheckChain
from postier.checks.chain import checks_for_role
from postier.checks.disk import FreeSpace
from postier.config import Config
from postier.net.limits import ConnectionTracker
from postier.net.roles import Role
from postier.policy import Policy
from postier.router import Router

if TYPE_CHECKING:
    from postier.auth.passwd import PasswordFile
    from postier.auth.throttle import FailureThrottle
    from postier.net.outbound import Outbound
    from postier.tls import CertificateStore


class LiveSession(Protocol):
    """A connection being served, as shutdown sees it."""

    transport: asyncio.Transport | None

    def wake(self) -> None: ...


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
    sessions: set[LiveSession] = field(default_factory=set)
    spool_dir: Path = Path(".")
    outbound: Outbound | None = None
    _free_space: FreeSpace | None = None
    _chains: dict[str, CheckChain] = field(default_factory=dict)
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

    def checks(self, role: Role) -> CheckChain:
        """The check chain of a listener role, built once per worker (checks keep no
        per-session state)."""
        chain = self._chains.get(role.name)
        if chain is None:
            if self._free_space is None:
                self._free_space = FreeSpace(self.config.mail_root, self.config.min_free_space)
            chain = checks_for_role(
                role,
                policy=self.policy,
                free_space=self._free_space,
                hostname=self.config.hostname,
            )
            self._chains[role.name] = chain
        return chain

    def cached_rdns(self, ip: str) -> str | None:
        hit = self._rdns_cache.get(ip)
        if hit is None or hit[1] < time.monotonic():
            return None
        return hit[0]

    def remember_rdns(self, ip: str, name: str, ttl: float = 300.0) -> None:
        if len(self._rdns_cache) >= 10000:
            self._rdns_cache.clear()
        self._rdns_cache[ip] = (name, time.monotonic() + ttl)
