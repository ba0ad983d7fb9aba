"""The router: at end of data, make every accepted recipient durable, then answer.

Local recipients go to the mailbox backend; remote recipients are committed to the queue.
The 250 is only returned once every copy is on stable storage (fsync'd file and directory).
For a file backend the whole sequence — write the spool file, fsync, deliver, remove the
spool file — is one thread-pool job, so a small message costs a single hop off the loop.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Protocol

from postier import log
from postier.delivery.base import Recipient, RecipientResult, Status, StoredMessage
from postier.policy import LocalTarget, RemoteTarget
from postier.protocol import replies as R
from postier.protocol.address import Address
from postier.protocol.replies import Reply
from postier.spool import SpoolWriter

_LOG = logging.getLogger("postier.router")


class QueueCommit(Protocol):
    """Make the message durable in the queue for `addresses` (blocking, thread pool), or raise
    OSError; `sign=True` asks for the DKIM signature (trusted senders only)."""

    def __call__(
        self, message: StoredMessage, addresses: Sequence[Address], *, sign: bool = False
    ) -> None: ...


QueueNotify = Callable[[str], None]


@dataclass(slots=True)
class Transaction:
    """One mail transaction as the application sees it (the protocol keeps its own)."""

    queue_id: str
    sender: Address | None
    smtputf8: bool = False
    body_8bit: bool = False
    local: list[LocalTarget] = field(default_factory=list)
    remote: list[RemoteTarget] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)  # envelope recipients as accepted
    writer: SpoolWriter | None = None
    # From a sender we vouch for (local listener, AUTH): DKIM-signed when queued. Never mail
    # from the mx listener, or a forged From of our domain would leave with our signature.
    dkim_sign: bool = False

    @property
    def sender_text(self) -> str:
        return str(self.sender) if self.sender else ""


class Router:
    def __init__(
        self,
        backend: object,
        executor: Executor,
        queue_commit: QueueCommit | None = None,
        queue_notify: QueueNotify | None = None,
    ) -> None:
        self.backend = backend
        self.executor = executor
        self.queue_commit = queue_commit
        self.queue_notify = queue_notify
        deliver = getattr(backend, "deliver", None)
        self._async_backend = deliver is not None and inspect.iscoroutinefunction(deliver)

    def _stored(self, txn: Transaction) -> StoredMessage:
        writer = txn.writer
        assert writer is not None
        return StoredMessage(
            path=writer.path,
            size=writer.size,
            content_offset=writer.content_offset,
            sender=txn.sender_text,
            queue_id=txn.queue_id,
            received_at=time.time(),
            smtputf8=txn.smtputf8,
            body_8bit=txn.body_8bit,
        )

    @staticmethod
    def _recipients(txn: Transaction) -> list[Recipient]:
        return [t.recipient() for t in txn.local]

    def _blocking_finish(
        self, txn: Transaction
    ) -> tuple[StoredMessage, list[RecipientResult], bool]:
        writer = txn.writer
        assert writer is not None
        writer.finish()
        message = self._stored(txn)
        results: list[RecipientResult] = []
        queued = bool(txn.remote)
        if txn.remote:
            assert self.queue_commit is not None
            self.queue_commit(message, [t.address for t in txn.remote], sign=txn.dkim_sign)
        if txn.local and not self._async_backend:
            results = self.backend.deliver(message, self._recipients(txn))  # type: ignore[attr-defined]
            results, requeued = self._queue_failures(message, results, bool(txn.remote))
            queued = queued or requeued
        if not self._async_backend:
            # Every copy is made (hard links or queue): the spool name can go now, in this
            # same thread-pool job, which saves a second hop per message.
            writer.discard()
        return message, results, queued

    def _queue_failures(
        self, message: StoredMessage, results: list[RecipientResult], remote: bool
    ) -> tuple[list[RecipientResult], bool]:
        """Local recipients that did not get their copy go to the queue (blocking).

        The message is then accepted (250) like one for a remote recipient: the scheduler
        retries temporary failures with back-off and bounces permanent ones (and expired
        ones) to the sender. A permanent failure is only queued when some other recipient
        was served; when every recipient failed permanently the client gets the 5xx itself.
        Only when the queue cannot take the message either does the client get 451 — and
        then no recipient has a copy yet, so its retry produces no duplicate.
        """
        served = remote or any(r.status is Status.DELIVERED for r in results)

        def must_queue(r: RecipientResult) -> bool:
            return r.status is Status.TEMPORARY or (served and r.status is Status.PERMANENT)

        failed = [r for r in results if must_queue(r)]
        if not failed or self.queue_commit is None:
            return results, False
        self.queue_commit(message, [r.recipient.address for r in failed])
        return [
            RecipientResult(r.recipient, Status.QUEUED, r.code, r.enhanced, r.text)
            if must_queue(r)
            else r
            for r in results
        ], True

    async def finish(self, txn: Transaction) -> Reply:
        """Store and deliver; the reply for the end of data."""
        loop = asyncio.get_running_loop()
        writer = txn.writer
        assert writer is not None
        try:
            message, results, queued = await loop.run_in_executor(
                self.executor, self._blocking_finish, txn
            )
            if txn.local and self._async_backend:
                deliver: Callable[..., Awaitable[list[RecipientResult]]] = self.backend.deliver  # type: ignore[attr-defined]
                results = await deliver(message, self._recipients(txn))
                # LMTP answers per recipient: some may have their copy already, so the others
                # must not make the client retry the whole message (duplicates).
                results, requeued = await loop.run_in_executor(
                    self.executor, self._queue_failures, message, results, bool(txn.remote)
                )
                queued = queued or requeued
        except OSError as exc:
            _LOG.error(
                "event=store-failed %s",
                log.fields(qid=txn.queue_id, error=exc.strerror or type(exc).__name__),
            )
            await loop.run_in_executor(self.executor, writer.discard)
            return R.STORAGE_FAILED
        if self._async_backend:
            await loop.run_in_executor(self.executor, writer.discard)
        for r in results:
            _LOG.info(
                "event=delivery %s",
                log.fields(
                    qid=txn.queue_id,
                    to=r.recipient.address,
                    mailbox=r.recipient.mailbox,
                    status=r.status.value,
                    reply=r.reply_line,
                ),
            )
        if queued and self.queue_notify is not None:
            self.queue_notify(txn.queue_id)
        if any(r.status not in (Status.DELIVERED, Status.QUEUED) for r in results):
            if all(r.status is Status.PERMANENT for r in results) and not txn.remote:
                first = results[0]
                return Reply(554, "5.3.0", f"Delivery failed: {first.text}")
            # The queue could not take the failed ones: no copy was kept for them (file
            # backends are all-or-nothing), so the client's retry is the safe course.
            return R.STORAGE_FAILED
        return R.queued(txn.queue_id)
