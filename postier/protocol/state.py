"""Per-session state: plain dataclasses the command handlers read and the decisions update."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from postier.protocol.address import Address


class Phase(enum.Enum):
    COMMAND = "command"  # reading command lines
    DATA = "data"  # reading message content after 354
    AUTH = "auth"  # reading SASL responses after 334
    CHUNK = "chunk"  # reading the octets of a BDAT chunk (RFC 3030), stored or skipped
    TLS_PENDING = "tls-pending"  # 220 sent for STARTTLS; every plaintext byte is discarded
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """What the protocol needs to know about this listener; the I/O layer builds it."""

    hostname: str
    max_message_size: int = 35 * 1024 * 1024
    max_recipients: int = 100
    # RFC 5321 §4.5.3.1.4: 512 octets including CRLF. MAIL and RCPT get room for the
    # parameters that extensions add (SIZE, BODY, SMTPUTF8, AUTH=): RFC 1870 §3, RFC 4954 §5.
    max_command_line: int = 512
    max_mail_rcpt_line: int = 1024
    max_auth_line: int = 12288  # RFC 4954 §4
    max_errors: int = 10
    starttls_available: bool = False
    implicit_tls: bool = False
    auth_mechanisms: tuple[str, ...] = ()
    auth_requires_tls: bool = True
    auth_required_for_mail: bool = False
    enforce_pipelining_sync: bool = True
    # VRFY/EXPN become events the application answers (RFC 5321 §3.5, §7.3): VRFY on a
    # listener that may tell who exists (local, or mx with vrfy_mx) and after AUTH anywhere.
    vrfy_truthful: bool = False
    expn_allowed: bool = False
    # Report `TransactionEnded` events. An application that keeps data per transaction sets
    # it; a consumer that only needs the commands leaves it off and sees no extra events.
    report_transaction_end: bool = False


@dataclass(slots=True)
class Envelope:
    sender: Address | None = None
    mail_given: bool = False
    recipients: list[Address] = field(default_factory=list)
    size_hint: int | None = None
    body: str | None = None
    smtputf8: bool = False
    chunking: bool = False  # a BDAT chunk was taken: DATA is refused (RFC 3030 §3)


@dataclass(slots=True)
class Session:
    helo: str | None = None
    esmtp: bool = False
    tls: bool = False
    auth_user: str | None = None
    errors: int = 0
    transactions: int = 0
    envelope: Envelope = field(default_factory=Envelope)
