"""The router: at end of data, make every accepted recipient durable, then answer.

Local recipients go to the mailbox backend; remote recipients are committed to the queue.
The 250 is only returned once every copy is on stable storage (fsync'd file and directory).

The kind of backend decides the strategy, once, in `Router.__init__`:
- a file backend (`FileDelivery`): the whole sequence (finish the spool file, commit remote
  recipients to the queue, deliver, queue what failed, remove the spool file) is one
  thread-pool job, so a small message costs a single hop off the loop;
- a network backend (`NetworkDelivery`, LMTP): one job to finish and commit, the delivery on
  the loop, one job to queue what failed and remove the spool file.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor

from postier import log
from postier.delivery.base import (
    FileBackend,
    FileDelivery,
    LocalDelivery,
    NetworkBackend,
    Recipient,
    RecipientResult,
    Status,
    StoredMessage,
)
from postier.inbound.transaction import Transaction
from postier.policy import RemoteTarget
from postier.protocol import replies as R
from postier.protocol.address import Address
from postier.protocol.dsn import wants_success
from postier.protocol.replies import Reply
from postier.queue.bounce import SUCCESS_STATUS, DsnRecipient

_LOG = logging.getLogger("postier.router")

# Called with the finished spool message and recipients for the queue (the remote ones, then
# local ones whose copy failed: the second call for a message adds them to its entry); must
# make them durable (blocking, thread pool) and return nothing, or raise OSError.
QueueCommit = Callable[[StoredMessage, Sequence[Address | str]], None]
QueueNotify = Callable[[str], None]
# Blocking: commit a "delivered" DSN (NOTIFY=SUCCESS) about a message still in the spool;
# returns the report's queue id, None when there is nobody to tell (null sender).
QueueReport = Callable[[StoredMessage, Sequence[DsnRecipient]], "str | None"]

# Called with the finished message and the alias targets that forward it to remote addresses:
# queues them under their own entry, with the sender SRS-rewritten (blocking, thread pool).
QueueForward = Callable[[StoredMessage, Sequence[RemoteTarget]], object]
# (results for the local recipients, whether anything went to the queue)
Queued = tuple[list[RecipientResult], bool]
# (the same, and the queue id of a "delivered" report committed for the sender, if any)
Finished = tuple[list[RecipientResult], bool, str | None]


class Router:
    """Makes a finished transaction durable and gives the reply to its end of data."""

    def __init__(
        self,
        backend: LocalDelivery,
        executor: Executor,
        queue_commit: QueueCommit | None = None,
        queue_notify: QueueNotify | None = None,
        queue_report: QueueReport | None = None,
        queue_forward: QueueForward | None = None,
    ) -> None:
        self.backend = backend
        self.executor = executor
        self.queue_commit = queue_commit
        self.queue_notify = queue_notify
        self.queue_report = queue_report
        self.queue_forward = queue_forward
        self._store_and_deliver: Callable[[Transaction], Awaitable[Finished]]
        if isinstance(backend, FileDelivery):
            self._store_and_deliver = functools.partial(self._in_one_job, backend.backend)
        else:
            self._store_and_deliver = functools.partial(self._over_network, backend.backend)

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
            dkim_sign=txn.dkim_sign,
            envelope_dsn=txn.dsn,
            recipient_dsn=txn.recipient_dsn,
            spam=txn.spam,
            requiretls=txn.requiretls,
            content=writer.content if txn.remote else None,  # for the queue's commit alone
        )

    @staticmethod
    def _recipients(txn: Transaction) -> list[Recipient]:
        return [t.recipient() for t in txn.local]

    def _finish_and_commit(self, txn: Transaction) -> StoredMessage:
        """Blocking: the spool file on disk, the remote recipients in the queue."""
        writer = txn.writer
        assert writer is not None
        writer.finish()
        message = self._stored(txn)
        forwards = [t for t in txn.remote if t.forwarded_by] if self.queue_forward else []
        relayed = [t for t in txn.remote if t not in forwards]
        if relayed:
            assert self.queue_commit is not None
            self.queue_commit(message, [t.address for t in relayed])
        if forwards:
            assert self.queue_forward is not None
            self.queue_forward(message, forwards)
        return message

    # ---- the two strategies --------------------------------------------------------------
    async def _in_one_job(self, backend: FileBackend, txn: Transaction) -> Finished:
        return await asyncio.get_running_loop().run_in_executor(
            self.executor, self._blocking_finish, backend, txn
        )

    def _blocking_finish(self, backend: FileBackend, txn: Transaction) -> Finished:
        message = self._finish_and_commit(txn)
        results: list[RecipientResult] = []
        queued = bool(txn.remote)
        if txn.local:
            results = backend.deliver(message, self._recipients(txn))
            results, requeued = self._queue_failures(message, results, bool(txn.remote))
            queued = queued or requeued
        report = self._report_delivered(message, results)
        # Every copy is made (hard links or queue): the spool name can go now, in this same
        # thread-pool job, which saves a second hop per message.
        self._discard(txn)
        return results, queued, report

    async def _over_network(self, backend: NetworkBackend, txn: Transaction) -> Finished:
        loop = asyncio.get_running_loop()
        message = await loop.run_in_executor(self.executor, self._finish_and_commit, txn)
        results: list[RecipientResult] = []
        queued = bool(txn.remote)
        if txn.local:
            results = await backend.deliver(message, self._recipients(txn))
        # LMTP answers per recipient: some may have their copy already, so the others must
        # not make the client retry the whole message (duplicates): they go to the queue.
        results, requeued, report = await loop.run_in_executor(
            self.executor, self._queue_failures_and_discard, txn, message, results
        )
        return results, queued or requeued, report

    def _queue_failures_and_discard(
        self, txn: Transaction, message: StoredMessage, results: list[RecipientResult]
    ) -> Finished:
        results, queued = self._queue_failures(message, results, bool(txn.remote))
        report = self._report_delivered(message, results)
        self._discard(txn)
        return results, queued, report

    def _report_delivered(
        self, message: StoredMessage, results: list[RecipientResult]
    ) -> str | None:
        """Blocking: the "delivered" DSN for local recipients that asked for NOTIFY=SUCCESS.

        It is committed here, before the 250 and while the spool file (whose headers it
        returns) still exists, in the job that already runs. A failure to queue it is logged
        and changes nothing else: the message is delivered, and a 451 would only make the
        client send it again (a duplicate) for the sake of a notice.
        """
        if self.queue_report is None:
            return None
        wanted = success_recipients(message, results)
        if not wanted:
            return None
        try:
            return self.queue_report(message, wanted)
        except OSError as exc:
            _LOG.error(
                "event=dsn-failed %s",
                log.fields(qid=message.queue_id, action="delivered", error=exc),
            )
            return None

    @staticmethod
    def _discard(txn: Transaction) -> None:
        assert txn.writer is not None
        txn.writer.discard()

    def _queue_failures(
        self, message: StoredMessage, results: list[RecipientResult], remote: bool
    ) -> Queued:
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
        assert txn.writer is not None
        try:
            results, queued, report = await self._store_and_deliver(txn)
        except OSError as exc:
            _LOG.error(
                "event=store-failed %s",
                log.fields(qid=txn.queue_id, error=exc.strerror or type(exc).__name__),
            )
            # The spool file goes when the transaction ends (the inbound handler's one place).
            return R.STORAGE_FAILED
        for r in results:
            # Not an observed event: the metrics count mailbox deliveries from the backends'
            # own "delivered" events, and remote ones from the queue's "delivery".
            log.line(
                "delivery", logging.INFO, _LOG,
                qid=txn.queue_id, to=r.recipient.address, mailbox=r.recipient.mailbox,
                status=r.status.value, reply=r.reply_line,
            )  # fmt: skip
        if queued and self.queue_notify is not None:
            self.queue_notify(txn.queue_id)
        if report is not None and self.queue_notify is not None:
            _LOG.info(
                "event=dsn %s",
                log.fields(qid=txn.queue_id, action="delivered", to=f"<{txn.sender_text}>",
                           dsn_qid=report),
            )  # fmt: skip
            self.queue_notify(report)
        if any(r.status not in (Status.DELIVERED, Status.QUEUED) for r in results):
            if all(r.status is Status.PERMANENT for r in results) and not txn.remote:
                first = results[0]
                return Reply(554, "5.3.0", f"Delivery failed: {first.text}")
            # The queue could not take the failed ones: no copy was kept for them (file
            # backends are all-or-nothing), so the client's retry is the safe course.
            return R.STORAGE_FAILED
        return R.queued(txn.queue_id)


def success_recipients(
    message: StoredMessage, results: Sequence[RecipientResult]
) -> list[DsnRecipient]:
    """The local recipients delivered just now whose RCPT asked for NOTIFY=SUCCESS."""
    out = []
    for r in results:
        given = message.recipient_dsn.get(r.recipient.address)
        if r.status is Status.DELIVERED and given and wants_success(given.notify_text):
            out.append(
                DsnRecipient(
                    r.recipient.address,
                    SUCCESS_STATUS,
                    last_attempt=message.received_at,
                    orcpt=given.orcpt,
                    action="delivered",
                )
            )
    return out
