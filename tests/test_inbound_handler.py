"""The inbound handler driven by protocol events alone: no socket, no session, no daemon.

Its I/O is real: a thread pool, the spool directory, and the router with a Maildir backend.
The events are the ones `ServerConnection` produces; the protocol's session state (HELO,
AUTH) is a plain `Session`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from postier.checks.chain import checks_for_role
from postier.checks.disk import FreeSpace
from postier.delivery.base import FileDelivery
from postier.delivery.maildir import MaildirBackend
from postier.inbound.handler import InboundHandler, InboundSettings
from postier.inbound.peer import Peer
from postier.net.roles import MX, SUBMISSION, Role
from postier.policy import LocalUser, Policy
from postier.protocol import replies as R
from postier.protocol.address import Address
from postier.protocol.events import (
    DataChunk,
    DataRejected,
    EndOfData,
    EndReason,
    Mail,
    Rcpt,
    TransactionEnded,
)
from postier.protocol.state import Session
from postier.router import Router


@dataclass
class ProtocolState:
    session: Session = field(default_factory=lambda: Session(helo="client.example", esmtp=True))


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(2)
    yield pool
    pool.shutdown()


def make(
    tmp_path: Path, executor: ThreadPoolExecutor, role: Role = MX, auth_user: str | None = None
) -> InboundHandler:
    policy = Policy(["example.org"], {"bob@example.org": LocalUser("bob@example.org", "bob")})
    state = ProtocolState()
    state.session.auth_user = auth_user
    return InboundHandler(
        Peer(session_id="t1", ip="192.0.2.7", port=4000, listener=role.name),
        state,
        InboundSettings(
            hostname="mx.test",
            spool_dir=tmp_path / "spool",
            relay_without_auth=role.relay_without_auth,
            received_auth_user=False,
        ),
        policy,
        checks_for_role(role, policy=policy, free_space=FreeSpace(tmp_path, 0), hostname="mx.test"),
        Router(FileDelivery(MaildirBackend(tmp_path / "mail", "mx.test")), executor),
        executor,
    )


def mail(sender: str = "alice@example.net", size: int | None = None) -> Mail:
    local, _, domain = sender.partition("@")
    return Mail(sender=Address(local, domain), size=size, body=None, smtputf8=False)


def rcpt(address: str) -> Rcpt:
    local, _, domain = address.partition("@")
    return Rcpt(recipient=Address(local, domain))


def delivered(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "mail" / "bob" / "new").glob("*"))


def spool_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "spool").glob("*")) if (tmp_path / "spool").exists() else []


def test_a_message_from_mail_to_transaction_end(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    async def run() -> None:
        h = make(tmp_path, executor)
        assert await h.on_mail(mail()) is None
        assert await h.on_rcpt(rcpt("nobody@example.org")) == R.NO_SUCH_USER
        assert await h.on_rcpt(rcpt("bob@example.org")) is None
        assert h.on_data() is None
        await h.on_chunk(DataChunk(b"Subject: hi\r\n\r\nhello\r\n"))
        reply = await h.on_end_of_data(EndOfData(size=22))
        assert reply.code == 250
        await h.on_transaction_ended(TransactionEnded(EndReason.ACCEPTED))
        assert h.txn is None

    asyncio.run(run())
    [msg] = delivered(tmp_path)
    data = msg.read_bytes()
    assert data.startswith(b"Return-Path: <alice@example.net>\nReceived: from client.example")
    assert data.endswith(b"Subject: hi\n\nhello\n")
    assert spool_files(tmp_path) == []


@pytest.mark.parametrize("reason", [EndReason.RSET, EndReason.HELLO, EndReason.CLOSED])
def test_an_abandoned_transaction_loses_its_spool_file_and_says_why(
    tmp_path: Path,
    executor: ThreadPoolExecutor,
    caplog: pytest.LogCaptureFixture,
    reason: EndReason,
) -> None:
    async def run() -> None:
        h = make(tmp_path, executor)
        await h.on_mail(mail())
        await h.on_rcpt(rcpt("bob@example.org"))
        h.on_data()
        await h.on_chunk(DataChunk(b"Subject: big\r\n\r\n" + b"y" * 998 + b"\r\n"))
        for _ in range(300):  # > 256 KiB: flushed to the spool file
            await h.on_chunk(DataChunk(b"z" * 998 + b"\r\n"))
        assert len(spool_files(tmp_path)) == 1
        await h.on_transaction_ended(TransactionEnded(reason, "peer closed"))

    with caplog.at_level(logging.INFO, logger="postier"):
        asyncio.run(run())
    assert spool_files(tmp_path) == []
    assert delivered(tmp_path) == []
    assert "event=transaction-reset" in caplog.text and f"reason={reason.value}" in caplog.text


def test_a_message_the_protocol_refused_is_forgotten(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    async def run() -> None:
        h = make(tmp_path, executor)
        await h.on_mail(mail())
        await h.on_rcpt(rcpt("bob@example.org"))
        h.on_data()
        await h.on_chunk(DataChunk(b"x" * 998 + b"\r\n"))
        h.on_data_rejected(DataRejected(R.BAD_LINE_ENDINGS))
        await h.on_transaction_ended(TransactionEnded(EndReason.REJECTED))

    asyncio.run(run())
    assert spool_files(tmp_path) == [] and delivered(tmp_path) == []


def test_large_submission_gets_message_id_and_date(
    tmp_path: Path, executor: ThreadPoolExecutor, caplog: pytest.LogCaptureFixture
) -> None:
    async def run() -> None:
        h = make(tmp_path, executor, SUBMISSION, auth_user="alice@example.org")
        assert await h.on_mail(mail("alice@example.org")) is None
        await h.on_rcpt(rcpt("bob@example.org"))
        h.on_data()
        await h.on_chunk(DataChunk(b"From: <alice@example.org>\r\nSubject: big\r\n\r\n"))
        for _ in range(300):
            await h.on_chunk(DataChunk(b"b" * 998 + b"\r\n"))
        assert (await h.on_end_of_data(EndOfData(size=300_000))).code == 250
        await h.on_transaction_ended(TransactionEnded(EndReason.ACCEPTED))

    with caplog.at_level(logging.INFO, logger="postier"):
        asyncio.run(run())
    [msg] = delivered(tmp_path)
    head = msg.read_bytes().split(b"\n\n", 1)[0]
    assert b"\nMessage-ID: <" in head and b"\nDate: " in head
    assert "event=headers-added" in caplog.text and "added=2" in caplog.text


def test_submission_sender_must_be_owned(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    async def run() -> None:
        h = make(tmp_path, executor, SUBMISSION, auth_user="alice@example.org")
        reply = await h.on_mail(mail("bob@example.org"))
        assert reply is not None and reply.code == 553
        assert h.txn is None  # refused: no transaction was opened

    asyncio.run(run())
