"""SMTP AUTH for one session: SASL steps, the password check off the loop, brute-force limits.

The SASL mechanics are sans-I/O (`postier.auth.sasl`); this module only connects them to a
session: the per-address throttle before each attempt, the bounded thread-pool check of the
password (never on the event loop), and the cut-off after three failures in one session.
It needs the protocol, the peer (address and log) and `AuthServices`, not the session.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Protocol

from postier.auth import sasl
from postier.inbound.peer import Peer
from postier.protocol import replies as R
from postier.protocol.events import Auth, AuthResponse
from postier.protocol.server import ServerConnection

if TYPE_CHECKING:
    from postier.auth.passwd import PasswordFile
    from postier.auth.throttle import FailureThrottle

MAX_AUTH_FAILURES = 3


class AuthServices(Protocol):
    """What every AUTH exchange of a worker shares (`ServerContext` provides it)."""

    passwords: PasswordFile | None
    throttle: FailureThrottle | None
    executor: Executor

    def password_slots(self) -> asyncio.Semaphore: ...


class AuthExchange:
    # One per connection, AUTH or not: slots instead of a __dict__ (about 60 bytes less for
    # every idle connection).
    __slots__ = ("conn", "exchange", "failures", "peer", "services")

    def __init__(self, conn: ServerConnection, peer: Peer, services: AuthServices) -> None:
        self.conn = conn
        self.peer = peer
        self.services = services
        self.exchange: sasl.Exchange | None = None
        self.failures = 0

    async def handle(self, event: Auth | AuthResponse) -> None:
        conn, peer, services = self.conn, self.peer, self.services
        if isinstance(event, Auth):
            throttle = services.throttle
            delay = throttle.delay_for(peer.ip) if throttle is not None else 0.0
            if delay > 0:
                peer.log("auth-throttled", logging.WARNING, ip=peer.ip, delay=f"{delay:.1f}")
                await asyncio.sleep(delay)
            step = sasl.start(event.mechanism, event.initial_response)
        else:
            assert self.exchange is not None
            step = self.exchange.step(event.line)
        if isinstance(step, sasl.Challenge):
            self.exchange = step.exchange
            conn.challenge(step.b64_text)
            return
        self.exchange = None
        if isinstance(step, sasl.Failure):
            conn.reject(step.reply)
            peer.log("auth-failed", logging.WARNING, ip=peer.ip, reason=step.reason or step.text)
            if step.reply.code == 535:
                self._failed()
            return
        passwords = services.passwords
        assert passwords is not None
        loop = asyncio.get_running_loop()
        async with services.password_slots():
            ok = await loop.run_in_executor(
                services.executor, passwords.verify, step.username, step.password
            )
        if ok:
            user = passwords.canonical(step.username) or step.username
            conn.auth_succeeded(user)
            if services.throttle is not None:
                services.throttle.record_success(peer.ip)
            peer.log("auth", ip=peer.ip, user=user)
        else:
            conn.reject(R.AUTH_FAILED)
            peer.log("auth-failed", logging.WARNING, ip=peer.ip, user=step.username)
            self._failed()

    def _failed(self) -> None:
        if self.services.throttle is not None:
            self.services.throttle.record_failure(self.peer.ip)
        self.failures += 1
        if self.failures >= MAX_AUTH_FAILURES:
            self.conn.close(R.TOO_MANY_AUTH_FAILURES, "too many auth failures")
            self.peer.log("auth-cutoff", logging.WARNING, ip=self.peer.ip, failures=self.failures)
