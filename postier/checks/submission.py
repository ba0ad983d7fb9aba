"""A submission server completes what a mail client left out (RFC 6409 §8.2, §8.3).

Message-ID and Date are added when the message has none, whatever its size: the spool
writer takes header lines until the message is delivered.
"""

from __future__ import annotations

from email.utils import formatdate

from postier.checks.base import ACCEPT, ReceivedMessage, Verdict
from postier.inbound.transaction import Transaction


class SubmissionHeaders:
    name = "submission-headers"

    def __init__(self, hostname: str) -> None:
        self.hostname = hostname

    async def at_end_of_data(self, txn: Transaction, message: ReceivedMessage) -> Verdict:
        if txn.auth_user is None:
            return ACCEPT
        present = message.header_names
        missing = b""
        if b"message-id" not in present:
            missing += f"Message-ID: <{txn.queue_id}@{self.hostname}>\n".encode()
        if b"date" not in present:
            missing += f"Date: {formatdate(localtime=True)}\n".encode()
        return Verdict(fields=missing) if missing else ACCEPT
