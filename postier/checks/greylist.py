"""Greylisting as a check at RCPT: `451 4.7.1` for the first attempt of a triplet.

The triplet and its windows live in `GreylistStore` (shared SQLite file). Skipped for
authenticated clients, `exempt_networks`, and a sender whose SPF passes for a domain on
`greylist_allow_domains` (at RCPT the SPF verdict can be known; DKIM cannot, the message
has not arrived). `postier.mailauth.check_spf` caches its look-ups, so the end-of-data SPF
check asks DNS no second time.

A greylisted client also gets the 451 for a recipient the policy refused (unknown user):
otherwise "451 for alice, 550 for nobody" tells an outsider which users exist.
"""

from __future__ import annotations

import asyncio
import logging

from postier import log
from postier.checks.base import ACCEPT, Verdict, refuse
from postier.checks.greylist_store import GreylistStore
from postier.checks.protection import Protection
from postier.inbound.transaction import Transaction
from postier.mailauth.spf import check_spf
from postier.protocol.address import Address
from postier.protocol.replies import Reply

_LOG = logging.getLogger("postier.greylist")
GREYLISTED = Reply(451, "4.7.1", "Greylisted, please try again later")


class Greylisting:
    name = "greylist"

    def __init__(self, protection: Protection, store: GreylistStore) -> None:
        self.protection = protection
        self.store = store
        self.allow = tuple(d.lower().rstrip(".") for d in protection.config.greylist_allow_domains)

    async def at_rcpt(self, txn: Transaction, rcpt: Address) -> Verdict:
        if self.protection.exempt(txn.client_ip, txn.auth_user):
            return ACCEPT
        if self.allow and await self._spf_allowed(txn):
            return ACCEPT
        loop = asyncio.get_running_loop()
        decision = await loop.run_in_executor(
            None, self.store.check, txn.client_ip, txn.sender_text, str(rcpt)
        )
        if decision.passed:
            return ACCEPT
        log.event(
            "greylisted",
            logging.INFO,
            _LOG,
            qid=txn.queue_id,
            ip=txn.client_ip,
            sender=f"<{txn.sender_text}>",
            to=f"<{rcpt}>",
            why=decision.reason,
            retry_after=round(decision.retry_after),
        )
        return refuse(GREYLISTED, decision.reason)

    async def at_refused_rcpt(self, txn: Transaction, rcpt: Address) -> Verdict:
        return await self.at_rcpt(txn, rcpt)

    async def _spf_allowed(self, txn: Transaction) -> bool:
        sender = txn.sender
        if sender is None or not sender.domain:
            return False
        domain = sender.domain.lower()
        if not any(domain == d or domain.endswith("." + d) for d in self.allow):
            return False
        resolver = self.protection.resolver
        assert resolver is not None
        spf = await check_spf(resolver, txn.client_ip, txn.sender_text, txn.helo)
        if spf.result == "pass":
            log.event("greylist-skipped", logging.INFO, _LOG, qid=txn.queue_id, spf_domain=domain)
            return True
        return False
