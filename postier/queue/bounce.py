"""Delivery status notifications (RFC 3464): bounces and delay warnings.

A DSN is `multipart/report; report-type=delivery-status` with three parts: a human-readable
text, the machine-readable `message/delivery-status` (one block for the message, one per
recipient) and the original header section as `text/rfc822-headers` (headers only: the body
may be large and the bounce goes back over the same path it failed on). Only a failure
report for a message sent with `RET=FULL` (RFC 3461 §4.3) returns the whole message, as
`message/rfc822`, and only up to `FULL_RETURN_LIMIT`. When an address or the original
headers are not ASCII, the RFC 6533 types (`message/global-delivery-status`,
`message/global-headers`, `message/global`) are used and the DSN itself needs SMTPUTF8.

The actions are RFC 3464's: "failed" (a bounce), "delayed" (a warning), "delivered" (a
local delivery the sender asked to hear about with NOTIFY=SUCCESS) and "relayed" (handed to
a next hop that does not speak DSN, so no further report can come). The sender's ENVID is
the `Original-Envelope-Id` field, a recipient's ORCPT its `Original-Recipient`.

The result is bytes in the spool-file format of `postier.delivery.base` (LF line endings,
first line `Return-Path: <>`), so it can be delivered locally or committed to the queue as
is, with `content_offset=DSN_CONTENT_OFFSET`. A DSN's envelope sender is always `<>`, and a
message whose sender is `<>` never gets one (`should_notify`): that is what stops bounce
loops between two mail systems.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy as email_policy
from email.generator import BytesGenerator
from email.message import Message
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.utils import format_datetime, make_msgid

from postier.delivery.base import StoredMessage
from postier.queue.store import QueueEntry, QueueStore, RecipientState

RETURN_PATH_LINE = b"Return-Path: <>\n"
DSN_CONTENT_OFFSET = len(RETURN_PATH_LINE)
EXPIRED_STATUS = "4.4.7"  # RFC 3463: delivery time expired
SUCCESS_STATUS = "2.0.0"
ACTIONS = ("failed", "delayed", "delivered", "relayed")
FULL_RETURN_LIMIT = 10 * 1024 * 1024  # RET=FULL above this returns the headers only


@dataclass(frozen=True, slots=True)
class DsnRecipient:
    """What the report says about one recipient."""

    address: str
    status: str  # enhanced status, e.g. "5.1.1" (failed) or "4.4.1" (delayed)
    diagnostic: str = ""  # the server's reply line, e.g. "550 5.1.1 no such user"
    remote_mta: str = ""  # host name of the server that answered, when known
    last_attempt: float | None = None
    orcpt: str = ""  # DSN ORCPT, "rfc822;user@example.org" (decoded), when the sender gave one
    action: str = ""  # this recipient's action when it differs from the report's


@dataclass(frozen=True, slots=True)
class Dsn:
    """A built report: spool-format bytes and how to queue them."""

    data: bytes
    content_offset: int
    smtputf8: bool
    message_id: str
    body_8bit: bool = False


class _DsnGenerator(BytesGenerator):
    """Knows the RFC 6533 types: `message/global-headers` is raw text (the stock generator
    insists on ASCII for a `message/*` part that is not a parsed message) and
    `message/global-delivery-status` is a list of field blocks (it would write only the
    first)."""

    _handle_message_global_delivery_status = (
        BytesGenerator._handle_message_delivery_status  # type: ignore[attr-defined]
    )

    def _handle_message_global_headers(self, msg: Message) -> None:
        self._handle_text(msg)  # type: ignore[attr-defined]


_SUBJECTS = {
    "failed": "Undelivered Mail Returned to Sender",
    "delayed": "Delayed Mail (still being retried)",
}


def should_notify(sender: str) -> bool:
    """Never report to the null sender (RFC 5321 §4.5.5, RFC 3464 §2): no bounce loops."""
    return sender != ""


def status_for(code: int, enhanced: str, *, failed: bool) -> str:
    """The Status field: the reply's enhanced code when its class fits, else a generic one.

    A failure caused by a temporary reason (expiry) keeps its 4.x.x status, as RFC 3464
    allows: the action says "failed", the status says why.
    """
    if failed:
        if enhanced[:2] in ("5.", "4."):
            return enhanced
        return "4.0.0" if 400 <= code < 500 else "5.0.0"
    return enhanced if enhanced.startswith("4.") else "4.0.0"


def _date(ts: float) -> str:
    return format_datetime(datetime.fromtimestamp(ts, UTC))


def _address_type(address: str) -> str:
    return f"rfc822; {address}" if address.isascii() else f"utf-8; {address}"


def _human_text(
    hostname: str, action: str, recipients: Sequence[DsnRecipient], will_retry_until: float | None
) -> str:
    lines = [f"This is the mail system at host {hostname}.", ""]
    if action in ("delivered", "relayed"):
        lines += [
            "Your message was delivered to the recipients below, as you asked to be told",
            '(a "relayed" one went to a mail system that sends no such notices).',
        ]
    elif action == "failed":
        lines += [
            "I'm sorry to have to inform you that your message could not be delivered to",
            "one or more recipients. The reasons are given below; the headers of your",
            "message are attached.",
        ]
    else:
        until = f" until {_date(will_retry_until)}" if will_retry_until else ""
        lines += [
            "This is only a warning: your message has not been delivered yet to the",
            f"recipients below. The mail system will keep trying{until};",
            "you do not need to send it again.",
        ]
    lines.append("")
    for r in recipients:
        reason = r.diagnostic or f"status {r.status}"
        host = f" (host {r.remote_mta})" if r.remote_mta else ""
        lines.append(f"<{r.address}>{host}: {reason}")
    return "\n".join(lines) + "\n"


def build_dsn(
    *,
    hostname: str,
    queue_id: str,
    sender: str,
    arrival: float,
    recipients: Sequence[DsnRecipient],
    original_headers: bytes,
    now: float,
    action: str = "failed",
    will_retry_until: float | None = None,
    envid: str = "",
    full_message: bytes | None = None,
) -> Dsn:
    """Build a DSN for `sender` about `recipients` of message `queue_id`.

    `action` is one of `ACTIONS`: "failed" (a bounce), "delayed" (a warning;
    `will_retry_until` says when the queue gives up), "delivered" or "relayed" (a success
    report; a recipient's own `action` may say which). `original_headers` is the message's
    header section as stored; `full_message`, when given, is returned instead (RET=FULL).
    `envid` is the sender's ENVID, decoded.
    """
    if action not in ACTIONS:
        raise ValueError(f"unsupported DSN action {action!r}")
    if not should_notify(sender):
        raise ValueError("no DSN to the null sender")
    utf8 = not (
        sender.isascii()
        and all(r.address.isascii() for r in recipients)
        and original_headers.isascii()
        and envid.isascii()
        and all(r.orcpt.isascii() for r in recipients)
    )
    pol = email_policy.default.clone(linesep="\n", utf8=utf8, max_line_length=78)
    outer = MIMEMultipart("report", report_type="delivery-status", policy=pol)
    outer["From"] = f"Mail Delivery System <MAILER-DAEMON@{hostname}>"
    outer["To"] = f"<{sender}>"
    outer["Subject"] = _SUBJECTS.get(action, "Successful Mail Delivery Report")
    outer["Date"] = _date(now)
    message_id = make_msgid(idstring=queue_id, domain=hostname)
    outer["Message-ID"] = message_id
    outer["Auto-Submitted"] = "auto-replied"  # RFC 3834: no vacation replies to bounces

    text = MIMEBase("text", "plain", policy=pol, charset="utf-8" if utf8 else "us-ascii")
    text.set_payload(_human_text(hostname, action, recipients, will_retry_until).encode())
    text["Content-Transfer-Encoding"] = "8bit" if utf8 else "7bit"
    outer.attach(text)

    per_message = Message(policy=pol)
    per_message["Reporting-MTA"] = f"dns; {hostname}"
    if envid:
        per_message["Original-Envelope-Id"] = envid
    per_message["X-Postier-Queue-ID"] = queue_id
    per_message["Arrival-Date"] = _date(arrival)
    blocks = [per_message]
    for r in recipients:
        block = Message(policy=pol)
        if r.orcpt:
            block["Original-Recipient"] = r.orcpt
        block["Final-Recipient"] = _address_type(r.address)
        block["Action"] = r.action or action
        block["Status"] = r.status
        if r.remote_mta:
            block["Remote-MTA"] = f"dns; {r.remote_mta}"
        if r.diagnostic:
            block["Diagnostic-Code"] = f"smtp; {r.diagnostic}"
        if r.last_attempt:
            block["Last-Attempt-Date"] = _date(r.last_attempt)
        if action == "delayed" and will_retry_until:
            block["Will-Retry-Until"] = _date(will_retry_until)
        blocks.append(block)
    status = MIMEBase(
        "message", "global-delivery-status" if utf8 else "delivery-status", policy=pol
    )
    status.set_payload(blocks)
    outer.attach(status)

    returned = original_headers if full_message is None else full_message
    if full_message is not None:
        headers = MIMEBase("message", "global" if utf8 else "rfc822", policy=pol)
    else:
        headers = MIMEBase(
            "message" if utf8 else "text",
            "global-headers" if utf8 else "rfc822-headers",
            policy=pol,
        )
    # Raw bytes survive untouched: set_payload keeps them as surrogate-escaped text and the
    # generator writes them back byte for byte under an 8bit transfer encoding.
    headers.set_payload(returned)
    headers["Content-Transfer-Encoding"] = "7bit" if returned.isascii() else "8bit"
    outer.attach(headers)
    for part in (text, status, headers):
        del part["MIME-Version"]

    buf = io.BytesIO()
    buf.write(RETURN_PATH_LINE)
    _DsnGenerator(buf, policy=pol, mangle_from_=False).flatten(outer)
    return Dsn(buf.getvalue(), DSN_CONTENT_OFFSET, utf8, message_id, not returned.isascii())


def dsn_recipient(state: RecipientState, status: str, action: str = "") -> DsnRecipient:
    """What the report says about a queued recipient, from its last attempt."""
    return DsnRecipient(
        state.address,
        status,
        state.last_reply,
        state.remote_mta,
        state.last_attempt or None,
        state.orcpt,
        action,
    )


def _full_message(store: QueueStore, entry: QueueEntry, action: str) -> bytes | None:
    """The whole message for a failure report when the sender asked for RET=FULL (and it is
    not too large to send back), else None: the headers are returned."""
    if action != "failed" or entry.ret != "FULL":
        return None
    if entry.size - entry.content_offset > FULL_RETURN_LIMIT:
        return None
    with open(store.body_path(entry.queue_id), "rb") as f:
        f.seek(entry.content_offset)
        return f.read(FULL_RETURN_LIMIT + 1)


def queue_dsn(
    store: QueueStore,
    entry: QueueEntry,
    recipients: Sequence[DsnRecipient],
    *,
    hostname: str,
    action: str,
    now: float,
    will_retry_until: float | None = None,
    sign: Callable[[bytes, int], bytes] | None = None,
) -> str | None:
    """Blocking (thread pool): build a DSN about `entry` and commit it to the queue as a new
    entry from <> to the sender. Returns its id, or None when the sender is <>."""
    if not should_notify(entry.sender):
        return None
    dsn = build_dsn(
        hostname=hostname,
        queue_id=entry.queue_id,
        sender=entry.sender,
        arrival=entry.arrival,
        recipients=recipients,
        original_headers=store.read_headers(entry),
        now=now,
        action=action,
        will_retry_until=will_retry_until,
        envid=entry.envid,
        full_message=_full_message(store, entry, action),
    )
    return _commit(store, dsn, entry.sender, now, sign)


def _commit(
    store: QueueStore,
    dsn: Dsn,
    sender: str,
    now: float,
    sign: Callable[[bytes, int], bytes] | None,
) -> str:
    data = sign(dsn.data, dsn.content_offset) if sign is not None else dsn.data
    notice = store.commit_bytes(
        data,
        "",
        [sender],
        arrival=now,
        content_offset=dsn.content_offset,
        smtputf8=dsn.smtputf8,
        body_8bit=dsn.smtputf8 or dsn.body_8bit,
    )
    return notice.queue_id


def queue_delivered_report(
    store: QueueStore,
    message: StoredMessage,
    recipients: Sequence[DsnRecipient],
    *,
    hostname: str,
    now: float,
    sign: Callable[[bytes, int], bytes] | None = None,
) -> str | None:
    """Blocking: the "delivered" report for a message the router delivered locally at end
    of data (NOTIFY=SUCCESS), read from its spool file and committed to the queue. Returns
    the report's queue id, or None when the sender is <> or nobody asked."""
    if not recipients or not should_notify(message.sender):
        return None
    dsn = build_dsn(
        hostname=hostname,
        queue_id=message.queue_id,
        sender=message.sender,
        arrival=message.received_at,
        recipients=recipients,
        original_headers=read_spool_headers(message),
        now=now,
        action="delivered",
        envid=message.envelope_dsn.envid,
    )
    return _commit(store, dsn, message.sender, now, sign)


def read_spool_headers(message: StoredMessage, limit: int = 256 * 1024) -> bytes:
    """The header section of a spool file (after Return-Path, up to the blank line)."""
    with open(message.path, "rb") as f:
        f.seek(message.content_offset)
        data = f.read(limit)
    end = data.find(b"\n\n")
    return data if end < 0 else data[: end + 1]
