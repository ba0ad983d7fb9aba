"""SRS: a forwarded message passes SPF at the receiver, keeps its DKIM signature, and its
bounce finds the way back; forged and expired SRS addresses are refused.

Real parts: `postier serve` as the forwarder (`fwd@example.org` is an alias of
`bob@remote.test`), a private Postfix as remote.test's MX, smtp-sink as orig.test's MX,
the loopback DNS responder for MX, SPF and DKIM key records, pyspf as the receiving side's
SPF check (its dnspython look-ups pointed at the responder), Perl's Mail::DKIM to sign and
dkimpy to verify. The sender's domain orig.test allows only 192.0.2.1 to send: forwarding
its mail unchanged from 127.0.0.1 would fail SPF.
"""

from __future__ import annotations

import contextlib
import email
import shutil
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dkim
import dns.resolver
import pytest
import spf

from postier.outbound.srs import FORGED_OR_EXPIRED, Srs
from tests.dnsserver import DnsServer
from tests.mailauth_dns import txt
from tests.mailauth_sign import genkey, key_record, sign
from tests.server import PostierServer, make_server, wait_until
from tests.sinks import PrivatePostfix, SmtpSink, have

SECRET = "a test secret, not a real one"


def test_forward_and_reverse() -> None:
    srs = Srs(SECRET)
    rewritten = srs.forward("carol@orig.test", "example.org")
    assert rewritten.startswith("SRS0=") and rewritten.endswith("=orig.test=carol@example.org")
    assert srs.reverse(rewritten) == "carol@orig.test"
    assert srs.forward("", "example.org") == ""  # a forwarded bounce stays a bounce
    again = Srs("the next hop's secret").forward(rewritten, "next.test")
    assert again.startswith("SRS1=") and Srs("the next hop's secret").reverse(again) == rewritten


def test_forged_and_expired_are_refused() -> None:
    srs = Srs(SECRET)
    assert srs.reverse("SRS0=abcd=AA=orig.test=carol@example.org") == FORGED_OR_EXPIRED
    assert Srs("another secret").reverse(srs.forward("c@o.test", "e.org")) == FORGED_OR_EXPIRED
    old = Srs(SECRET, clock=lambda: time.time() - 30 * 86400).forward("c@o.test", "e.org")
    assert srs.reverse(old) == FORGED_OR_EXPIRED


# ---- through the daemon --------------------------------------------------------------------


@contextlib.contextmanager
def spf_resolver(port: int) -> Iterator[None]:
    """pyspf asks dnspython's default resolver: point it at the loopback responder."""
    saved = dns.resolver.default_resolver
    res = dns.resolver.Resolver(configure=False)
    res.nameservers, res.port, res.lifetime = ["127.0.0.1"], port, 5.0
    dns.resolver.default_resolver = res
    try:
        yield
    finally:
        dns.resolver.default_resolver = saved


def forwarder(root: Path, dns_port: int, remote_port: int) -> PostierServer:
    root.mkdir(parents=True, exist_ok=True)
    (root / "srs-secret").write_text(SECRET + "\n")
    (root / "srs-secret").chmod(0o600)
    (root / "postier.toml").write_text('srs_secret_file = "srs-secret"\n')
    return make_server(
        root,
        aliases="fwd@example.org: bob@remote.test\nboth@example.org: alice, bob@remote.test\n",
        extra=[
            "-c", str(root / "postier.toml"),
            "--dns-server", f"127.0.0.1:{dns_port}",
            "--remote-port", str(remote_port),
        ],
    )  # fmt: skip


def rcpt_code(srv: PostierServer, sender: str, rcpt: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", srv.mx_port, timeout=30) as s:
        s.ehlo("sender.test")
        s.mail(sender)
        return s.rcpt(rcpt)


@pytest.mark.skipif(
    not (have("/usr/sbin/smtp-sink") and shutil.which("opendkim-genkey") and shutil.which("perl")),
    reason="postfix, opendkim-tools or perl not installed",
)
def test_forward_passes_spf_keeps_dkim_and_bounces_return(pub: Path) -> None:
    key = genkey(pub, "sel", "orig.test")
    zone = {
        "example.org": {"TXT": [txt("v=spf1 ip4:127.0.0.1 -all")]},
        "orig.test": {"TXT": [txt("v=spf1 ip4:192.0.2.1 -all")], "MX": [(10, "mx.orig.test")]},
        "mx.orig.test": {"A": ["127.0.0.2"]},
        "sel._domainkey.orig.test": {"TXT": [txt(key_record(key))]},
        "remote.test": {"MX": [(10, "mx.remote.test")]},
        "mx.remote.test": {"A": ["127.0.0.1"]},
    }
    original = (
        b"From: Carol <carol@orig.test>\nTo: fwd@example.org\nSubject: forwarded\n"
        b"Date: Wed, 02 Dec 2026 07:00:00 +0000\nMessage-ID: <srs-1@orig.test>\n\n"
        b"Signed by orig.test; the forward must not touch it.\n"
    )
    signed = sign(original, key, "sel", "orig.test").replace(b"\n", b"\r\n")
    with (
        DnsServer(zone) as dns_server,
        PrivatePostfix(pub / "pf", "remote.test", ["bob"], tls=False) as remote,
        SmtpSink(pub / "orig", host="127.0.0.2", port=remote.port) as orig_mx,
    ):
        srv = forwarder(pub / "srv", dns_server.port, remote.port).start()
        try:
            with smtplib.SMTP("127.0.0.1", srv.mx_port, timeout=30) as s:
                s.sendmail("carol@orig.test", ["fwd@example.org"], signed)
            got = remote.delivered("bob")
            assert len(got) == 1
            msg = email.message_from_bytes(got[0])
            return_path = msg["Return-Path"].strip("<>")
            assert return_path.startswith("SRS0=") and return_path.endswith("@example.org")
            with spf_resolver(dns_server.port):
                # The receiver's SPF check: the rewritten sender passes, the original fails.
                assert spf.check2(i="127.0.0.1", s=return_path, h="mx.test")[0] == "pass"
                assert spf.check2(i="127.0.0.1", s="carol@orig.test", h="mx.test")[0] == "fail"

            def dns_txt(name: bytes, timeout: int = 5) -> bytes:
                answer = dns.resolver.default_resolver.resolve(name.decode(), "TXT")
                return b"".join(answer[0].strings)

            with spf_resolver(dns_server.port):
                assert dkim.verify(got[0].replace(b"\n", b"\r\n"), dnsfunc=dns_txt)

            # The bounce to the SRS address goes back to carol@orig.test, unsigned by us.
            assert rcpt_code(srv, "", return_path)[0] == 250
            with smtplib.SMTP("127.0.0.1", srv.mx_port, timeout=30) as s:
                s.sendmail("", [return_path], b"Subject: Undelivered Mail\r\n\r\nbounce\r\n")
            assert wait_until(lambda: len(orig_mx.messages()) == 1)
            assert b"X-Rcpt-Args: <carol@orig.test>" in orig_mx.messages()[0]
            assert b"X-Mail-Args: <>" in orig_mx.messages()[0]

            # Forged and expired SRS addresses: 550 5.1.1.
            forged = "SRS0=abcd=AA=orig.test=carol@example.org"
            old = Srs(SECRET, clock=lambda: time.time() - 30 * 86400)
            expired = old.forward("carol@orig.test", "example.org")
            for address in (forged, expired):
                code, text = rcpt_code(srv, "", address)
                assert (code, text[:5]) == (550, b"5.1.1")
        finally:
            srv.stop()
        assert srv.logged("event=forwarded")


@pytest.mark.skipif(not have("/usr/sbin/smtp-sink"), reason="postfix not installed")
def test_alias_to_remote_expanded_in_a_queued_retry_is_forwarded(pub: Path) -> None:
    """`postier sendmail` queues the alias as given; the scheduler's local delivery expands
    it and must forward (it failed permanently with 5.1.1 before), and deliver its local
    part."""
    zone = {"remote.test": {"MX": [(10, "mx.remote.test")]}, "mx.remote.test": {"A": ["127.0.0.1"]}}
    with DnsServer(zone) as dns_server, SmtpSink(pub / "remote") as remote:
        srv = forwarder(pub / "srv", dns_server.port, remote.port).start()
        try:
            res = subprocess.run(
                [sys.executable, "-m", "postier", "sendmail", "-i", "-f", "alice@example.org",
                 "-Q", str(srv.root / "queue"), "both@example.org"],
                input="Subject: via the queue\n\nqueued\n", capture_output=True, text=True,
                timeout=60,
            )  # fmt: skip
            assert res.returncode == 0, res.stderr
            assert wait_until(lambda: len(remote.messages()) == 1)
            assert wait_until(lambda: len(srv.maildir_files("alice")) == 1)
            # Our own sender is not rewritten: it passes SPF from here as it is.
            assert b"X-Mail-Args: <alice@example.org>" in remote.messages()[0]
        finally:
            srv.stop()
