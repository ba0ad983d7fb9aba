"""DSN (RFC 3461-3464) without I/O: the parameters, what NOTIFY decides, what the reports say.

The parsing of RET/ENVID/NOTIFY/ORCPT and its 501 texts; the queue entry keeping the values
(and an older entry without them still loading); `apply_results` honouring NOTIFY (NEVER,
FAILURE, DELAY, SUCCESS as delivered or relayed, nothing when the next hop took the
parameters); the reports' Original-Envelope-Id and Original-Recipient; RET=FULL returning
the whole message and RET=HDRS (or no RET) only the headers.
"""

from __future__ import annotations

import dataclasses
import email
import email.policy
import json
import random
from email.message import EmailMessage
from pathlib import Path

import pytest

from postier.delivery.base import (
    Recipient,
    StoredMessage,
    delivered,
    permanent,
    temporary,
)
from postier.delivery.dsn_relay import dsn_mail_params, dsn_rcpt_params, mark_passed
from postier.protocol.dsn import (
    DsnError,
    MailDsn,
    RcptDsn,
    mail_params,
    parse_mail_dsn,
    parse_rcpt_dsn,
    rcpt_params,
    xtext_problem,
)
from postier.queue.bounce import DSN_CONTENT_OFFSET, DsnRecipient, build_dsn, queue_dsn
from postier.queue.decide import RetryPolicy, apply_results
from postier.queue.entry import QueueEntry, RecipientState
from postier.queue.store import QueueStore
from postier.router import success_recipients

ARRIVAL = 1_000_000.0
POLICY = RetryPolicy(
    schedule=(60,), max_age=1000, delay_warning_after=100, jitter=0.0, rng=random.Random(1)
)


# --- the parameters -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("abc", None),
        ("a+2Bb", None),
        ("+C3+BC", None),
        ("abc+", "'+' at position 4 needs two hex digits"),
        ("abc+4", "'+' at position 4 needs two hex digits"),
        ("ab+G1", "bad hexchar 'G' after '+' at position 3"),
        ("ab+1x", "bad hexchar 'x' after '+' at position 3"),
        ("a=b", "character '=' at position 2 must be written as +3D"),
        ("+FF", "the +HH escapes do not decode as UTF-8"),
    ],
)
def test_xtext_problem_names_the_character_and_position(value: str, problem: str | None) -> None:
    assert xtext_problem(value) == problem


def test_mail_parameters() -> None:
    assert parse_mail_dsn({}) == MailDsn()
    assert parse_mail_dsn({"RET": "hdrs", "ENVID": "QQ+2B314"}) == MailDsn("HDRS", "QQ+314")
    assert parse_mail_dsn({"RET": "FULL", "SIZE": "10"}) == MailDsn("FULL", "")


@pytest.mark.parametrize(
    ("params", "text"),
    [
        ({"RET": "BODY"}, "Syntax: RET=FULL or RET=HDRS"),
        ({"RET": None}, "Syntax: RET=FULL or RET=HDRS"),
        ({"ENVID": None}, "Syntax: ENVID=<xtext>"),
        ({"ENVID": "x+zz"}, "ENVID: invalid xtext: bad hexchar 'z' after '+' at position 2"),
        ({"ENVID": "x" * 101}, "ENVID longer than 100 characters"),
    ],
)
def test_bad_mail_parameters_say_what_is_wrong(params: dict[str, str | None], text: str) -> None:
    with pytest.raises(DsnError) as info:
        parse_mail_dsn(params)
    assert (info.value.reply.code, info.value.reply.enhanced) == (501, "5.5.4")
    assert info.value.reply.text == text


def test_rcpt_parameters() -> None:
    assert parse_rcpt_dsn({}) == RcptDsn()
    got = parse_rcpt_dsn({"NOTIFY": "success,Delay", "ORCPT": "rfc822;Bob+2Btag+40x.org"})
    assert got == RcptDsn(("SUCCESS", "DELAY"), "rfc822;Bob+tag@x.org")
    assert got.notify_text == "SUCCESS,DELAY"
    assert RcptDsn.from_text(got.notify_text, got.orcpt) == got
    assert parse_rcpt_dsn({"NOTIFY": "NEVER"}).notify == ("NEVER",)


@pytest.mark.parametrize(
    ("params", "text"),
    [
        ({"NOTIFY": "NEVER,FAILURE"}, "NOTIFY=NEVER cannot be combined with other values"),
        ({"NOTIFY": "FAILURE,NEVER"}, "NOTIFY=NEVER cannot be combined with other values"),
        ({"NOTIFY": "SOMETIMES"}, "NOTIFY: unknown value 'SOMETIMES'"),
        ({"NOTIFY": "SUCCESS,,DELAY"}, "NOTIFY: unknown value ''"),
        ({"NOTIFY": "DELAY,DELAY"}, "NOTIFY: a value is repeated"),
        ({"ORCPT": "bob@x.org"}, "Syntax: ORCPT=addr-type;xtext"),
        ({"ORCPT": "rfc822;"}, "Syntax: ORCPT=addr-type;xtext"),
        ({"ORCPT": "rfc822;bob+4x.org"}, "ORCPT: invalid xtext: bad hexchar 'x'"),
    ],
)
def test_bad_rcpt_parameters_say_what_is_wrong(params: dict[str, str | None], text: str) -> None:
    with pytest.raises(DsnError) as info:
        parse_rcpt_dsn(params)
    assert info.value.reply.code == 501
    assert info.value.reply.text.startswith(text)


def test_values_are_encoded_again_for_the_next_hop() -> None:
    assert mail_params("", "") == {}
    assert mail_params("HDRS", "a+b=c") == {"RET": "HDRS", "ENVID": "a+2Bb+3Dc"}
    assert rcpt_params("", "") == {}
    assert rcpt_params("SUCCESS,FAILURE", "rfc822;b+x@y.org") == {
        "NOTIFY": "SUCCESS,FAILURE",
        "ORCPT": "rfc822;b+2Bx@y.org",
    }
    # What we send parses back to what we kept.
    sent = rcpt_params("NEVER", "rfc822;ü@y.org")
    assert parse_rcpt_dsn(sent) == RcptDsn(("NEVER",), "rfc822;ü@y.org")


def test_relay_parameters_come_from_the_stored_message(tmp_path: Path) -> None:
    message = StoredMessage(
        tmp_path / "m",
        10,
        5,
        "a@x.org",
        "1K1M5C38MKP00YKK",
        ARRIVAL,
        envelope_dsn=MailDsn("FULL", "e1"),
        recipient_dsn={"b@y.org": RcptDsn(("SUCCESS",), "rfc822;B@y.org")},
    )
    assert dsn_mail_params(message) == {"RET": "FULL", "ENVID": "e1"}
    assert dsn_rcpt_params(message, [Recipient("b@y.org"), Recipient("c@y.org")]) == [
        {"NOTIFY": "SUCCESS", "ORCPT": "rfc822;B@y.org"},
        {},
    ]
    [passed] = mark_passed([delivered(Recipient("b@y.org"))])
    assert passed.dsn_passed


# --- the queue entry ----------------------------------------------------------------------


def entry(*recipients: RecipientState, **fields: object) -> QueueEntry:
    return QueueEntry(
        "1K1M5C38MKP00YKK", "alice@example.org", ARRIVAL, 100, 20, list(recipients), **fields
    )  # type: ignore[arg-type]


def test_entry_keeps_the_values_and_old_entries_load() -> None:
    e = entry(
        RecipientState("b@y.org", notify="SUCCESS", orcpt="rfc822;B@y.org"),
        ret="HDRS",
        envid="env 1",
    )
    back = QueueEntry.from_json(e.to_json())
    assert back == e
    data = json.loads(e.to_json())
    for key in ("ret", "envid"):
        del data[key]
    for key in ("notify", "orcpt"):
        del data["recipients"][0][key]
    data["recipients"][0]["from_the_future"] = 1
    old = QueueEntry.from_json(json.dumps(data).encode())
    assert (old.ret, old.envid) == ("", "")
    assert (old.recipients[0].notify, old.recipients[0].orcpt) == ("", "")


# --- what NOTIFY decides --------------------------------------------------------------------


def rcpt(address: str, notify: str = "", orcpt: str = "") -> RecipientState:
    return RecipientState(address, notify=notify, orcpt=orcpt)


def test_absent_notify_reports_failure_and_delay_as_before() -> None:
    e = entry(rcpt("a@y.org"), rcpt("b@y.org"))
    out = apply_results(
        e,
        [permanent(Recipient("a@y.org"), "no"), temporary(Recipient("b@y.org"), "later")],
        ARRIVAL + 200,
        POLICY,
        remote_mta="mx.y.org",
    )
    assert [r.address for r in out.failed] == ["a@y.org"]
    assert [r.address for r in out.delayed] == ["b@y.org"]
    assert out.succeeded == ()


def test_never_reports_nothing_and_the_warning_is_still_spent() -> None:
    e = entry(rcpt("a@y.org", "NEVER"), rcpt("b@y.org", "NEVER"))
    out = apply_results(
        e,
        [permanent(Recipient("a@y.org"), "no"), temporary(Recipient("b@y.org"), "later")],
        ARRIVAL + 200,
        POLICY,
        remote_mta="mx.y.org",
    )
    assert out.failed == () and out.delayed == () and out.succeeded == ()
    assert out.entry.recipients[0].state.value == "permanent"  # bounced, silently
    assert out.entry.delay_warned  # once per entry, even when nobody wanted it


def test_never_also_silences_expiry() -> None:
    e = entry(rcpt("a@y.org", "NEVER"))
    out = apply_results(e, [temporary(Recipient("a@y.org"), "later")], ARRIVAL + 1000, POLICY)
    assert out.final and out.failed == ()


def test_failure_only_gets_no_delay_warning_and_delay_only_no_bounce() -> None:
    e = entry(rcpt("a@y.org", "FAILURE"), rcpt("b@y.org", "DELAY"))
    later = apply_results(
        e,
        [temporary(Recipient("a@y.org"), "later"), temporary(Recipient("b@y.org"), "later")],
        ARRIVAL + 200,
        POLICY,
    )
    assert [r.address for r in later.delayed] == ["b@y.org"]
    failed = apply_results(
        later.entry,
        [permanent(Recipient("a@y.org"), "no"), permanent(Recipient("b@y.org"), "no")],
        ARRIVAL + 300,
        POLICY,
    )
    assert [r.address for r in failed.failed] == ["a@y.org"]


def test_success_is_delivered_here_relayed_without_dsn_and_silent_when_passed_on() -> None:
    e = entry(
        rcpt("a@y.org", "SUCCESS", "rfc822;A@y.org"),
        rcpt("b@y.org", "SUCCESS,FAILURE"),
        rcpt("c@y.org"),
    )
    results = [delivered(Recipient(a)) for a in ("a@y.org", "b@y.org", "c@y.org")]
    local = apply_results(e, results, ARRIVAL + 1, POLICY)
    assert [(r.address, r.action, r.status, r.orcpt) for r in local.succeeded] == [
        ("a@y.org", "delivered", "2.0.0", "rfc822;A@y.org"),
        ("b@y.org", "delivered", "2.0.0", ""),
    ]
    relayed = apply_results(e, results, ARRIVAL + 1, POLICY, remote_mta="mx.y.org")
    assert [r.action for r in relayed.succeeded] == ["relayed", "relayed"]
    passed = apply_results(e, mark_passed(results), ARRIVAL + 1, POLICY, remote_mta="mx.y.org")
    assert passed.succeeded == ()


def test_failure_report_carries_orcpt() -> None:
    e = entry(rcpt("a@y.org", "FAILURE", "rfc822;Alias@x.org"))
    out = apply_results(e, [permanent(Recipient("a@y.org"), "no")], ARRIVAL + 1, POLICY)
    assert out.failed[0].orcpt == "rfc822;Alias@x.org"


def test_router_success_recipients(tmp_path: Path) -> None:
    message = StoredMessage(
        tmp_path / "m",
        10,
        5,
        "a@x.org",
        "1K1M5C38MKP00YKK",
        ARRIVAL,
        recipient_dsn={
            "b@x.org": RcptDsn(("SUCCESS",), "rfc822;B@x.org"),
            "c@x.org": RcptDsn(("FAILURE",)),
            "d@x.org": RcptDsn(("SUCCESS",)),
        },
    )
    results = [
        delivered(Recipient("b@x.org")),
        delivered(Recipient("c@x.org")),
        temporary(Recipient("d@x.org"), "later"),
        delivered(Recipient("e@x.org")),
    ]
    [only] = success_recipients(message, results)
    assert (only.address, only.action, only.orcpt) == ("b@x.org", "delivered", "rfc822;B@x.org")


# --- the reports ------------------------------------------------------------------------------

HEADERS = b"From: alice@example.org\nTo: b@y.org\nSubject: s\n"


def parse(data: bytes) -> EmailMessage:
    return email.message_from_bytes(data[DSN_CONTENT_OFFSET:], policy=email.policy.default)  # type: ignore[return-value]


def status_blocks(msg: EmailMessage) -> list[dict[str, str]]:
    part = next(p for p in msg.walk() if p.get_content_type() == "message/delivery-status")
    return [dict(b.items()) for b in part.get_payload()]  # type: ignore[union-attr]


def test_report_has_envid_orcpt_and_per_recipient_actions() -> None:
    dsn = build_dsn(
        hostname="mx.example.org",
        queue_id="1K1M5C38MKP00YKK",
        sender="alice@example.org",
        arrival=ARRIVAL,
        original_headers=HEADERS,
        now=ARRIVAL + 5,
        action="delivered",
        envid="QQ+314",
        recipients=[
            DsnRecipient("a@y.org", "2.0.0", orcpt="rfc822;A@y.org", action="delivered"),
            DsnRecipient("b@y.org", "2.0.0", remote_mta="mx.y.org", action="relayed"),
        ],
    )
    msg = parse(dsn.data)
    assert msg.get_content_type() == "multipart/report"
    head, a, b = status_blocks(msg)
    assert head["Original-Envelope-Id"] == "QQ+314"
    assert (a["Original-Recipient"], a["Final-Recipient"], a["Action"], a["Status"]) == (
        "rfc822;A@y.org",
        "rfc822; a@y.org",
        "delivered",
        "2.0.0",
    )
    assert "Original-Recipient" not in b and b["Action"] == "relayed"
    assert "Successful" in msg["Subject"]


def test_ret_full_returns_the_message_and_hdrs_only_the_headers(tmp_path: Path) -> None:
    store = QueueStore(tmp_path / "q")
    body = b"Return-Path: <alice@example.org>\n" + HEADERS + b"\nthe secret body\n"
    spool = tmp_path / "spool"
    spool.write_bytes(body)
    offset = len(b"Return-Path: <alice@example.org>\n")
    reports = {}
    qids = {"FULL": "1K1M5C38MKP00YKF", "HDRS": "1K1M5C38MKP00YKH", "": "1K1M5C38MKP00YK0"}
    for ret, qid in qids.items():
        message = StoredMessage(
            spool,
            len(body),
            offset,
            "alice@example.org",
            qid,
            ARRIVAL,
            envelope_dsn=MailDsn(ret, ""),
        )
        e = store.commit(message, "alice@example.org", ["b@y.org"])
        assert e.ret == ret
        failed = [DsnRecipient("b@y.org", "5.1.1", "550 5.1.1 no")]
        notice = queue_dsn(store, e, failed, hostname="mx.test", action="failed", now=ARRIVAL)
        assert notice is not None
        reports[ret] = parse(store.body_path(notice).read_bytes())
    full = reports["FULL"]
    returned = full.get_payload()[2]  # type: ignore[index]
    assert returned.get_content_type() == "message/rfc822"
    assert b"the secret body" in full.as_bytes()
    for ret in ("HDRS", ""):
        assert reports[ret].get_payload()[2].get_content_type() == "text/rfc822-headers"  # type: ignore[index]
        assert b"the secret body" not in reports[ret].as_bytes()
        assert b"Subject: s" in reports[ret].as_bytes()


def test_ret_full_is_for_failures_only(tmp_path: Path) -> None:
    store = QueueStore(tmp_path / "q")
    spool = tmp_path / "spool"
    spool.write_bytes(b"Return-Path: <a@x.org>\n" + HEADERS + b"\nbody text\n")
    message = StoredMessage(
        spool,
        spool.stat().st_size,
        23,
        "a@x.org",
        "1K1M5C38MKP00YKK",
        ARRIVAL,
        envelope_dsn=MailDsn("FULL", ""),
    )
    e = store.commit(message, "a@x.org", ["b@y.org"])
    delayed = [DsnRecipient("b@y.org", "4.0.0")]
    notice = queue_dsn(store, e, delayed, hostname="mx.test", action="delayed", now=ARRIVAL)
    assert notice is not None
    assert b"body text" not in store.body_path(notice).read_bytes()


def test_store_keeps_recipient_parameters_through_add_recipients(tmp_path: Path) -> None:
    store = QueueStore(tmp_path / "q")
    spool = tmp_path / "spool"
    spool.write_bytes(b"Return-Path: <a@x.org>\n" + HEADERS + b"\nbody\n")
    dsn = {"b@y.org": RcptDsn(("NEVER",)), "c@x.org": RcptDsn(("SUCCESS",), "rfc822;C@x.org")}
    message = StoredMessage(
        spool,
        spool.stat().st_size,
        23,
        "a@x.org",
        "1K1M5C38MKP00YKK",
        ARRIVAL,
        envelope_dsn=MailDsn("HDRS", "id1"),
        recipient_dsn=dsn,
    )
    store.commit(message, "a@x.org", ["b@y.org"])
    e = store.add_recipients(message.queue_id, ["c@x.org"], dsn)
    assert [(r.address, r.notify, r.orcpt) for r in e.recipients] == [
        ("b@y.org", "NEVER", ""),
        ("c@x.org", "SUCCESS", "rfc822;C@x.org"),
    ]
    again = store.message(store.load(message.queue_id))
    assert again.envelope_dsn == MailDsn("HDRS", "id1")
    assert dict(again.recipient_dsn) == dsn
    assert dataclasses.replace(again, recipient_dsn={}).envelope_dsn.envid == "id1"
