"""The per-mailbox loop shared by the file backends that store one copy per mailbox.

Recipients that share a mailbox get one copy; a mailbox that fails gets a temporary failure
for each of its recipients (the backend has already undone its partial write), and a
recipient without a valid mailbox path gets one too, with an actionable log line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from postier.delivery.base import (
    Recipient,
    RecipientResult,
    StoredMessage,
    delivered,
    temporary,
)
from postier.delivery.fsutil import describe_error
from postier.delivery.paths import group_by_path, owner_for
from postier.log import event as log_event

Owner = tuple[int, int] | None
StoreOne = Callable[[StoredMessage, Path, Owner], object]


def deliver_per_mailbox(
    message: StoredMessage,
    recipients: Sequence[Recipient],
    *,
    root: Path,
    template: str | None,
    backend: str,
    logger: logging.Logger,
    store_one: StoreOne,
) -> list[RecipientResult]:
    """Call `store_one(message, path, owner)` once per distinct mailbox path; one result per
    recipient, in order. `store_one` raises on failure after undoing what it wrote; what it
    returns is logged as the delivery's detail (e.g. the spool number)."""
    results: list[RecipientResult | None] = [None] * len(recipients)
    groups, errors = group_by_path(root, template, recipients)
    for index, why in errors.items():
        log_event(
            "deliver_failed", logging.WARNING, logger, qid=message.queue_id,
            backend=backend, to=recipients[index].address, error=why,
        )  # fmt: skip
        results[index] = temporary(
            recipients[index], "Mailbox misconfigured on this server, try again later"
        )
    for path, members in groups.items():
        first = recipients[members[0]]
        try:
            owner = owner_for(template, first.user, first.mailbox)
            detail = store_one(message, path, owner)
        except Exception as exc:
            log_event(
                "deliver_failed", logging.WARNING, logger, qid=message.queue_id,
                backend=backend, mailbox=path, error=repr(exc), undone="yes",
            )  # fmt: skip
            reason = describe_error(exc)
            for index in members:
                results[index] = temporary(
                    recipients[index], f"Mailbox write failed ({reason}), try again later"
                )
        else:
            log_event(
                "delivered", logging.DEBUG, logger, qid=message.queue_id,
                backend=backend, mailbox=path, detail=detail,
            )  # fmt: skip
            for index in members:
                results[index] = delivered(recipients[index])
    return [r for r in results if r is not None]
