"""The check interface and the chain that runs it.

Every stage method is a coroutine, so a check may wait on DNS or HTTP in the event loop;
blocking work (reading a spooled file) goes to the thread pool from inside the check. A
stage without checks costs nothing: `CheckChain` sorts the checks into per-stage tuples
once, and the inbound handler skips an empty one without a call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from postier.delivery.base import StoredMessage
from postier.inbound.peer import Peer
from postier.inbound.transaction import Transaction
from postier.protocol.address import Address
from postier.protocol.replies import Reply


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a check decided. Without `reply` the transaction goes on."""

    reply: Reply | None = None  # a refusal (4xx or 5xx) for the command or the message
    reason: str = ""  # why, for the log line
    check: str = ""  # the refusing check's name (the chain fills it in)
    # End of data only, LF-terminated header lines (the spool format):
    trace_fields: bytes = b""  # right below Return-Path, above our Received (RFC 8601 §4)
    fields: bytes = b""  # below our Received: fields of the message itself (RFC 6409 §8)
    remove_fields: frozenset[bytes] = frozenset()  # lower-case names dropped from the message
    spam: bool = False  # a filter's verdict: Maildir recipients with a .Junk folder get it there

    @property
    def refused(self) -> bool:
        return self.reply is not None


ACCEPT = Verdict()


def refuse(reply: Reply, reason: str) -> Verdict:
    return Verdict(reply=reply, reason=reason)


class ReceivedMessage(Protocol):
    """The message at end of data, for the checks of that stage."""

    @property
    def header_names(self) -> frozenset[bytes]:
        """Lower-case names of the fields in the message's header section."""
        ...

    @property
    def received_count(self) -> int:
        """`Received:` fields in the message's own header section (hops so far)."""
        ...

    async def stored(self) -> StoredMessage:
        """The complete spool file, to read (written on first call, in the thread pool).

        Not yet fsync'd: that happens once, when the message is stored. Header lines a
        verdict adds later are still written into it before delivery.
        """
        ...


class Check(Protocol):
    """Any check: a name for the log, and one or more of the stage methods below."""

    name: str


@runtime_checkable
class ConnectCheck(Protocol):
    name: str

    async def at_connect(self, peer: Peer) -> Verdict: ...


@runtime_checkable
class MailCheck(Protocol):
    name: str

    async def at_mail(self, txn: Transaction) -> Verdict: ...


@runtime_checkable
class RcptCheck(Protocol):
    """Runs after the recipient policy accepted `rcpt` (only real recipients get here)."""

    name: str

    async def at_rcpt(self, txn: Transaction, rcpt: Address) -> Verdict: ...


@runtime_checkable
class RefusedRcptCheck(Protocol):
    """Runs when the recipient policy refused `rcpt` (unknown user, relaying denied).

    A check that would refuse this client for any recipient (a listed or greylisted client)
    answers instead of the policy, so its reply is the same for an existing and a missing
    recipient and does not tell an outsider which addresses exist.
    """

    name: str

    async def at_refused_rcpt(self, txn: Transaction, rcpt: Address) -> Verdict: ...


@runtime_checkable
class EndOfDataCheck(Protocol):
    name: str

    async def at_end_of_data(self, txn: Transaction, message: ReceivedMessage) -> Verdict: ...


class CheckChain:
    """The checks of one listener, in order; the first refusal of a stage wins."""

    def __init__(self, checks: Sequence[Check]) -> None:
        self.checks = tuple(checks)
        self.connect = tuple(c for c in self.checks if isinstance(c, ConnectCheck))
        self.mail = tuple(c for c in self.checks if isinstance(c, MailCheck))
        self.rcpt = tuple(c for c in self.checks if isinstance(c, RcptCheck))
        self.refused_rcpt = tuple(c for c in self.checks if isinstance(c, RefusedRcptCheck))
        self.end_of_data = tuple(c for c in self.checks if isinstance(c, EndOfDataCheck))
        staged = {
            id(c)
            for c in self.connect + self.mail + self.rcpt + self.refused_rcpt + self.end_of_data
        }
        for check in self.checks:
            if id(check) not in staged:
                raise TypeError(f"check {check.name!r} implements no stage method")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.checks)

    async def at_connect(self, peer: Peer) -> Verdict:
        return await _first_refusal((c, c.at_connect(peer)) for c in self.connect)

    async def at_mail(self, txn: Transaction) -> Verdict:
        return await _first_refusal((c, c.at_mail(txn)) for c in self.mail)

    async def at_rcpt(self, txn: Transaction, rcpt: Address) -> Verdict:
        return await _first_refusal((c, c.at_rcpt(txn, rcpt)) for c in self.rcpt)

    async def at_refused_rcpt(self, txn: Transaction, rcpt: Address) -> Verdict:
        return await _first_refusal((c, c.at_refused_rcpt(txn, rcpt)) for c in self.refused_rcpt)

    async def at_end_of_data(self, txn: Transaction, message: ReceivedMessage) -> Verdict:
        """The first refusal, else every accepting check's header lines, in chain order."""
        trace: list[bytes] = []
        fields: list[bytes] = []
        remove: set[bytes] = set()
        spam = False
        for check in self.end_of_data:
            verdict = await check.at_end_of_data(txn, message)
            if verdict.refused:
                return dataclasses.replace(verdict, check=check.name)
            trace.append(verdict.trace_fields)
            fields.append(verdict.fields)
            remove |= verdict.remove_fields
            spam = spam or verdict.spam
        if not any(trace) and not any(fields) and not remove and not spam:
            return ACCEPT
        return Verdict(
            trace_fields=b"".join(trace),
            fields=b"".join(fields),
            remove_fields=frozenset(remove),
            spam=spam,
        )


async def _first_refusal(calls: Iterator[tuple[Check, Awaitable[Verdict]]]) -> Verdict:
    """Await a stage's checks in order (lazily: each call is made only when its turn comes)
    and return the first refusal, named after its check, or ACCEPT."""
    for check, pending in calls:
        verdict = await pending
        if verdict.refused:
            return dataclasses.replace(verdict, check=check.name)
    return ACCEPT
