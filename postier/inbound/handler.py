"""The inbound handler: protocol events in, decisions out, one transaction at a time.

The asyncio session feeds every application event of `ServerConnection` here and applies
the answer: `None` accepts with the protocol's default reply, a positive `Reply` accepts
with that text, any other `Reply` refuses. Nothing here touches a socket, so a test drives
it with events alone. Its I/O goes through what it is given: the thread pool for the spool
file, a `MessageStore` (the router) for the finished message.

The transaction's life is the protocol's to tell: it starts with an accepted MAIL and ends
with `TransactionEnded`, whatever the reason (end of data, RSET, EHLO, STARTTLS, close).
`on_transaction_ended` is the one place where a transaction's spool file is let go.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from postier.checks.base import CheckChain
from postier.delivery.base import StoredMessage
from postier.inbound.delivered_to import delivered_to_for
from postier.inbound.header_scan import DropField
from postier.inbound.peer import Peer
from postier.inbound.received import trace_headers, with_protocol
from postier.inbound.transaction import Transaction
from postier.policy import Policy, Rejection
from postier.protocol import replies as R
from postier.protocol.events import (
    DataChunk,
    DataRejected,
    EndOfData,
    EndReason,
    Hello,
    Mail,
    Rcpt,
    TransactionEnded,
)
from postier.protocol.replies import Reply
from postier.protocol.state import Session
from postier.queue.ids import new_queue_id
from postier.spool import SpoolWriter

# None accepts the command with the protocol's default reply.
Decision = Reply | None


class MessageStore(Protocol):
    """Makes a finished message durable for every accepted recipient (the router)."""

    async def finish(self, txn: Transaction) -> Reply: ...


class ProtocolState(Protocol):
    """Where the protocol keeps the session state (HELO, TLS, AUTH): `ServerConnection`."""

    @property
    def session(self) -> Session: ...


@dataclass(frozen=True, slots=True)
class InboundSettings:
    """What one listener's inbound side needs from the configuration."""

    hostname: str
    spool_dir: Path
    relay_without_auth: bool  # the listener's role may relay without AUTH
    received_auth_user: bool  # name the SASL user in our Received header
    # Removes header fields of the incoming message as it is spooled (mx: an
    # Authentication-Results that claims our host name, RFC 8601 §5).
    drop_field: DropField | None = None


class InboundHandler:
    __slots__ = ("checks", "executor", "peer", "policy", "protocol", "settings", "store", "txn")

    def __init__(
        self,
        peer: Peer,
        protocol: ProtocolState,
        settings: InboundSettings,
        policy: Policy,
        checks: CheckChain,
        store: MessageStore,
        executor: Executor,
    ) -> None:
        self.peer = peer
        self.protocol = protocol
        self.settings = settings
        self.policy = policy
        self.checks = checks
        self.store = store
        self.executor = executor
        self.txn: Transaction | None = None

    # ---- commands ----------------------------------------------------------------------
    async def on_connect(self) -> Decision:
        """Before the greeting: a refusal replaces it, and the connection closes."""
        if not self.checks.connect:
            return None
        verdict = await self.checks.at_connect(self.peer)
        if verdict.reply is None:
            return None
        self.peer.log(
            "connect-refused",
            ip=self.peer.ip,
            check=verdict.check,
            reason=verdict.reason,
            reply=verdict.reply,
        )
        return verdict.reply

    def on_hello(self, event: Hello) -> Decision:
        self.peer.log("helo", helo=event.name, esmtp=event.extended)
        return None

    async def on_mail(self, event: Mail) -> Decision:
        txn = Transaction(
            queue_id=new_queue_id(),
            sender=event.sender,
            smtputf8=event.smtputf8,
            body_8bit=event.body in ("8BITMIME", "BINARYMIME"),
            size_hint=event.size,
            auth_user=self.protocol.session.auth_user,
            dsn=event.dsn,
            client_ip=self.peer.ip,
            helo=self.protocol.session.helo or "",
            requiretls="REQUIRETLS" in event.params,
        )
        txn.dkim_sign = self.settings.relay_without_auth or txn.auth_user is not None
        if self.checks.mail:
            verdict = await self.checks.at_mail(txn)
            if verdict.reply is not None:
                self.peer.log(
                    "mail-rejected",
                    logging.WARNING if verdict.reply.is_transient else logging.INFO,
                    sender=f"<{txn.sender_text}>",
                    user=txn.auth_user,
                    check=verdict.check,
                    reason=verdict.reason,
                    reply=verdict.reply,
                )
                return verdict.reply
        self.txn = txn
        self.peer.log(
            "mail",
            qid=txn.queue_id,
            sender=f"<{txn.sender_text}>",
            size=event.size,
            requiretls=txn.requiretls or None,
        )
        return None

    async def on_rcpt(self, event: Rcpt) -> Decision:
        txn = self._current()
        rcpt = str(event.recipient)
        may_relay = self.settings.relay_without_auth or txn.auth_user is not None
        decision = self.policy.check_recipient(event.recipient, may_relay=may_relay)
        if isinstance(decision, Rejection):
            reply = decision.reply
            if self.checks.refused_rcpt:  # a client refused anyway must not learn who exists
                verdict = await self.checks.at_refused_rcpt(txn, event.recipient)
                reply = verdict.reply or reply
            self.peer.log("rcpt-rejected", qid=txn.queue_id, to=f"<{rcpt}>", reply=reply)
            return reply
        if self.checks.rcpt:
            verdict = await self.checks.at_rcpt(txn, event.recipient)
            if verdict.reply is not None:
                self.peer.log(
                    "rcpt-rejected",
                    qid=txn.queue_id,
                    to=f"<{rcpt}>",
                    check=verdict.check,
                    reason=verdict.reason,
                    reply=verdict.reply,
                )
                return verdict.reply
        txn.add_targets(rcpt, decision, event.dsn)
        self.peer.log("rcpt", qid=txn.queue_id, to=f"<{rcpt}>")
        return None

    def on_data(self) -> Decision:
        txn = self._current()
        session = self.protocol.session
        settings = self.settings
        header = trace_headers(
            sender=txn.sender_text,
            helo=session.helo or "unknown",
            rdns=self.peer.rdns or "unknown",
            ip=self.peer.ip,
            hostname=settings.hostname,
            protocol=with_protocol(
                esmtp=session.esmtp,
                tls=session.tls,
                auth=txn.auth_user is not None,
                smtputf8=txn.smtputf8,
            ),
            queue_id=txn.queue_id,
            recipients=txn.accepted,
            tls_info=self.peer.tls_info,
            auth_user=(txn.auth_user or "") if settings.received_auth_user else "",
        )
        txn.writer = SpoolWriter(
            settings.spool_dir,
            txn.queue_id,
            header,
            scan_headers=bool(self.checks.end_of_data),
            drop_field=settings.drop_field,
            delivered_to=delivered_to_for(txn.local),
        )
        return None

    # ---- content -----------------------------------------------------------------------
    async def on_chunk(self, event: DataChunk) -> None:
        writer = self._current().writer
        if writer is None or writer.failed:
            return  # after a failed write the rest is read and dropped; the end answers 451
        if writer.add(event.data):
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(self.executor, writer.flush)
            except OSError as exc:
                # Keep reading to the end of data; the failure is reported there.
                self.peer.log("spool-write-failed", logging.ERROR, qid=writer.queue_id, error=exc)
                writer.failed = True

    async def on_end_of_data(self, event: EndOfData) -> Reply:
        """Run the end-of-data checks, then store: the reply for the whole message."""
        txn = self._current()
        writer = txn.writer
        assert writer is not None
        reply: Reply | None = R.STORAGE_FAILED if writer.failed else None
        if reply is None and self.checks.end_of_data:
            reply = await self._end_of_data_checks(txn, writer)
        if reply is None:
            reply = await self.store.finish(txn)
        self.peer.log(
            "message",
            qid=txn.queue_id,
            sender=f"<{txn.sender_text}>",
            nrcpt=len(txn.accepted),
            size=event.size,
            result=reply.code,
            reply=reply,
        )
        return reply

    async def _end_of_data_checks(self, txn: Transaction, writer: SpoolWriter) -> Reply | None:
        message = _SpooledMessage(txn, writer, self.executor)
        try:
            verdict = await self.checks.at_end_of_data(txn, message)
        except OSError as exc:  # finishing the spool file for a check failed
            self.peer.log("spool-write-failed", logging.ERROR, qid=txn.queue_id, error=exc)
            return R.STORAGE_FAILED
        if verdict.reply is not None:
            self.peer.log(
                "message-refused",
                qid=txn.queue_id,
                check=verdict.check,
                reason=verdict.reason,
                reply=verdict.reply,
            )
            return verdict.reply
        if verdict.remove_fields:
            writer.remove_fields(lambda name, _field: name in verdict.remove_fields)
        txn.spam = verdict.spam
        writer.add_header_lines(verdict.trace_fields, above_received=True)
        writer.add_header_lines(verdict.fields)
        added = verdict.trace_fields.count(b"\n") + verdict.fields.count(b"\n")
        if added:
            self.peer.log("headers-added", qid=txn.queue_id, added=added)
        return None

    def on_data_rejected(self, event: DataRejected) -> None:
        """The protocol refused the message (too big, bare CR/LF); its reply is sent."""
        txn = self.txn
        self.peer.log(
            "message-rejected",
            logging.WARNING,
            qid=txn.queue_id if txn else None,
            ip=self.peer.ip,
            reply=event.reply,
        )

    # ---- the end of a transaction ------------------------------------------------------
    async def on_transaction_ended(self, event: TransactionEnded) -> None:
        """The one place a transaction is let go, with its spool file (if any is left)."""
        txn, self.txn = self.txn, None
        if txn is None:  # pragma: no cover - the protocol only opens what MAIL's accept opened
            return
        if event.reason not in (EndReason.ACCEPTED, EndReason.REJECTED):
            # End of data logged its own line ("message", "message-rejected").
            self.peer.log(
                "transaction-reset",
                qid=txn.queue_id,
                reason=event.reason.value,
                detail=event.detail or None,
            )
        writer = txn.writer
        if writer is None:
            return
        if writer.on_disk:
            await asyncio.get_running_loop().run_in_executor(self.executor, writer.discard)
        else:
            writer.discard()  # nothing on disk (or the router removed it): no thread hop

    def _current(self) -> Transaction:
        if self.txn is None:
            raise RuntimeError("no transaction: the protocol only asks inside one")
        return self.txn


class _SpooledMessage:
    """`ReceivedMessage` for the end-of-data checks: the spool file finished on demand."""

    __slots__ = ("_executor", "_stored", "_txn", "_writer")

    def __init__(self, txn: Transaction, writer: SpoolWriter, executor: Executor) -> None:
        self._txn = txn
        self._writer = writer
        self._executor = executor
        self._stored: StoredMessage | None = None

    @property
    def header_names(self) -> frozenset[bytes]:
        return self._writer.header_names

    @property
    def received_count(self) -> int:
        return self._writer.received_count

    async def stored(self) -> StoredMessage:
        if self._stored is None:
            writer = self._writer
            # Readable for the checks (in memory when small); fsync'd once, when stored.
            await asyncio.get_running_loop().run_in_executor(self._executor, writer.complete)
            txn = self._txn
            self._stored = StoredMessage(
                path=writer.readable_path,
                size=writer.readable_size,
                content_offset=writer.content_offset,
                sender=txn.sender_text,
                queue_id=txn.queue_id,
                received_at=time.time(),
                smtputf8=txn.smtputf8,
                body_8bit=txn.body_8bit,
            )
        return self._stored
