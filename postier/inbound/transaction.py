"""One mail transaction as the application sees it: what the router needs to store it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from postier.policy import LocalTarget, RemoteTarget
from postier.protocol.address import Address
from postier.protocol.dsn import NO_MAIL_DSN, NO_RCPT_DSN, MailDsn, RcptDsn
from postier.spool import SpoolWriter


@dataclass(slots=True)
class Transaction:
    """Lives from an accepted MAIL to the protocol's `TransactionEnded`.

    The protocol keeps the envelope as the peer gave it; this keeps what we made of it:
    the queue id, where each recipient goes, and the spool file.
    """

    queue_id: str
    sender: Address | None
    smtputf8: bool = False
    body_8bit: bool = False
    size_hint: int | None = None  # MAIL ... SIZE=
    auth_user: str | None = None  # the SASL identity (AUTH cannot change inside a transaction)
    client_ip: str = ""  # the peer's address, for checks that judge the client (DNSBL, greylist)
    helo: str = ""  # the HELO/EHLO name (SPF, rspamd)
    dkim_sign: bool = False  # a trusted sender: its queued copy is DKIM-signed at commit
    # What a check started at MAIL and finishes later (the SPF task), by check name: the
    # chain is shared by every session, so such state lives with the transaction.
    notes: dict[str, Any] = field(default_factory=dict)
    requiretls: bool = False  # MAIL FROM ... REQUIRETLS (RFC 8689)
    local: list[LocalTarget] = field(default_factory=list)
    remote: list[RemoteTarget] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)  # envelope recipients as accepted
    writer: SpoolWriter | None = None
    dsn: MailDsn = NO_MAIL_DSN  # RET, ENVID
    # NOTIFY/ORCPT of the RCPT that produced each target, by the target's address.
    recipient_dsn: dict[str, RcptDsn] = field(default_factory=dict)
    spam: bool = False  # a filter called it spam: Maildir recipients with .Junk get it there

    @property
    def sender_text(self) -> str:
        return str(self.sender) if self.sender else ""

    def add_targets(
        self, rcpt: str, targets: list[LocalTarget | RemoteTarget], dsn: RcptDsn | None = None
    ) -> None:
        """Record an accepted recipient; a mailbox or remote address gets one copy only.

        Each target keeps the DSN parameters of the first RCPT that reached it: an alias's
        targets report (or stay silent) as the address the sender wrote asked for."""
        for target in targets:
            if dsn is not None and dsn != NO_RCPT_DSN:
                self.recipient_dsn.setdefault(str(target.address), dsn)
            if isinstance(target, LocalTarget):
                if all(t.user.mailbox != target.user.mailbox for t in self.local):
                    self.local.append(target)
            elif all(t.address != target.address for t in self.remote):
                self.remote.append(target)
        self.accepted.append(rcpt)
