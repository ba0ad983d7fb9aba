"""An authenticated user sends only as an address it owns (RFC 6409 §4.1, §6.1).

The rule itself is `Policy.check_sender`; this puts it at the MAIL stage of the chain.
Unauthenticated sessions (mx, local) are not this check's business.
"""

from __future__ import annotations

from postier.checks.base import ACCEPT, Verdict, refuse
from postier.inbound.transaction import Transaction
from postier.policy import Policy


class SenderOwnership:
    name = "sender-ownership"

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    async def at_mail(self, txn: Transaction) -> Verdict:
        if txn.auth_user is None:
            return ACCEPT
        rejection = self.policy.check_sender(txn.sender, user=txn.auth_user)
        if rejection is None:
            return ACCEPT
        return refuse(rejection.reply, rejection.reason)
