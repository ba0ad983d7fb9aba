"""RFC 3464 delivery status notifications, parsed back with the email package."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage
from email.utils import parsedate_to_datetime

import pytest

from postier.queue.bounce import (
    DSN_CONTENT_OFFSET,
    EXPIRED_STATUS,
    DsnRecipient,
    build_dsn,
    should_notify,
    status_for,
)

HEADERS = b"From: Alice <alice@example.org>\nTo: bob@example.net\nSubject: lunch?\n"
ARRIVAL = 1_700_000_000.0


def parse(data: bytes) -> EmailMessage:
    assert data.startswith(b"Return-Path: <>\n")
    return email.message_from_bytes(data[DSN_CONTENT_OFFSET:], policy=email.policy.default)  # type: ignore[return-value]


def blocks(msg: EmailMessage, subtype: str = "delivery-status") -> list[dict[str, str]]:
    part = next(p for p in msg.walk() if p.get_content_type() == f"message/{subtype}")
    return [dict(b.items()) for b in part.get_payload()]  # type: ignore[union-attr]


def bounce(**kw: object) -> bytes:
    args: dict[str, object] = {
        "hostname": "mx.example.org",
        "queue_id": "1K0TSCTAR6700DWA",
        "sender": "alice@example.org",
        "arrival": ARRIVAL,
        "original_headers": HEADERS,
        "now": ARRIVAL + 600,
        "recipients": [
            DsnRecipient(
                "bob@example.net",
                "5.1.1",
                "550 5.1.1 <bob>: no such user",
                "mx.example.net",
                ARRIVAL + 590,
            )
        ],
    }
    args.update(kw)
    return build_dsn(**args).data  # type: ignore[arg-type]


def test_failure_report_structure() -> None:
    data = bounce()
    assert b"\r" not in data  # spool format: LF only
    msg = parse(data)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in msg.iter_parts()] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert msg["From"].addresses[0].addr_spec == "MAILER-DAEMON@mx.example.org"
    assert msg["To"].addresses[0].addr_spec == "alice@example.org"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Message-ID"].endswith("@mx.example.org>")
    human = next(msg.iter_parts()).get_content()
    assert "<bob@example.net> (host mx.example.net): 550 5.1.1 <bob>: no such user" in human


def test_delivery_status_fields() -> None:
    per_message, per_rcpt = blocks(parse(bounce()))
    assert per_message["Reporting-MTA"] == "dns; mx.example.org"
    assert parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == ARRIVAL
    assert per_rcpt == {
        "Final-Recipient": "rfc822; bob@example.net",
        "Action": "failed",
        "Status": "5.1.1",
        "Remote-MTA": "dns; mx.example.net",
        "Diagnostic-Code": "smtp; 550 5.1.1 <bob>: no such user",
        "Last-Attempt-Date": per_rcpt["Last-Attempt-Date"],
    }
    assert parsedate_to_datetime(per_rcpt["Last-Attempt-Date"]).timestamp() == ARRIVAL + 590


def test_original_headers_attached_verbatim() -> None:
    msg = parse(bounce())
    part = list(msg.iter_parts())[2]
    assert part.get_payload(decode=True) == HEADERS


def test_several_recipients_and_expiry_status() -> None:
    rcpts = [
        DsnRecipient("a@example.net", EXPIRED_STATUS, "451 4.4.1 connection refused"),
        DsnRecipient("b@example.com", "5.2.2", "552 5.2.2 mailbox full"),
    ]
    _, a, b = blocks(parse(bounce(recipients=rcpts)))
    assert (a["Final-Recipient"], a["Action"], a["Status"]) == (
        "rfc822; a@example.net",
        "failed",
        "4.4.7",
    )
    assert "Remote-MTA" not in a and "Last-Attempt-Date" not in a
    assert (b["Status"], b["Diagnostic-Code"]) == ("5.2.2", "smtp; 552 5.2.2 mailbox full")


def test_delay_warning() -> None:
    rcpts = [DsnRecipient("bob@example.net", "4.7.1", "451 4.7.1 greylisted")]
    msg = parse(bounce(action="delayed", recipients=rcpts, will_retry_until=ARRIVAL + 5 * 86400))
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    [block] = blocks(msg)[1:]
    assert block["Action"] == "delayed" and block["Status"] == "4.7.1"
    until = parsedate_to_datetime(block["Will-Retry-Until"]).timestamp()
    assert until == ARRIVAL + 5 * 86400
    assert "keep trying" in next(msg.iter_parts()).get_content()


def test_never_to_the_null_sender() -> None:
    assert not should_notify("")
    assert should_notify("alice@example.org")
    with pytest.raises(ValueError):
        bounce(sender="")
    with pytest.raises(ValueError):
        bounce(action="expanded")  # RFC 3464 knows it; we never expand a list


def test_utf8_uses_rfc6533_types_and_keeps_raw_bytes() -> None:
    raw = b"Subject: caf\xc3\xa9\nX-Broken: \xff\xfe\n"
    dsn = build_dsn(
        hostname="mx.example.org",
        queue_id="Q",
        sender="j\u00f6rg@example.org",
        arrival=ARRIVAL,
        now=ARRIVAL,
        original_headers=raw,
        recipients=[DsnRecipient("b\u00fc@example.net", "5.1.1", "550 5.1.1 no")],
    )
    assert dsn.smtputf8
    msg = parse(dsn.data)
    assert [p.get_content_type() for p in msg.iter_parts()] == [
        "text/plain",
        "message/global-delivery-status",
        "message/global-headers",
    ]
    assert raw in dsn.data  # byte for byte, even the invalid UTF-8
    assert b"Final-Recipient: utf-8; b\xc3\xbc@example.net\n" in dsn.data
    assert not build_dsn(
        hostname="h",
        queue_id="Q",
        sender="a@b.c",
        arrival=0,
        now=0,
        original_headers=HEADERS,
        recipients=[DsnRecipient("x@y.z", "5.0.0")],
    ).smtputf8


@pytest.mark.parametrize(
    ("code", "enhanced", "failed", "expected"),
    [
        (550, "5.1.1", True, "5.1.1"),
        (550, "", True, "5.0.0"),
        (554, "2.0.0", True, "5.0.0"),
        (451, "4.4.1", True, "4.4.1"),  # expired: failed with the temporary reason
        (451, "", True, "4.0.0"),
        (451, "4.7.1", False, "4.7.1"),
        (451, "", False, "4.0.0"),
        (550, "5.1.1", False, "4.0.0"),
    ],
)
def test_status_for(code: int, enhanced: str, failed: bool, expected: str) -> None:
    assert status_for(code, enhanced, failed=failed) == expected
