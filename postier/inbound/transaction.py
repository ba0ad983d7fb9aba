"""One mail transaction as the application sees it: what the router needs to store it."""

from __future__ import annotations

from dataclasses import dataclass, field

from postier.policy import LocalTarget, RemoteTarget
from postier.protocol.address import Address
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
    dkim_sign: bool = False  # a trusted sender: its queued copy is DKIM-signed at commit
    requiretls: bool = False  # MAIL FROM ... REQUIRETLS (RFC 8689)
    local: list[LocalTarget] = field(default_factory=list)
    remote: list[RemoteTarget] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)  # envelope recipients as accepted
    writer: SpoolWriter | None = None

    @property
    def sender_text(self) -> str:
        return str(self.sender) if self.sender else ""

    def add_targets(self, rcpt: str, targets: list[LocalTarget | RemoteTarget]) -> None:
        """Record an accepted recipient; a mailbox or remote address gets one copy only."""
        for target in targets:
            if isinstance(target, LocalTarget):
                if all(t.user.mailbox != target.user.mailbox for t in self.local):
                    self.local.append(target)
            elif all(t.address != target.address for t in self.remote):
                self.remote.append(target)
        self.accepted.append(rcpt)
