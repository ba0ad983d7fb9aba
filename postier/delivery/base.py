"""The one delivery interface every backend shares (shared/DESIGN.md).

A backend takes a message already stored durably in the spool and a list of recipients, and
returns one result per recipient: delivered, temporary failure or permanent failure, each with
the reply text that explains it. File backends (maildir, mbox, spool) are synchronous and run
in the bounded thread pool; network backends (lmtp, smtp) are coroutines.

The spool file format (written by `postier.spool`): LF line endings, starting with the line
`Return-Path: <sender>\\n`, then our `Received:` header, then the message exactly as received
(dot-unstuffed, CRLF turned into LF). `content_offset` is where the part after Return-Path
begins: consumers that must not include Return-Path (queue, LMTP, SMTP) start there.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from postier.errors import DeliveryError


class Status(enum.Enum):
    DELIVERED = "delivered"
    TEMPORARY = "temporary"
    PERMANENT = "permanent"
    # Not a backend answer: the router's mark for a failed local copy it handed to the queue
    # (which retries or bounces it); the reply stays the backend's, for the log.
    QUEUED = "queued"


@dataclass(frozen=True, slots=True)
class Recipient:
    address: str  # the envelope recipient as accepted, e.g. "alice@example.org"
    mailbox: str = ""  # validated mailbox name from the users map (local delivery only)
    user: str = ""  # the local user's canonical address (for path templates, e.g. {user})


@dataclass(frozen=True, slots=True)
class StoredMessage:
    path: Path  # the spool file (see module docstring)
    size: int  # bytes in the file
    content_offset: int  # first byte after the Return-Path line
    sender: str  # "" for the null sender <>
    queue_id: str
    received_at: float  # time.time() at end of data
    smtputf8: bool = False
    body_8bit: bool = False


@dataclass(frozen=True, slots=True)
class RecipientResult:
    recipient: Recipient
    status: Status
    code: int
    enhanced: str
    text: str
    # Remote SMTP only: the TLS policy that applied (mta-sts, dane, tls-policy, opportunistic,
    # smarthost) and the last TLS failure toward the destination, for `postier queue show`.
    tls_policy: str = ""
    tls_failure: str = ""

    @property
    def reply_line(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"


def delivered(r: Recipient, text: str = "Delivered") -> RecipientResult:
    return RecipientResult(r, Status.DELIVERED, 250, "2.0.0", text)


def temporary(r: Recipient, text: str, code: int = 451, enhanced: str = "4.3.0") -> RecipientResult:
    return RecipientResult(r, Status.TEMPORARY, code, enhanced, text)


def result_from_error(r: Recipient, exc: DeliveryError) -> RecipientResult:
    """A failure that hit every recipient at once (DNS, connection, greeting)."""
    status = Status.PERMANENT if exc.permanent else Status.TEMPORARY
    return RecipientResult(r, status, exc.code, exc.enhanced, str(exc))


def permanent(r: Recipient, text: str, code: int = 550, enhanced: str = "5.0.0") -> RecipientResult:
    return RecipientResult(r, Status.PERMANENT, code, enhanced, text)


class FileBackend(Protocol):
    """A blocking backend; the caller runs `deliver` in the thread pool."""

    def deliver(
        self, message: StoredMessage, recipients: Sequence[Recipient]
    ) -> list[RecipientResult]: ...


class AsyncBackend(Protocol):
    """A network backend (LMTP, remote SMTP)."""

    async def deliver(
        self, message: StoredMessage, recipients: Sequence[Recipient]
    ) -> list[RecipientResult]: ...
