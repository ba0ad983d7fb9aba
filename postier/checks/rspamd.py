"""rspamd as the last end-of-data check: its action decides the reply and the stored copy.

| action                          | what postier does                                       |
| reject                          | 550 5.7.1 with rspamd's message; nothing stored         |
| soft reject, greylist           | 451 4.7.1                                               |
| add header, rewrite subject     | stored with X-Spam: Yes, X-Spam-Score, the new Subject, |
|                                 | and marked spam (Maildir++ `.Junk` where one exists)    |
| anything else                   | stored                                                  |

rspamd's milter headers (add and remove, e.g. its own DKIM signature) are applied whatever
the action. Submission is scanned too (for outbound spam), with `User` set. rspamd being
unreachable gives 451 4.7.1 (fail closed) or, with `rspamd_fail_open`, the message stored
with `X-Spam-Status: Unchecked`; both are logged (`rspamd-unavailable`) and counted.
"""

from __future__ import annotations

import dataclasses
import logging

from postier import log
from postier.checks.base import ACCEPT, ReceivedMessage, Verdict, refuse
from postier.checks.rspamd_client import (
    RspamdClient,
    RspamdUnavailable,
    RspamdVerdict,
    ScanEnvelope,
)
from postier.inbound.transaction import Transaction
from postier.protocol.replies import Reply

_LOG = logging.getLogger("postier.rspamd")
UNAVAILABLE = Reply(451, "4.7.1", "Content filter unavailable, try again later")
SOFT_REJECT = Reply(451, "4.7.1", "Try again later")
SPAM_ACTIONS = frozenset({"add header", "rewrite subject"})
# Fields we write ourselves on spam: a sender's own copy of them is removed first.
_OUR_FIELDS = (b"x-spam", b"x-spam-score")


class RspamdCheck:
    name = "rspamd"

    def __init__(self, client: RspamdClient, *, hostname: str, fail_open: bool) -> None:
        self.client = client
        self.hostname = hostname
        self.fail_open = fail_open

    async def at_end_of_data(self, txn: Transaction, message: ReceivedMessage) -> Verdict:
        stored = await message.stored()
        envelope = ScanEnvelope(
            ip=txn.client_ip,
            helo=txn.helo or "unknown",
            sender=txn.sender_text,
            recipients=tuple(txn.accepted),
            hostname=self.hostname,
            queue_id=txn.queue_id,
            user=txn.auth_user or "",
        )
        try:
            verdict = await self.client.check(stored.path, stored.content_offset, envelope)
        except RspamdUnavailable as exc:
            log.event(
                "rspamd-unavailable",
                logging.ERROR,
                _LOG,
                qid=txn.queue_id,
                error=str(exc),
                fail_open=self.fail_open,
            )
            if self.fail_open:
                return Verdict(fields=b"X-Spam-Status: Unchecked (content filter unavailable)\n")
            return refuse(UNAVAILABLE, f"rspamd unavailable: {exc}")
        log.event(
            "rspamd-scanned",
            logging.INFO,
            _LOG,
            qid=txn.queue_id,
            action=verdict.action,
            score=f"{verdict.score:.2f}",
            required=f"{verdict.required_score:.2f}",
            user=txn.auth_user,
        )
        result = _act(verdict)
        if result.remove_fields:
            # rspamd asks to remove X-Spam from every message, ham too; removing a field the
            # message does not have would rewrite the stored file for nothing.
            present = result.remove_fields & message.header_names
            result = dataclasses.replace(result, remove_fields=present)
        return result


def _act(v: RspamdVerdict) -> Verdict:
    """Turn rspamd's answer into our verdict (see the module's table)."""
    if v.action == "reject":
        text = _reply_text(v.message) or "Message rejected as spam"
        return refuse(Reply(550, "5.7.1", text), f"rspamd reject, score {v.score:.2f}")
    if v.action in ("soft reject", "greylist"):
        text = _reply_text(v.message) or SOFT_REJECT.lines[0]
        return refuse(Reply(451, "4.7.1", text), f"rspamd {v.action}")
    fields: list[bytes] = []
    remove: set[bytes] = {name.lower().encode("ascii") for name in v.remove_headers}
    added = {name.lower() for name, _ in v.add_headers}
    for name, value in v.add_headers:
        fields.append(f"{name}: {value}\n".encode())
    spam = v.action in SPAM_ACTIONS
    if spam:
        remove.update(_OUR_FIELDS)
        if "x-spam" not in added:
            fields.append(b"X-Spam: Yes\n")
        if "x-spam-score" not in added:
            fields.append(f"X-Spam-Score: {v.score:.2f} / {v.required_score:.2f}\n".encode())
        if v.action == "rewrite subject" and v.subject and _field_safe(v.subject):
            remove.add(b"subject")
            fields.append(f"Subject: {v.subject}\n".encode())
    if not fields and not remove and not spam:
        return ACCEPT
    return Verdict(fields=b"".join(fields), remove_fields=frozenset(remove), spam=spam)


def _field_safe(text: str) -> bool:
    return "\n" not in text and "\r" not in text


def _reply_text(message: str) -> str:
    """rspamd's message as one printable ASCII reply line."""
    clean = "".join(c for c in message if 32 <= ord(c) < 127)
    return clean.strip()[:200]
