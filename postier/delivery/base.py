"""The one delivery interface every backend shares (docs/architecture.md).

A backend takes a message already stored durably in the spool and a list of recipients, and
returns one result per recipient: delivered, temporary failure or permanent failure, each with
the reply text that explains it. File backends (maildir, mbox, spool) are synchronous and run
in the bounded thread pool; network backends (lmtp, smtp) are coroutines.

The contract is declared here, so callers never inspect a backend:
- `FileBackend` / `NetworkBackend`: the two kinds of `deliver`. `delivery.factory.make_backend`
  returns the local one tagged with its kind (`FileDelivery` or `NetworkDelivery`), and the
  router chooses its strategy from that tag once, at construction.
- `Relay` / `RelaySession`: a network backend that carries many messages over one
  connection (SmtpRelay), and that connection. The queue's scheduler talks to sessions only;
  `open_session` gives a backend without connection reuse one `SingleAttempt` per session.

The spool file format (written by `postier.spool`): LF line endings, starting with the line
`Return-Path: <sender>\\n`, then our `Received:` header, then the message exactly as received
(dot-unstuffed, CRLF turned into LF). `content_offset` is where the part after Return-Path
begins: consumers that must not include Return-Path (queue, LMTP, SMTP) start there.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import Executor
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from postier.errors import DeliveryError
from postier.protocol.dsn import NO_MAIL_DSN, MailDsn, RcptDsn


class Status(enum.Enum):
    """Where a recipient stands: one vocabulary for backends, the router and the queue.

    A backend answers DELIVERED, TEMPORARY or PERMANENT. QUEUED is never a backend answer: it
    is the router's mark for a copy it handed to the queue, and the queue's state of a
    recipient still waiting for an attempt (shown as "pending"). In the queue, PERMANENT is
    a recipient given up on (bounced or expired): final, like DELIVERED.
    """

    DELIVERED = "delivered"
    TEMPORARY = "temporary"
    PERMANENT = "permanent"
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
    # From a sender we vouch for (local listener, AUTH, sendmail): DKIM-signed at queue commit.
    # Mail received on mx never is, even when an alias forwards it: a forged From of our
    # domain must not leave with a valid signature of ours.
    dkim_sign: bool = False
    # DSN (RFC 3461): RET/ENVID, and NOTIFY/ORCPT per recipient address (as delivered to).
    envelope_dsn: MailDsn = NO_MAIL_DSN
    recipient_dsn: Mapping[str, RcptDsn] = field(default_factory=dict, compare=False)
    # A content filter called it spam: a Maildir++ mailbox with a .Junk folder gets it there.
    spam: bool = False
    # MAIL FROM ... REQUIRETLS (RFC 8689): relay only over verified TLS to a hop that offers it.
    requiretls: bool = False
    # The bytes after `content_offset` when the spool writer still had them in memory (a
    # small message): the queue's commit passes them to the first relay attempt instead of
    # reading the file back. None: read the file.
    content: bytes | None = field(default=None, compare=False, repr=False)


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
    # The next hop took our DSN parameters (it advertised DSN): success reports are its job.
    dsn_passed: bool = False

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
    """A blocking backend (Maildir, mbox, numbered spool); callers run it in the thread pool.

    Blocking is part of the contract, not a detail: the router runs the whole end of data
    (spool fsync, queue commit, delivery, spool removal) as one thread-pool job for it.
    """

    def deliver(
        self, message: StoredMessage, recipients: Sequence[Recipient]
    ) -> list[RecipientResult]: ...


class NetworkBackend(Protocol):
    """A backend that talks to a server (LMTP, remote SMTP): a coroutine on the loop."""

    async def deliver(
        self, message: StoredMessage, recipients: Sequence[Recipient]
    ) -> list[RecipientResult]: ...


class RelaySession(Protocol):
    """One connection to one destination, carrying several messages in turn.

    `host` names the server of the last attempt ("" before one, or when not known);
    `connected` says whether a connection stands after the last `send`. The scheduler reads
    both: the first for the queue's record, the second to tell "that destination is down"
    (no connection) from "it answered 4xx to every recipient".
    """

    @property
    def host(self) -> str: ...

    @property
    def connected(self) -> bool: ...

    async def send(
        self, message: StoredMessage, recipients: Sequence[Recipient]
    ) -> list[RecipientResult]: ...


@runtime_checkable
class Relay(NetworkBackend, Protocol):
    """A network backend that can keep a connection open for many messages (SmtpRelay)."""

    def session(self, domain: str) -> AbstractAsyncContextManager[RelaySession]: ...


DeliverFn = Callable[[StoredMessage, Sequence[Recipient]], Awaitable[list[RecipientResult]]]


class SingleAttempt:
    """A backend without connection reuse seen as a `RelaySession`: each send stands alone.

    Nothing says whether a connection stood, so `connected` is False and an attempt where
    every recipient failed temporarily counts as a destination that is down.
    """

    host = ""
    connected = False

    def __init__(self, deliver: DeliverFn) -> None:
        self._deliver = deliver

    async def send(
        self, message: StoredMessage, recipients: Sequence[Recipient]
    ) -> list[RecipientResult]:
        return await self._deliver(message, recipients)

    async def __aenter__(self) -> SingleAttempt:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None


def open_session(backend: NetworkBackend, domain: str) -> AbstractAsyncContextManager[RelaySession]:
    """A session to `domain`: the relay's own when it reuses connections, else one attempt."""
    if isinstance(backend, Relay):
        return backend.session(domain)
    return SingleAttempt(backend.deliver)


@dataclass(frozen=True, slots=True)
class FileDelivery:
    """Local delivery through a blocking file backend (the kind is known where it is made)."""

    backend: FileBackend

    async def deliver(
        self, executor: Executor, message: StoredMessage, recipients: Sequence[Recipient]
    ) -> list[RecipientResult]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor, self.backend.deliver, message, recipients)


@dataclass(frozen=True, slots=True)
class NetworkDelivery:
    """Local delivery through a network backend (LMTP)."""

    backend: NetworkBackend

    async def deliver(
        self, executor: Executor, message: StoredMessage, recipients: Sequence[Recipient]
    ) -> list[RecipientResult]:
        return await self.backend.deliver(message, recipients)


# What `make_backend` returns: the backend tagged with its kind, so the router and the queue
# choose their strategy once, by type, instead of inspecting the object.
LocalDelivery = FileDelivery | NetworkDelivery
