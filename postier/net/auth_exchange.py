"""SMTP AUTH for one session: SASL steps, the password check off the loop, brute-force limits.

The SASL mechanics are sans-I/O (`postier.auth.sasl`); this module only connects them to a
session: the per-address throttle before each attempt, the bounded thread-pool check of the
password (never on the event loop), and the cut-off after three failures in one session.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from postier.auth import sasl
from postier.protocol import replies as R
from postier.protocol.events import Auth, AuthResponse

if TYPE_CHECKING:
    from postier.net.session import SmtpSession

MAX_AUTH_FAILURES = 3


class AuthExchange:
    def __init__(self, session: SmtpSession) -> None:
        self.session = session
        self.exchange: sasl.Exchange | None = None
        self.failures = 0

    async def handle(self, event: Auth | AuthResponse) -> None:
        s = self.session
        conn = s.conn
        assert conn is not None
        if isinstance(event, Auth):
            throttle = s.ctx.throttle
            delay = throttle.delay_for(s.ip) if throttle is not None else 0.0
            if delay > 0:
                s._log("auth-throttled", logging.WARNING, ip=s.ip, delay=f"{delay:.1f}")
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
            s._log("auth-failed", logging.WARNING, ip=s.ip, reason=step.reason or step.text)
            if step.reply.code == 535:
                self._failed()
            return
        passwords = s.ctx.passwords
        assert passwords is not None
        loop = asyncio.get_running_loop()
        async with s.ctx.password_slots():
            ok = await loop.run_in_executor(
                s.ctx.executor, passwords.verify, step.username, step.password
            )
        if ok:
            user = passwords.canonical(step.username) or step.username
            conn.auth_succeeded(user)
            if s.ctx.throttle is not None:
                s.ctx.throttle.record_success(s.ip)
            s._log("auth", ip=s.ip, user=user)
        else:
            conn.reject(R.AUTH_FAILED)
            s._log("auth-failed", logging.WARNING, ip=s.ip, user=step.username)
            self._failed()

    def _failed(self) -> None:
        s = self.session
        assert s.conn is not None
        if s.ctx.throttle is not None:
            s.ctx.throttle.record_failure(s.ip)
        self.failures += 1
        if self.failures >= MAX_AUTH_FAILURES:
            s.conn.close(R.TOO_MANY_AUTH_FAILURES, "too many auth failures")
            s._log("auth-cutoff", logging.WARNING, ip=s.ip, failures=self.failures)
