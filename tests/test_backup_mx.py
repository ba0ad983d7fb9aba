"""Backup MX (`--relay-domain`): what it accepts, where it delivers, and loops.

Real parts: `postier serve` as a subprocess named `mx.test`; the loopback DNS responder where
`relay.test` has MX 10 `primary.test` (a private Postfix, or smtp-sink on a fixed port when
the primary must go down and come back) and MX 20 `mx.test` (ourselves); smtplib as the
sending MTA; `postier queue` as the operator runs it.
"""

from __future__ import annotations

import smtplib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from postier.outbound.backup_mx import load_relay_recipients
from tests.dnsserver import DnsServer
from tests.server import PostierServer, free_port, make_server, wait_until
from tests.sinks import PrivatePostfix, SmtpSink, have

pytestmark = pytest.mark.skipif(not have("/usr/sbin/smtp-sink"), reason="postfix not installed")

ZONE = {
    "relay.test": {"MX": [(10, "primary.test"), (20, "mx.test")]},
    "primary.test": {"A": ["127.0.0.1"]},
    "mx.test": {"A": ["127.0.0.1"]},
    # We are the best MX of this one: delivering would loop to ourselves.
    "selfbest.test": {"MX": [(10, "mx.test"), (20, "primary.test")]},
}


def queue_cmd(srv: PostierServer, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "postier", "queue", *args, "-Q", str(srv.root / "queue")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.stdout


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    with DnsServer(ZONE) as server:
        yield server


def backup(root: Path, dns: DnsServer, primary_port: int, *extra: str) -> PostierServer:
    return make_server(
        root,
        extra=[
            "--dns-server", f"127.0.0.1:{dns.port}",
            "--remote-port", str(primary_port),
            "--relay-domain", "relay.test",
            "--relay-domain", "selfbest.test",
            *extra,
        ],
    )  # fmt: skip


def rcpt_reply(srv: PostierServer, rcpt: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", srv.mx_port, timeout=30) as s:
        s.ehlo("sender.test")
        s.mail("someone@sender.test")
        return s.rcpt(rcpt)


def send_mx(srv: PostierServer, rcpt: str, body: str, *, received: int = 0) -> None:
    trace = "".join(
        f"Received: from hop{i}.test by hop{i + 1}.test; x\r\n" for i in range(received)
    )
    with smtplib.SMTP("127.0.0.1", srv.mx_port, timeout=30) as s:
        s.sendmail("someone@sender.test", [rcpt], f"{trace}Subject: {body}\r\n\r\n{body}\r\n")


def test_accepts_for_relay_domain_refuses_others_delivers_to_primary(
    pub: Path, dns: DnsServer
) -> None:
    with PrivatePostfix(pub / "pf", "relay.test", ["bob"], tls=True) as primary:
        srv = backup(pub / "srv", dns, primary.port).start()
        try:
            assert rcpt_reply(srv, "anyone@relay.test")[0] == 250
            code, text = rcpt_reply(srv, "bob@elsewhere.test")
            assert (code, text[:5]) == (554, b"5.7.1")
            send_mx(srv, "bob@relay.test", "via-backup")
            delivered = primary.delivered("bob")
            assert len(delivered) == 1 and b"via-backup" in delivered[0]
            assert not srv.maildir_files("bob")  # never delivered locally
            # Our Received is on it, and it went to primary.test, MX 10.
            assert b"by mx.test" in delivered[0]
            assert srv.logged("host=primary.test")
        finally:
            srv.stop()


def test_retries_while_primary_is_down_then_flush_delivers(pub: Path, dns: DnsServer) -> None:
    port = free_port()
    srv = backup(pub / "srv", dns, port).start()
    try:
        send_mx(srv, "carol@relay.test", "while-down")
        assert wait_until(lambda: "carol@relay.test" in queue_cmd(srv, "list"))
        assert wait_until(lambda: "connect_failed" in srv.log())
        with SmtpSink(pub / "primary", port=port) as primary:
            queue_cmd(srv, "flush")
            assert wait_until(lambda: len(primary.messages()) == 1)
            assert b"while-down" in primary.messages()[0]
            assert wait_until(lambda: "carol@relay.test" not in queue_cmd(srv, "list"))
    finally:
        srv.stop()
    assert "port=" + str(port) in srv.log()


def test_never_delivers_to_itself_when_it_is_the_best_mx(pub: Path, dns: DnsServer) -> None:
    with SmtpSink(pub / "sink") as sink:
        srv = backup(pub / "srv", dns, sink.port).start()
        try:
            send_mx(srv, "dave@selfbest.test", "would-loop")
            assert wait_until(lambda: "4.4.6" in srv.log())
            assert "dave@selfbest.test" in queue_cmd(srv, "list")  # held, not bounced
            assert sink.messages() == []  # not even to the less preferred primary.test
        finally:
            srv.stop()
        assert srv.logged("no MX host more preferred than ours")


def test_relay_recipients_file(pub: Path, dns: DnsServer) -> None:
    (pub / "rr").write_text("# valid recipients of the relay domain\nbob@relay.test\n")
    with SmtpSink(pub / "sink") as sink:
        srv = backup(pub / "srv", dns, sink.port, "--relay-recipients", str(pub / "rr")).start()
        try:
            assert rcpt_reply(srv, "Bob@relay.test")[0] == 250
            code, text = rcpt_reply(srv, "nobody@relay.test")
            assert (code, text[:5]) == (550, b"5.1.1")
        finally:
            srv.stop()


def test_relay_recipients_file_errors_name_the_line(tmp_path: Path) -> None:
    (tmp_path / "rr").write_text("bob@relay.test\nnot an address\n")
    with pytest.raises(Exception, match=r"rr:2"):
        load_relay_recipients(tmp_path / "rr")


def test_loop_is_refused_after_too_many_received_lines(pub: Path, dns: DnsServer) -> None:
    with SmtpSink(pub / "sink") as sink:
        srv = backup(pub / "srv", dns, sink.port).start()
        try:
            send_mx(srv, "bob@relay.test", "fifty-hops", received=50)  # the limit: accepted
            with pytest.raises(smtplib.SMTPDataError) as refused:
                send_mx(srv, "bob@relay.test", "fifty-one-hops", received=51)
            assert refused.value.smtp_code == 554
            assert refused.value.smtp_error.startswith(b"5.4.6")
            assert wait_until(lambda: len(sink.messages()) == 1)
            assert b"fifty-hops" in sink.messages()[0]
        finally:
            srv.stop()
        assert srv.logged("check=hops")
