"""DSN (RFC 3461-3464) through the whole daemon, against real peers on loopback.

`postier serve` as a subprocess, smtplib as the client (its mail_options/rcpt_options send
the DSN parameters as given), a loopback DNS responder, Postfix's smtp-sink (which records
the MAIL and RCPT arguments it received in each dump, and can refuse RCPT or hide DSN) and a
private Postfix (which speaks DSN and sends its own success report back to our mx).
"""

from __future__ import annotations

import email
import email.policy
import smtplib
import subprocess
import sys
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.dnsserver import DnsServer
from tests.server import PostierServer, make_server
from tests.server import wait_until as poll_until
from tests.sinks import PrivatePostfix, SmtpSink, have

pytestmark = pytest.mark.skipif(not have("/usr/sbin/smtp-sink"), reason="postfix not installed")

ZONE = {
    "remote.test": {"MX": [(10, "mx.remote.test")]},
    "mx.remote.test": {"A": ["127.0.0.1"]},
}
BODY = "the body that RET=HDRS keeps at home"


def wait_until(predicate: Callable[[], bool], timeout: float = 60.0) -> bool:
    """A safety bound, not a speed assertion (Postfix's queue runs take their time)."""
    return poll_until(predicate, timeout, 0.1)


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    with DnsServer(ZONE) as server:
        yield server


def server(tmp: Path, dns: DnsServer, remote_port: int) -> PostierServer:
    return make_server(
        tmp,
        extra=["--dns-server", f"127.0.0.1:{dns.port}", "--remote-port", str(remote_port)],
    )


def send(
    srv: PostierServer,
    rcpts: list[str],
    mail_options: list[str],
    rcpt_options: list[str],
    subject: str = "dsn test",
) -> None:
    with smtplib.SMTP("127.0.0.1", srv.local_port, timeout=30) as s:
        s.sendmail(
            "alice@example.org",
            rcpts,
            f"Subject: {subject}\r\n\r\n{BODY}\r\n",
            mail_options=mail_options,
            rcpt_options=rcpt_options,
        )


def queue_empty(srv: PostierServer) -> bool:
    out = subprocess.run(
        [sys.executable, "-m", "postier", "queue", "list", "-Q", str(srv.root / "queue")],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.strip()
    return out in ("", "Mail queue is empty")


def reports(srv: PostierServer, mailbox: str = "alice") -> list[EmailMessage]:
    return [
        email.message_from_bytes(f.read_bytes(), policy=email.policy.default)  # type: ignore[misc]
        for f in srv.maildir_files(mailbox)
    ]


def status_text(report: EmailMessage) -> str:
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    part = report.get_payload()[1]  # type: ignore[index]
    assert part.get_content_type() == "message/delivery-status"
    return part.as_string()


def test_notify_success_for_local_delivery_gives_a_delivered_report(
    pub: Path, dns: DnsServer
) -> None:
    srv = server(pub / "srv", dns, 9).start()
    try:
        send(
            srv,
            ["bob@example.org", "carol@example.org"],
            ["RET=HDRS", "ENVID=QQ+2B314"],
            ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;Bob+2Btag+40example.org"],
        )
        # The report is committed before the 250 and delivered by the queue.
        assert wait_until(lambda: len(srv.maildir_files("alice")) == 1)
        assert len(srv.maildir_files("bob")) == 1 and len(srv.maildir_files("carol-box")) == 1
        [report] = reports(srv)
        assert report["Return-Path"] == "<>"
        text = status_text(report)
        assert "Original-Envelope-Id: QQ+314" in text
        assert "Original-Recipient: rfc822;Bob+tag@example.org" in text
        assert "Final-Recipient: rfc822; bob@example.org" in text
        assert "Final-Recipient: rfc822; carol@example.org" in text
        assert text.count("Action: delivered") == 2 and "Status: 2.0.0" in text
        assert BODY not in report.as_string()  # a success report returns headers only
        assert srv.logged("event=dsn", "action=delivered")
    finally:
        srv.stop()


def test_bounces_follow_notify_ret_envid_and_orcpt(pub: Path, dns: DnsServer) -> None:
    with SmtpSink(pub / "sink", options=("-f", "RCPT")) as sink:
        srv = server(pub / "srv", dns, sink.port).start()
        try:
            send(srv, ["never@remote.test"], ["ENVID=never"], ["NOTIFY=NEVER"])
            send(
                srv,
                ["hdrs@remote.test"],
                ["RET=HDRS", "ENVID=hdrs+2B1"],
                ["NOTIFY=FAILURE", "ORCPT=rfc822;Hdrs+40remote.test"],
            )
            send(srv, ["full@remote.test"], ["RET=FULL", "ENVID=full"], [])
            # A bounce is committed before its entry goes: an empty queue means every
            # bounce there was to make has been made and delivered.
            assert wait_until(lambda: len(srv.maildir_files("alice")) >= 2 and queue_empty(srv))
            got = {}
            for report in reports(srv):
                text = status_text(report)
                envid = text.split("Original-Envelope-Id: ", 1)[1].split()[0]
                got[envid] = (report, text)
            assert sorted(got) == ["full", "hdrs+1"]  # NOTIFY=NEVER: no bounce at all
            assert "Action: failed" in got["hdrs+1"][1]
            assert "Original-Recipient: rfc822;Hdrs@remote.test" in got["hdrs+1"][1]
            hdrs = got["hdrs+1"][0]
            assert hdrs.get_payload()[2].get_content_type() == "text/rfc822-headers"  # type: ignore[index]
            assert BODY not in hdrs.as_string() and "Subject: dsn test" in hdrs.as_string()
            full = got["full"][0]
            assert full.get_payload()[2].get_content_type() == "message/rfc822"  # type: ignore[index]
            assert BODY in full.as_string()
            assert wait_until(lambda: srv.log().count("event=bounced") == 3), srv.log()
        finally:
            srv.stop()


def test_parameters_reach_a_dsn_next_hop_and_relayed_is_reported_without_one(
    pub: Path, dns: DnsServer
) -> None:
    with SmtpSink(pub / "dsn") as with_dsn, SmtpSink(pub / "nodsn", options=("-N",)) as no_dsn:
        srv = server(pub / "srv", dns, with_dsn.port).start()
        try:
            send(
                srv,
                ["bob@remote.test"],
                ["RET=HDRS", "ENVID=a+2Bb+3Dc"],
                ["NOTIFY=SUCCESS,DELAY", "ORCPT=rfc822;Bob+40remote.test"],
            )
            assert wait_until(lambda: len(with_dsn.messages()) == 1)
            dump = with_dsn.messages()[0].decode()
            assert "X-Mail-Args: <alice@example.org> RET=HDRS ENVID=a+2Bb+3Dc" in dump
            # Re-encoded as xtext: "@" needs no escape (RFC 3461 §4), "+" and "=" do.
            rcpt_args = "<bob@remote.test> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;Bob@remote.test"
            assert f"X-Rcpt-Args: {rcpt_args}" in dump, dump
            assert wait_until(lambda: queue_empty(srv))
            assert srv.maildir_files("alice") == []  # the next hop owes the report, not us
        finally:
            srv.stop()
        srv.args[srv.args.index("--remote-port") + 1] = str(no_dsn.port)
        srv.start()
        try:
            send(srv, ["bob@remote.test"], ["ENVID=e2"], ["NOTIFY=SUCCESS"])
            assert wait_until(lambda: len(no_dsn.messages()) == 1)
            dump = no_dsn.messages()[0].decode()
            assert "X-Mail-Args: <alice@example.org>\n" in dump.replace("\r", "")
            assert "NOTIFY" not in dump
            assert wait_until(lambda: len(srv.maildir_files("alice")) == 1)
            [report] = reports(srv)
            text = status_text(report)
            assert "Action: relayed" in text and "Original-Envelope-Id: e2" in text
            assert "Remote-MTA: dns; mx.remote.test" in text
        finally:
            srv.stop()


@pytest.mark.skipif(not have("/usr/sbin/postfix"), reason="postfix not installed")
def test_postfix_receives_the_parameters_and_reports_back(pub: Path, dns: DnsServer) -> None:
    srv = server(pub / "srv", dns, 9)
    # Postfix sends its own report for NOTIFY=SUCCESS to alice@example.org: through our mx,
    # never through DNS.
    extra = {"relayhost": f"[127.0.0.1]:{srv.mx_port}", "smtp_dns_support_level": "disabled"}
    with PrivatePostfix(pub / "pf", "remote.test", ["bob"], tls=False, extra=extra) as peer:
        srv.args[srv.args.index("--remote-port") + 1] = str(peer.port)
        srv.start()
        try:
            send(
                srv,
                ["bob@remote.test"],
                ["RET=HDRS", "ENVID=pf+2B42"],
                ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;Robert+40remote.test"],
            )
            assert len(peer.delivered("bob")) == 1
            assert wait_until(lambda: len(srv.maildir_files("alice")) == 1)
            [report] = reports(srv)
            text = status_text(report)
            # Postfix wrote these from the parameters we passed on: they arrived intact.
            assert "Reporting-MTA: dns; peer.test" in text
            assert "Original-Envelope-Id: pf+42" in text
            assert "Original-Recipient: rfc822;Robert@remote.test" in text
            assert "Action: delivered" in text
            assert "sender delivery status notification" in peer.log()
            assert "relayed" not in text
        finally:
            srv.stop()
