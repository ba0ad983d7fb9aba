"""The chain of inbound checks: its order is the list's, the first refusal wins, and a
stage without checks is skipped. The checks are the real ones (the disk check is made to
see a full disk by asking for more free space than any disk has)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from postier.checks.base import ACCEPT, CheckChain, ReceivedMessage, Verdict, refuse
from postier.checks.chain import checks_for_role
from postier.checks.disk import FreeSpace, LowDiskSpace
from postier.checks.sender import SenderOwnership
from postier.checks.submission import SubmissionHeaders
from postier.inbound.handler import InboundHandler, InboundSettings
from postier.inbound.peer import Peer
from postier.inbound.transaction import Transaction
from postier.net.roles import LOCAL, MX, SUBMISSION
from postier.policy import Policy
from postier.protocol import replies as R
from postier.protocol.address import Address
from postier.protocol.replies import Reply
from postier.protocol.state import Session

POLICY = Policy(["example.org"], {})
FULL_DISK = FreeSpace(Path("."), minimum=2**62)
ROOMY_DISK = FreeSpace(Path("."), minimum=0)


def txn(sender: str = "bob@example.org", user: str | None = "alice@example.org") -> Transaction:
    local, _, domain = sender.partition("@")
    return Transaction(queue_id="Q1", sender=Address(local, domain), auth_user=user)


def test_first_refusal_wins_in_list_order() -> None:
    owner, disk = SenderOwnership(POLICY), LowDiskSpace(FULL_DISK)

    async def first(chain: CheckChain) -> Verdict:
        return await chain.at_mail(txn())

    v = asyncio.run(first(CheckChain([owner, disk])))
    assert v.check == "sender-ownership" and v.reply is not None and v.reply.code == 553
    v = asyncio.run(first(CheckChain([disk, owner])))
    assert v.check == "low-disk" and v.reply == R.LOW_DISK


def test_all_accept() -> None:
    chain = CheckChain([SenderOwnership(POLICY), LowDiskSpace(ROOMY_DISK)])
    assert asyncio.run(chain.at_mail(txn("alice@example.org"))) is ACCEPT
    assert asyncio.run(chain.at_mail(txn(user=None))) is ACCEPT  # not an authenticated session


def test_stages_are_sorted_once_and_empty_ones_stay_empty() -> None:
    chain = checks_for_role(MX, policy=POLICY, free_space=ROOMY_DISK, hostname="mx.test")
    assert chain.names == ("low-disk", "hops")
    assert chain.mail and not chain.connect and not chain.rcpt and len(chain.end_of_data) == 1
    sub = checks_for_role(SUBMISSION, policy=POLICY, free_space=ROOMY_DISK, hostname="mx.test")
    assert sub.names == ("sender-ownership", "low-disk", "submission-headers", "hops")
    assert len(sub.mail) == 2 and len(sub.end_of_data) == 2
    local = checks_for_role(LOCAL, policy=POLICY, free_space=ROOMY_DISK, hostname="mx.test")
    assert local.names == ("low-disk", "hops")


def test_a_check_without_a_stage_is_refused() -> None:
    class Nothing:
        name = "nothing"

    with pytest.raises(TypeError, match="nothing"):
        CheckChain([Nothing()])


class _Headers:
    """The `ReceivedMessage` of a message whose header section has these field names."""

    def __init__(self, *names: bytes) -> None:
        self.header_names = frozenset(names)

    async def stored(self):  # type: ignore[no-untyped-def]
        raise AssertionError("submission headers never need the file")


def test_end_of_data_headers_are_collected() -> None:
    chain = CheckChain([SubmissionHeaders("mx.test")])
    message: ReceivedMessage = _Headers(b"from", b"date")
    v = asyncio.run(chain.at_end_of_data(txn("alice@example.org"), message))
    assert not v.refused and v.fields == b"Message-ID: <Q1@mx.test>\n" and v.trace_fields == b""
    both = _Headers(b"message-id", b"date")
    assert asyncio.run(chain.at_end_of_data(txn("alice@example.org"), both)) is ACCEPT


class _DocumentationNetwork:
    """A connect-stage check for this test: refuses the RFC 5737 documentation network."""

    name = "doc-net"

    async def at_connect(self, peer: Peer) -> Verdict:
        if peer.ip.startswith("192.0.2."):
            return refuse(Reply(554, "5.7.1", "Not from here"), "documentation address")
        return ACCEPT


def test_connect_stage_refusal_is_sent_instead_of_the_greeting() -> None:
    chain = CheckChain([_DocumentationNetwork(), LowDiskSpace(ROOMY_DISK)])
    assert [c.name for c in chain.connect] == ["doc-net"]

    async def decide(ip: str) -> Reply | None:
        handler = InboundHandler(
            Peer(session_id="t", ip=ip, port=1, listener="mx"),
            _State(),
            InboundSettings("mx.test", Path("."), False, False),
            POLICY,
            chain,
            _NoStore(),
            None,  # type: ignore[arg-type] (nothing at connect runs in the pool)
        )
        return await handler.on_connect()

    refusal = asyncio.run(decide("192.0.2.1"))
    assert refusal is not None and refusal.code == 554
    assert asyncio.run(decide("127.0.0.1")) is None


class _State:
    session = Session()


class _NoStore:
    async def finish(self, txn: Transaction) -> Reply:
        raise AssertionError("nothing is stored at connect")
