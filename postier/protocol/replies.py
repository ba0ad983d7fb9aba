"""SMTP replies (RFC 5321 §4.2) with enhanced status codes (RFC 3463, RFC 2034).

Every reply postier sends is built here, so codes and texts stay consistent and greppable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache


@dataclass(frozen=True, slots=True)
class Reply:
    """One reply: a three-digit code, an optional enhanced code, one or more text lines."""

    code: int
    enhanced: str | None
    text: str | tuple[str, ...]
    # The wire form, made on the first send: most replies are the catalogue's constants
    # below, sent several times a message (not part of the value: equality ignores it).
    _wire: bytes | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def lines(self) -> tuple[str, ...]:
        return (self.text,) if isinstance(self.text, str) else self.text

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def to_bytes(self, enhanced_codes: bool = True) -> bytes:
        """Render as wire bytes: `250-...` continuation lines, the last `250 ...`.

        Text lines never contain CR or LF (they would split the reply and let a peer's
        bytes forge replies), so any that slip in are replaced with a space.
        """
        if enhanced_codes:
            wire = self._wire
            if wire is None:
                wire = self._render(True)
                object.__setattr__(self, "_wire", wire)  # frozen: a cache, not a change
            return wire
        return self._render(False)

    def _render(self, enhanced_codes: bool) -> bytes:
        prefix = f"{self.enhanced} " if (enhanced_codes and self.enhanced) else ""
        lines = self.lines
        out = []
        last = len(lines) - 1
        for i, line in enumerate(lines):
            safe = line.replace("\r", " ").replace("\n", " ")
            sep = " " if i == last else "-"
            out.append(f"{self.code}{sep}{prefix}{safe}\r\n")
        return "".join(out).encode("utf-8", "replace")

    def __str__(self) -> str:
        prefix = f"{self.enhanced} " if self.enhanced else ""
        return f"{self.code} {prefix}{' / '.join(self.lines)}"


def reply(code: int, enhanced: str | None, text: str) -> Reply:
    return Reply(code, enhanced, text)


# --- the catalogue ------------------------------------------------------------------------
# Names say the situation; texts are what a person reading a bounce or a log needs.

OK = Reply(250, "2.0.0", "OK")
SENDER_OK = Reply(250, "2.1.0", "Sender OK")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")
RESET_OK = Reply(250, "2.0.0", "Reset OK")
NOOP_OK = Reply(250, "2.0.0", "OK")
VRFY_CANNOT = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
START_DATA = Reply(354, None, "End data with <CR><LF>.<CR><LF>")
READY_TLS = Reply(220, "2.0.0", "Ready to start TLS")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")

SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, closing connection")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_FROM_IP = Reply(421, "4.7.0", "Too many connections from your address, try again later")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
TOO_MANY_AUTH_FAILURES = Reply(421, "4.7.0", "Too many authentication failures, closing connection")
TIMEOUT = Reply(421, "4.4.2", "Timeout, closing connection")
TOO_SLOW = Reply(421, "4.4.2", "Data rate too low, closing connection")
SESSION_TOO_LONG = Reply(421, "4.4.2", "Session too long, closing connection")
STORAGE_FAILED = Reply(451, "4.3.0", "Local error in processing; try again later")
LOW_DISK = Reply(452, "4.3.1", "Insufficient system storage, try again later")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")

LINE_TOO_LONG = Reply(500, "5.5.6", "Line too long")
UNKNOWN_COMMAND = Reply(500, "5.5.2", "Command not recognized")
BAD_SYNTAX = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
EXPN_DISABLED = Reply(502, "5.5.1", "EXPN not available")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
HELO_FIRST = Reply(503, "5.5.1", "Send EHLO/HELO first")
MAIL_FIRST = Reply(503, "5.5.1", "Send MAIL first")
RCPT_FIRST = Reply(503, "5.5.1", "Send RCPT first")
NESTED_MAIL = Reply(503, "5.5.1", "Nested MAIL command")
ALREADY_TLS = Reply(503, "5.5.1", "TLS already active")
ALREADY_AUTH = Reply(503, "5.5.1", "Already authenticated")
PARAM_NOT_RECOGNIZED = Reply(555, "5.5.4", "Parameter not recognized or not implemented")
NO_TLS = Reply(502, "5.5.1", "STARTTLS not available")
NO_AUTH = Reply(502, "5.5.1", "AUTH not available")
AUTH_NEEDS_TLS = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_CANCELLED = Reply(501, "5.0.0", "Authentication cancelled")
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode response")
AUTH_MECH_UNKNOWN = Reply(504, "5.5.4", "Unrecognized authentication mechanism")
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
NO_SUCH_USER = Reply(550, "5.1.1", "No such user here")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
BAD_LINE_ENDINGS = Reply(550, "5.5.2", "Bare CR or LF in message data (RFC 5321 2.3.8)")
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")
SYNC_ERROR = Reply(554, "5.5.0", "Improper use of SMTP command pipelining")
PREGREET = Reply(554, "5.5.0", "Protocol error: you talked before my greeting")
DATA_AFTER_BDAT = Reply(503, "5.5.1", "DATA not allowed after BDAT in one transaction")
BINARYMIME_NEEDS_BDAT = Reply(503, "5.5.1", "BODY=BINARYMIME requires BDAT, not DATA")
SMTPUTF8_REQUIRED = Reply(553, "5.6.7", "Non-ASCII address requires the SMTPUTF8 parameter")


# One object per host name (a server has one or a few), so its wire form is made once.
@lru_cache(maxsize=64)
def closing(hostname: str) -> Reply:
    return Reply(221, "2.0.0", f"{hostname} closing connection")


@lru_cache(maxsize=64)
def greeting(hostname: str) -> Reply:
    return Reply(220, None, f"{hostname} ESMTP postier")


def chunk_received(octets: int) -> Reply:
    """The reply to a BDAT chunk that is not the last (RFC 3030 §4.2)."""
    return Reply(250, "2.0.0", f"{octets} octets received")


def queued(queue_id: str) -> Reply:
    return Reply(250, "2.0.0", f"OK: queued as {queue_id}")
