"""Passing the DSN parameters on to a next hop (RFC 3461 §5.2: a DSN-capable MTA relaying to
another DSN-capable MTA keeps RET, ENVID, NOTIFY and ORCPT as they were given).

When the next hop does not advertise DSN the parameters stay here: the queue then reports
"relayed" to a sender who asked for NOTIFY=SUCCESS (`postier.queue.decide`). When it does,
each result is marked `dsn_passed`, since any report about it is now the next hop's duty.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from postier.delivery.base import Recipient, RecipientResult, StoredMessage
from postier.protocol.dsn import mail_params, rcpt_params


def dsn_mail_params(message: StoredMessage) -> dict[str, str | None]:
    """RET/ENVID for MAIL FROM, xtext-encoded again; {} when the sender gave neither."""
    return mail_params(message.envelope_dsn.ret, message.envelope_dsn.envid)


def dsn_rcpt_params(
    message: StoredMessage, recipients: Sequence[Recipient]
) -> list[dict[str, str | None]]:
    """NOTIFY/ORCPT for each RCPT TO, in order; {} for a recipient that had none."""
    out: list[dict[str, str | None]] = []
    for r in recipients:
        given = message.recipient_dsn.get(r.address)
        out.append(rcpt_params(given.notify_text, given.orcpt) if given else {})
    return out


def mark_passed(results: list[RecipientResult]) -> list[RecipientResult]:
    """The results of a transaction that carried our DSN parameters to the next hop."""
    return [dataclasses.replace(r, dsn_passed=True) for r in results]
