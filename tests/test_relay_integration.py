"""Outbound mail through the whole daemon: session → queue → scheduler → DNS → remote peer.

Real parts only: `postier serve` as a subprocess, a DNS responder on loopback serving MX and A
records (`--dns-server`), Postfix's smtp-sink and a private Postfix as the receiving MX on a
high port (`--remote-port`), `postier queue` and `postier sendmail` as users run them.
"""

from __future__ import annotations

import email
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dnsserver import DnsServer
from tests.server import PostierServer, make_server, wait_until
from tests.sinks import PrivatePostfix, SmtpSink, have

pytestmark = pytest.mark.skipif(not have("/usr/sbin/smtp-sink"), reason="postfix not installed")

ZONE = {
    "remote.test": {"MX": [(10, "mx.remote.test")]},
    "mx.remote.test": {"A": ["127.0.0.1"]},
    "nullmx.test": {"MX": [(0, ".")]},
}


def queue_cmd(srv: PostierServer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "postier", "queue", *args, "-Q", str(srv.root / "queue")],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    with DnsServer(ZONE) as server:
        yield server


def relay_server(tmp: Path, dns: DnsServer, remote_port: int) -> PostierServer:
    return make_server(
        tmp,
        extra=["--dns-server", f"127.0.0.1:{dns.port}", "--remote-port", str(remote_port)],
    )


def send_local(srv: PostierServer, sender: str, rcpts: list[str], body: str) -> None:
    with smtplib.SMTP("127.0.0.1", srv.local_port, timeout=30) as s:
        s.sendmail(sender, rcpts, f"Subject: relay test\r\n\r\n{body}\r\n")


def test_relay_to_postfix_over_starttls(pub: Path, dns: DnsServer) -> None:
    with PrivatePostfix(pub / "pf", "remote.test", ["bob"], tls=True) as peer:
        srv = relay_server(pub / "srv", dns, peer.port).start()
        try:
            send_local(srv, "alice@example.org", ["bob@remote.test"], "over the wire")
            got = peer.delivered("bob")
            assert len(got) == 1
            msg = email.message_from_bytes(got[0])
            assert "over the wire" in msg.get_payload()
            # Postfix records that we used TLS; our own Received header is there too.
            received = msg.get_all("Received")
            assert any("(postier)" in r for r in received)
            assert any("TLS" in r for r in received)
            assert wait_until(
                lambda: queue_cmd(srv, "list").stdout.strip() in ("", "Mail queue is empty")
            )
        finally:
            srv.stop()


def test_mx_never_relays_and_queues_nothing(pub: Path, dns: DnsServer) -> None:
    srv = relay_server(pub / "srv", dns, 9).start()
    try:
        with (
            smtplib.SMTP("127.0.0.1", srv.mx_port, timeout=30) as s,
            pytest.raises(smtplib.SMTPRecipientsRefused) as info,
        ):
            s.sendmail("x@remote.test", ["bob@remote.test"], "Subject: x\r\n\r\nx\r\n")
        assert info.value.recipients["bob@remote.test"][0] == 554
        assert not list((srv.root / "queue" / "env").glob("*"))
    finally:
        srv.stop()


def test_mixed_local_and_remote_recipients(pub: Path, dns: DnsServer) -> None:
    with SmtpSink(pub / "sink") as sink:
        srv = relay_server(pub / "srv", dns, sink.port).start()
        try:
            send_local(srv, "carol@example.org", ["alice@example.org", "bob@remote.test"], "mixed")
            assert len(srv.maildir_files("alice")) == 1
            assert wait_until(lambda: len(sink.messages()) == 1)
        finally:
            srv.stop()


def test_permanent_failure_bounces_to_local_sender(pub: Path, dns: DnsServer) -> None:
    with SmtpSink(pub / "sink", options=("-f", "RCPT")) as sink:
        srv = relay_server(pub / "srv", dns, sink.port).start()
        try:
            send_local(srv, "alice@example.org", ["bob@remote.test"], "will bounce")
            assert wait_until(lambda: len(srv.maildir_files("alice")) == 1)
            dsn = email.message_from_bytes(srv.maildir_files("alice")[0].read_bytes())
            assert dsn.get_content_type() == "multipart/report"
            assert dsn.get_param("report-type") == "delivery-status"
            assert "<MAILER-DAEMON@mx.test>" in dsn["From"]
            status = dsn.get_payload()[1]
            assert status.get_content_type() == "message/delivery-status"
            text = status.as_string()
            assert "Final-Recipient: rfc822; bob@remote.test" in text
            assert "Action: failed" in text
            assert "Status: 5." in text
            # The bounce itself went with the null sender.
            assert dsn["Return-Path"] == "<>"
        finally:
            srv.stop()


def test_null_mx_bounces(pub: Path, dns: DnsServer) -> None:
    srv = relay_server(pub / "srv", dns, 9).start()
    try:
        send_local(srv, "alice@example.org", ["someone@nullmx.test"], "nowhere")
        assert wait_until(lambda: len(srv.maildir_files("alice")) == 1)
        text = srv.maildir_files("alice")[0].read_text()
        assert "5.1.10" in text
    finally:
        srv.stop()


def test_temporary_failure_then_flush_delivers(pub: Path, dns: DnsServer) -> None:
    soft = SmtpSink(pub / "soft", options=("-r", "RCPT")).start()
    port = soft.port
    srv = relay_server(pub / "srv", dns, port).start()
    try:
        send_local(srv, "alice@example.org", ["bob@remote.test"], "try again")
        assert wait_until(
            lambda: (
                "4" in queue_cmd(srv, "list").stdout
                and "bob@remote.test" in queue_cmd(srv, "list").stdout
            )
        )
        soft.stop()
        with SmtpSink(pub / "good", port=port) as good:
            assert queue_cmd(srv, "flush").returncode == 0
            assert wait_until(lambda: len(good.messages()) == 1)
        assert not srv.maildir_files("alice")  # no bounce
    finally:
        srv.stop()
        soft.stop()


def test_kill9_after_250_delivers_exactly_once_after_restart(pub: Path, dns: DnsServer) -> None:
    # Nothing listens on the remote port yet: the message waits in the queue.
    from tests.sinks import free_port

    port = free_port()
    srv = relay_server(pub / "srv", dns, port).start()
    send_local(srv, "alice@example.org", ["bob@remote.test"], "survive a crash")
    srv.kill()
    with SmtpSink(pub / "sink", port=port) as sink:
        srv.start()
        try:
            queue_cmd(srv, "flush")
            assert wait_until(lambda: len(sink.messages()) == 1)
            time.sleep(1.0)  # give a duplicate the chance to show up (it must not)
            assert len(sink.messages()) == 1
        finally:
            srv.stop()


def test_sendmail_t_through_the_maildrop(pub: Path, dns: DnsServer) -> None:
    srv = relay_server(pub / "srv", dns, 9).start()
    try:
        msg = "To: bob@example.org\nCc: carol@example.org\nSubject: from cron\n\nnightly report\n"
        res = subprocess.run(
            [sys.executable, "-m", "postier", "sendmail", "-t", "-f", "root@example.org",
             "-Q", str(srv.root / "queue")],
            input=msg, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        assert wait_until(lambda: len(srv.maildir_files("bob")) == 1)
        assert wait_until(lambda: len(srv.maildir_files("carol-box")) == 1)
        assert "nightly report" in srv.maildir_files("bob")[0].read_text()
    finally:
        srv.stop()


def test_two_workers_relay_everything_at_once(pub: Path, dns: DnsServer) -> None:
    """With --workers 2 half the sessions commit in the worker without the scheduler; it tells
    the scheduler on the queue's wake-up socket (envelope and content carried along), so every
    message leaves without waiting for a flush request, and none twice."""
    with SmtpSink(pub / "sink") as sink:
        srv = relay_server(pub / "srv", dns, sink.port)
        srv.args += ["--workers", "2"]
        srv.start()
        try:
            for i in range(40):  # a connection each: both workers take some
                send_local(srv, "alice@example.org", [f"r{i}@remote.test"], f"message {i}")
            assert wait_until(lambda: len(sink.messages()) >= 40)
            bodies = [m for m in sink.messages() if b"message " in m]
            assert sorted(int(m.rsplit(b"message ", 1)[1].split()[0]) for m in bodies) == list(
                range(40)
            )
            assert wait_until(lambda: not list((srv.root / "queue" / "env").iterdir()))
        finally:
            srv.stop()
