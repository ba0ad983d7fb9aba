"""The per-mailbox loop shared by the file backends (Maildir, mbox, numbered spool).

Every file backend resolves its mailboxes here, one way: `paths.group_by_path` (validated
names, templates), `paths.owner_for` (whose files they are when running as root), one copy
per distinct mailbox. A recipient without a valid mailbox path gets a temporary failure with
an actionable log line; a mailbox whose write fails gets one for each of its recipients (the
backend has already undone its partial write).

`all_or_nothing` (Maildir) widens that: the first failure undoes the copies already placed
(`undo`) and every recipient gets the temporary failure, so the client's retry of the whole
message produces no duplicate. Without it (mbox, spool) the mailboxes that took their copy
keep it and the router hands only the failed recipients to the queue.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

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
T = TypeVar("T")
StoreOne = Callable[[StoredMessage, Path, Owner], T]
Undo = Callable[[Path, T], None]

MISCONFIGURED = "Mailbox misconfigured on this server, try again later"


def deliver_per_mailbox(
    message: StoredMessage,
    recipients: Sequence[Recipient],
    *,
    root: Path,
    template: str | None,
    backend: str,
    logger: logging.Logger,
    store_one: StoreOne[T],
    all_or_nothing: bool = False,
    undo: Undo[T] | None = None,
) -> list[RecipientResult]:
    """Call `store_one(message, path, owner)` once per distinct mailbox path; one result per
    recipient, in order. `store_one` raises on failure after undoing what it wrote; what it
    returns is logged as the delivery's detail (e.g. the spool number) and, with
    `all_or_nothing`, handed to `undo(path, detail)` when a later mailbox fails."""
    if all_or_nothing and undo is None:
        raise ValueError("all_or_nothing needs an undo")
    results: list[RecipientResult | None] = [None] * len(recipients)
    groups, errors = group_by_path(root, template, recipients)
    for index, why in errors.items():
        log_event(
            "delivery-failed", logging.WARNING, logger, qid=message.queue_id,
            backend=backend, to=recipients[index].address, error=why,
        )  # fmt: skip
        results[index] = temporary(recipients[index], MISCONFIGURED)
    if errors and all_or_nothing:
        return [temporary(r, MISCONFIGURED) for r in recipients]
    placed: list[tuple[Path, T]] = []
    for path, members in groups.items():
        first = recipients[members[0]]
        try:
            owner = owner_for(template, first.user, first.mailbox)
            detail = store_one(message, path, owner)
        except Exception as exc:
            log_event(
                "delivery-failed", logging.WARNING, logger, qid=message.queue_id,
                backend=backend, mailbox=path, error=repr(exc), undone="yes",
            )  # fmt: skip
            text = f"Mailbox write failed ({describe_error(exc)}), try again later"
            if all_or_nothing:
                assert undo is not None
                _undo_all(placed, undo, message, backend, logger)
                return [temporary(r, text) for r in recipients]
            for index in members:
                results[index] = temporary(recipients[index], text)
        else:
            placed.append((path, detail))
            log_event(
                "delivered", logging.DEBUG, logger, qid=message.queue_id,
                backend=backend, mailbox=path, detail=detail,
            )  # fmt: skip
            for index in members:
                results[index] = delivered(recipients[index])
    return [r for r in results if r is not None]


def _undo_all(
    placed: list[tuple[Path, T]],
    undo: Undo[T],
    message: StoredMessage,
    backend: str,
    logger: logging.Logger,
) -> None:
    """Take back the copies already placed; a failing undo is logged, the others go on."""
    for path, detail in placed:
        try:
            undo(path, detail)
        except OSError as exc:
            log_event(
                "undo-failed", logging.ERROR, logger, qid=message.queue_id,
                backend=backend, mailbox=path, error=repr(exc),
            )  # fmt: skip
