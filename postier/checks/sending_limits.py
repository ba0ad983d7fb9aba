"""Per-user sending limits: contain a compromised submission account.

A stolen password turns a mailbox into a spam cannon within minutes; the limits below cap
what one authenticated user sends per hour (`max_messages_per_hour`, counted at MAIL, and
`max_recipients_per_hour`, counted at RCPT). Beyond a limit the client gets `450 4.7.1`:
temporary, because a legitimate user's mail client retries later and loses nothing.

Counts live in `RateLimiter` (GCRA in one SQLite file under the queue directory), so every
worker shares them and a restart does not hand a spammer a fresh allowance.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from pathlib import Path

from postier.checks.base import ACCEPT, Verdict, refuse
from postier.checks.ratelimit import RateLimiter
from postier.inbound.transaction import Transaction
from postier.log import event
from postier.protocol.address import Address
from postier.protocol.replies import Reply

_LOG = logging.getLogger("postier.checks.sending_limits")

HOUR = 3600.0
STATE_FILE = "user-limits.sqlite"


class SendingLimits:
    """MAIL and RCPT checks for authenticated sessions (roles that offer AUTH)."""

    name = "user-limits"

    def __init__(self, limiter: RateLimiter, messages_per_hour: int, recipients_per_hour: int):
        self.limiter = limiter
        self.messages_per_hour = messages_per_hour
        self.recipients_per_hour = recipients_per_hour

    async def _allowed(self, key: str, limit: int) -> bool:
        # One short SQLite transaction; off the loop, as a busy lock may make it wait.
        return await asyncio.to_thread(self.limiter.allow, key, limit, HOUR)

    async def at_mail(self, txn: Transaction) -> Verdict:
        user = txn.auth_user
        if user is None or await self._allowed(f"user-msg:{user}", self.messages_per_hour):
            return ACCEPT
        return self._refusal(user, "messages", self.messages_per_hour)

    async def at_rcpt(self, txn: Transaction, rcpt: Address) -> Verdict:
        user = txn.auth_user
        if user is None or await self._allowed(f"user-rcpt:{user}", self.recipients_per_hour):
            return ACCEPT
        return self._refusal(user, "recipients", self.recipients_per_hour)

    def _refusal(self, user: str, what: str, limit: int) -> Verdict:
        event("user-limit", logging.WARNING, _LOG, user=user, limit=what, per_hour=limit)
        reply = Reply(450, "4.7.1", f"Too many {what} sent by {user} this hour; try again later")
        return refuse(reply, f"{what} per hour over {limit}")


@functools.cache
def _limiter(path: Path) -> RateLimiter:
    return RateLimiter(path)


def sending_limits(
    queue_dir: Path, messages_per_hour: int, recipients_per_hour: int
) -> SendingLimits:
    """The check for a worker, its SQLite file opened once however often chains are rebuilt
    (a reload rebuilds them)."""
    return SendingLimits(_limiter(queue_dir / STATE_FILE), messages_per_hour, recipients_per_hour)
