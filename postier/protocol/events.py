"""What the peer did, as frozen dataclasses.

`ServerConnection.next_event()` returns these. Events that carry a command (`Hello`, `Mail`,
`Rcpt`, `Data`, `StartTLS`, `Auth`, `AuthResponse`, `EndOfData`) wait for the application's
decision: exactly one `accept()` or `reject(reply)` (or `challenge()` for SASL). Commands the
protocol can answer alone (NOOP, HELP, VRFY, RSET, syntax and sequence errors) never surface;
what they change is reported where it matters to the application (`TransactionEnded` after
RSET). `DataChunk`, `DataRejected`, `ProtocolViolation`, `TransactionEnded` and
`ConnectionClosed` need no decision.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from postier.protocol.address import Address
from postier.protocol.dsn import NO_MAIL_DSN, NO_RCPT_DSN, MailDsn, RcptDsn
from postier.protocol.replies import Reply


@dataclass(frozen=True, slots=True)
class Hello:
    name: str
    extended: bool  # EHLO (True) or HELO (False)


@dataclass(frozen=True, slots=True)
class Mail:
    sender: Address | None  # None is the null reverse-path <>
    size: int | None
    body: str | None  # "7BIT" / "8BITMIME" / "BINARYMIME" / None
    smtputf8: bool
    params: dict[str, str | None] = field(default_factory=dict)
    dsn: MailDsn = NO_MAIL_DSN  # RET, ENVID (RFC 3461)


@dataclass(frozen=True, slots=True)
class Rcpt:
    recipient: Address
    params: dict[str, str | None] = field(default_factory=dict)
    dsn: RcptDsn = NO_RCPT_DSN  # NOTIFY, ORCPT (RFC 3461)


@dataclass(frozen=True, slots=True)
class Data:
    """DATA with at least one accepted recipient; accept() sends 354.

    With `chunking`, the first BDAT of the transaction (RFC 3030): accept() starts reading
    its chunk (no 354); reject(reply) skips the chunk's octets, then sends the reply.
    """

    chunking: bool = False


@dataclass(frozen=True, slots=True)
class DataChunk:
    """Message content, dot-unstuffed, CRLF line endings: whole lines, except that a line
    longer than 64 KiB comes in pieces (a piece never ends in CR and never holds a bare CR
    or LF, so converting CRLF to LF chunk by chunk stays exact).

    After BDAT: the octets exactly as sent (bare CR, LF and NUL included); a piece never
    ends in CR unless it ends the message, so CRLF to LF stays exact there too."""

    data: bytes


@dataclass(frozen=True, slots=True)
class EndOfData:
    """CRLF.CRLF seen. accept() or reject() decides the reply for the whole message."""

    size: int


@dataclass(frozen=True, slots=True)
class DataRejected:
    """The message ended but cannot be taken (too big, bare CR/LF); the reply is already sent.

    The application discards what it stored from the chunks. No decision is needed.
    """

    reply: Reply


@dataclass(frozen=True, slots=True)
class Vrfy:
    """VRFY where the listener may answer truthfully (`ServerConfig.vrfy_truthful`, or after
    AUTH); elsewhere the protocol answers 252 alone. The application decides the reply."""

    query: str  # the argument as given: "alice", "<alice@example.org>", "Alice <a@b>"


@dataclass(frozen=True, slots=True)
class Expn:
    """EXPN where the listener allows it (`ServerConfig.expn_allowed`); else 502 alone."""

    query: str


@dataclass(frozen=True, slots=True)
class StartTLS:
    """accept() sends 220, discards any bytes already received, and waits for tls_started()."""


@dataclass(frozen=True, slots=True)
class Auth:
    mechanism: str
    initial_response: str | None  # still base64; "=" means empty; None means absent


@dataclass(frozen=True, slots=True)
class AuthResponse:
    """A client line during a SASL exchange, still base64 ("*" cancels)."""

    line: str


@dataclass(frozen=True, slots=True)
class ProtocolViolation:
    """The peer broke the protocol badly enough that we replied and will close."""

    reply: Reply
    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """After QUIT (221 queued) or a fatal error: flush the output and close."""

    reason: str


class EndReason(enum.Enum):
    """Why a mail transaction ended; the value is what the log says."""

    ACCEPTED = "accepted"  # end of data answered positively: the message is stored
    REJECTED = "rejected"  # end of data refused, by the application or the protocol
    RSET = "rset"
    HELLO = "helo"  # EHLO or HELO inside a transaction (RFC 5321 §4.1.4)
    STARTTLS = "starttls"  # the TLS reset forgets everything (RFC 3207 §4.2)
    CLOSED = "closed"  # QUIT, timeout, error, or the peer went away


@dataclass(frozen=True, slots=True)
class TransactionEnded:
    """The mail transaction that MAIL opened is over; no decision is needed.

    Reported only when `ServerConfig.report_transaction_end` is set. It is the one signal an
    application needs to drop what it keeps per transaction (queue id, spool file): the
    protocol owns the envelope and knows every way it ends. `detail` is the close reason
    when `reason` is CLOSED.
    """

    reason: EndReason
    detail: str = ""


class NeedData:
    """Sentinel: no event until more bytes arrive. Flush pending output now."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()

Event = (
    Hello
    | Mail
    | Rcpt
    | Data
    | DataChunk
    | EndOfData
    | DataRejected
    | StartTLS
    | Vrfy
    | Expn
    | Auth
    | AuthResponse
    | ProtocolViolation
    | ConnectionClosed
    | TransactionEnded
)
