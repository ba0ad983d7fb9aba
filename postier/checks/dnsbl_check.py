"""DNSBL as a check: looked up at connect, decided at RCPT.

The look-up starts when the client connects and runs while the greeting, EHLO and MAIL go
on (the check returns at once, so the greeting is never delayed). The verdict is given at
RCPT, `554 5.7.1` with the list's own TXT reason, because RFC 5321 §4.5.1 asks that mail to
postmaster is accepted even from a client we refuse otherwise. A list that does not answer
in time lets the client through with a log line (`dnsbl-error`): a DNS failure never keeps
mail out. Authenticated clients and `exempt_networks` are never looked up.

No per-session state: the look-up in flight is kept per address until it ends, and its
answer then lives in `DnsblChecker`'s TTL cache, where RCPT finds it.
"""

from __future__ import annotations

import asyncio
import logging

from postier import log
from postier.checks.base import ACCEPT, Verdict, refuse
from postier.checks.dnsbl import DnsblChecker, DnsblResult
from postier.checks.protection import Protection
from postier.inbound.peer import Peer
from postier.inbound.transaction import Transaction
from postier.protocol.address import Address
from postier.protocol.replies import Reply

_LOG = logging.getLogger("postier.dnsbl")


def is_postmaster(rcpt: Address) -> bool:
    """postmaster, bare or at any of our domains (the policy has accepted the domain)."""
    return rcpt.local.lower() == "postmaster"


class DnsblCheck:
    name = "dnsbl"

    def __init__(self, protection: Protection, checker: DnsblChecker) -> None:
        self.protection = protection
        self.checker = checker
        self.threshold = protection.config.dnsbl_threshold
        self._in_flight: dict[str, asyncio.Task[DnsblResult]] = {}

    def _look_up(self, ip: str) -> asyncio.Task[DnsblResult]:
        task = self._in_flight.get(ip)
        if task is None:
            task = asyncio.ensure_future(self.checker.check(ip))
            self._in_flight[ip] = task
            task.add_done_callback(lambda t: self._done(ip, t))
        return task

    def _done(self, ip: str, task: asyncio.Task[DnsblResult]) -> None:
        """Forget the look-up (its answer is in the cache); a client that left before RCPT
        never awaits it, so a failure is fetched here rather than reported as unretrieved."""
        self._in_flight.pop(ip, None)
        if not task.cancelled():
            task.exception()

    async def at_connect(self, peer: Peer) -> Verdict:
        """Start the look-up and go on: its answer is awaited at RCPT."""
        if not self.protection.exempt(peer.ip):
            self._look_up(peer.ip)
        return ACCEPT

    async def at_rcpt(self, txn: Transaction, rcpt: Address) -> Verdict:
        if is_postmaster(rcpt) or self.protection.exempt(txn.client_ip, txn.auth_user):
            return ACCEPT
        try:
            result = await self._look_up(txn.client_ip)  # cached, or the connect's look-up
        except ValueError as exc:  # not an address we can look up (a scoped IPv6, say)
            log.event("dnsbl-error", logging.WARNING, _LOG, ip=txn.client_ip, error=str(exc))
            return ACCEPT
        if not result.listed(self.threshold):
            return ACCEPT
        zones = ",".join(h.zone for h in result.hits)
        log.event(
            "dnsbl-listed", logging.INFO, _LOG, ip=txn.client_ip, score=result.score, lists=zones
        )
        reason = result.reason()
        return refuse(Reply(554, "5.7.1", f"Service unavailable; {reason}"), f"listed: {zones}")

    async def at_refused_rcpt(self, txn: Transaction, rcpt: Address) -> Verdict:
        """A listed client gets the same 554 for a missing recipient as for a real one."""
        return await self.at_rcpt(txn, rcpt)
