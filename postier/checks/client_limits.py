"""Client rate limits on the mx listener: connections, messages and recipients per minute.

A client is counted by its IPv4 address or its IPv6 /64 (`ratelimit.client_key`), in the
SQLite file every worker shares, so spreading connections over workers gains nothing.
Over a limit: `421 4.7.0` and the connection closes (connections), or `450 4.7.1` for the
command (messages at MAIL, recipients at RCPT), so a real MTA simply retries later.
Authenticated clients and `exempt_networks` are never counted.
"""

from __future__ import annotations

import asyncio
import logging

from postier import log
from postier.checks.base import ACCEPT, Verdict, refuse
from postier.checks.protection import Protection
from postier.checks.ratelimit import RateLimiter, client_key
from postier.inbound.peer import Peer
from postier.inbound.transaction import Transaction
from postier.protocol.address import Address
from postier.protocol.replies import Reply

_LOG = logging.getLogger("postier.ratelimit")
PERIOD = 60.0

TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections from your address, try later")
TOO_MANY_MESSAGES = Reply(450, "4.7.1", "Too many messages from your address, try later")
TOO_MANY_RECIPIENTS = Reply(450, "4.7.1", "Too many recipients from your address, try later")


class ClientRateLimits:
    name = "client-rate-limits"

    def __init__(self, protection: Protection, limiter: RateLimiter) -> None:
        cfg = protection.config
        self.protection = protection
        self.limiter = limiter
        self.connections = cfg.client_connections_per_minute
        self.messages = cfg.client_messages_per_minute
        self.recipients = cfg.client_recipients_per_minute

    async def _allowed(self, ip: str, kind: str, limit: int) -> bool:
        """Count one more `kind` for the client; False (logged) when over `limit`."""
        key = f"{kind}:{client_key(ip)}"
        loop = asyncio.get_running_loop()
        allowed = await loop.run_in_executor(None, self.limiter.allow, key, limit, PERIOD)
        if not allowed:
            log.event("client-rate-limited", logging.WARNING, _LOG, ip=ip, kind=kind, limit=limit)
        return allowed

    async def at_connect(self, peer: Peer) -> Verdict:
        if self.connections <= 0 or self.protection.exempt(peer.ip):
            return ACCEPT
        if await self._allowed(peer.ip, "connections", self.connections):
            return ACCEPT
        return refuse(TOO_MANY_CONNECTIONS, f"over {self.connections} connections per minute")

    async def at_mail(self, txn: Transaction) -> Verdict:
        if self.messages <= 0 or self.protection.exempt(txn.client_ip, txn.auth_user):
            return ACCEPT
        if await self._allowed(txn.client_ip, "messages", self.messages):
            return ACCEPT
        return refuse(TOO_MANY_MESSAGES, f"over {self.messages} messages per minute")

    async def at_rcpt(self, txn: Transaction, rcpt: Address) -> Verdict:
        if self.recipients <= 0 or self.protection.exempt(txn.client_ip, txn.auth_user):
            return ACCEPT
        if await self._allowed(txn.client_ip, "recipients", self.recipients):
            return ACCEPT
        return refuse(TOO_MANY_RECIPIENTS, f"over {self.recipients} recipients per minute")
