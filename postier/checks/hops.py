"""Mail loop detection: refuse a message that has made too many hops.

A loop between MTAs (two backups that each think the other is better, a forwarding alias
pointing back) adds a `Received:` line per pass. Counting them as the header section
streams in (the spool writer's header scan) costs nothing extra, and refusing with
`554 5.4.6` at end of data stops the loop while the sending MTA still holds the message
and reports it, as Postfix's `hopcount_limit` does.
"""

from __future__ import annotations

from postier.checks.base import ACCEPT, ReceivedMessage, Verdict, refuse
from postier.inbound.transaction import Transaction
from postier.protocol.replies import Reply

# Postfix's default hopcount_limit; RFC 5321 §6.3 asks for "at least 100" only as a bound
# on what a server must tolerate before deciding, and 50 has served for decades.
MAX_RECEIVED = 50

TOO_MANY_HOPS = Reply(554, "5.4.6", "Too many hops: mail loop detected")


class HopCount:
    """End of data: refuse when the message carries more than `limit` Received fields."""

    name = "hops"

    def __init__(self, limit: int = MAX_RECEIVED) -> None:
        self.limit = limit

    async def at_end_of_data(self, txn: Transaction, message: ReceivedMessage) -> Verdict:
        hops = message.received_count
        if hops > self.limit:
            return refuse(TOO_MANY_HOPS, f"{hops} Received fields (limit {self.limit})")
        return ACCEPT
