"""DKIM through the whole daemon: signed once at queue commit, verified by OpenDKIM after a
private Postfix has received it; bounces signed too; mail from the mx listener never signed.

Real parts only: `postier serve` with `--dkim-keys`, a loopback DNS responder for MX/A
records, a private Postfix as the receiving MX, `postier sendmail`, and `opendkim-testmsg`
checking the delivered files against the keys published by a responder (tests/dkim_peer.py).
"""

from __future__ import annotations

import os
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from postier.dkim.keys import DkimKey, generate_key
from tests.dkim_peer import available, fields_of, key_zone, only_signature, opendkim_verify
from tests.dnsserver import DnsServer
from tests.server import PostierServer, make_server
from tests.sinks import PrivatePostfix, have

ROOT = Path(__file__).resolve().parent.parent
ZONE = {
    "remote.test": {"MX": [(10, "mx.remote.test")]},
    "mx.remote.test": {"A": ["127.0.0.1"]},
    "nullmx.test": {"MX": [(0, ".")]},
}
MESSAGE = (
    "From: Alice <alice@example.org>\r\n"
    "To: Bob <bob@remote.test>\r\n"
    "Subject: signed at commit\r\n"
    "Date: Wed, 02 Dec 2026 07:00:00 +0000\r\n"
    "Message-ID: <relay-1@example.org>\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: 8bit\r\n"
    "\r\n"
    "Grüße aus Köln.\r\n"
    ".a line that was dot-stuffed\r\n"
).encode()


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    with DnsServer(ZONE) as server:
        yield server


@pytest.fixture
def keys(pub: Path) -> list[DkimKey]:
    return [
        generate_key(pub / "keys", "example.org", "rsa-1", "rsa"),
        generate_key(pub / "keys", "example.org", "ed-1", "ed25519"),
    ]


def signing_server(pub: Path, dns: DnsServer, remote_port: int, **kw: object) -> PostierServer:
    extra = [
        "-H", "mx.example.org",  # our DSNs come from MAILER-DAEMON@mx.example.org
        "--dns-server", f"127.0.0.1:{dns.port}",
        "--remote-port", str(remote_port),
        "--dkim-keys", str(pub / "keys"),
    ]  # fmt: skip
    return make_server(pub / "srv", extra=extra, **kw)  # type: ignore[arg-type]


def assert_verified(message: bytes, keys: list[DkimKey]) -> None:
    """Each of our two signatures verifies with OpenDKIM, and nothing else signed it."""
    sigs = [f for f in fields_of(message) if f.startswith(b"DKIM-Signature:")]
    assert len(sigs) == 2, message[:2000]
    for algorithm in (b"rsa-sha256", b"ed25519-sha256"):
        result = opendkim_verify(only_signature(message, algorithm), key_zone(*keys))
        assert result.returncode == 0, (algorithm, result.stderr)


pytestmark = [
    pytest.mark.skipif(not have("/usr/sbin/postfix"), reason="postfix not installed"),
    pytest.mark.skipif(available() is not None, reason=str(available())),
]


def test_relayed_and_sendmail_mail_verifies_after_postfix(
    pub: Path, dns: DnsServer, keys: list[DkimKey]
) -> None:
    with PrivatePostfix(pub / "pf", "remote.test", ["bob"], tls=True) as peer:
        srv = signing_server(pub, dns, peer.port).start()
        try:
            with smtplib.SMTP("127.0.0.1", srv.local_port, timeout=30) as s:
                s.sendmail("alice@example.org", ["bob@remote.test"], MESSAGE, ["BODY=8BITMIME"])
            (first,) = peer.delivered("bob")
            assert_verified(first, keys)
            # Signed once, at commit: the signature sits above our Received, below Postfix's.
            names = [f.split(b":", 1)[0].lower() for f in fields_of(first)]
            assert names.index(b"dkim-signature") < names.index(b"from")
            assert srv.logged("event=dkim-signed")

            sent = subprocess.run(
                [sys.executable, "-m", "postier", "sendmail", "-t", "-Q", str(srv.root / "queue")],
                input=b"From: root@example.org\nTo: bob@remote.test\nSubject: cron\n"
                b"Date: Wed, 02 Dec 2026 07:00:00 +0000\n\nnightly report\n",
                capture_output=True,
                timeout=60,
                env=dict(os.environ, PYTHONPATH=str(ROOT)),
            )
            assert sent.returncode == 0, sent.stderr
            for _ in range(400):  # a safety bound, not a speed assertion
                delivered = peer.delivered("bob")
                if len(delivered) == 2:
                    break
                time.sleep(0.05)
            second = next(m for m in delivered if b"nightly report" in m)
            assert_verified(second, keys)
        finally:
            srv.stop()


def test_mail_from_the_mx_listener_is_never_signed(
    pub: Path, dns: DnsServer, keys: list[DkimKey]
) -> None:
    """A stranger on port 25 claiming our domain, forwarded by an alias: no signature of ours."""
    with PrivatePostfix(pub / "pf", "remote.test", ["bob"], tls=False) as peer:
        srv = signing_server(pub, dns, peer.port, aliases="fwd@example.org: bob@remote.test\n")
        srv.start()
        try:
            with smtplib.SMTP("127.0.0.1", srv.mx_port, timeout=30) as s:
                s.sendmail("ceo@example.org", ["fwd@example.org"], MESSAGE, ["BODY=8BITMIME"])
            (forwarded,) = peer.delivered("bob")
            assert "Grüße".encode() in forwarded
            assert b"DKIM-Signature:" not in forwarded
        finally:
            srv.stop()


def test_bounces_are_signed(pub: Path, dns: DnsServer, keys: list[DkimKey]) -> None:
    srv = signing_server(pub, dns, 9).start()
    try:
        with smtplib.SMTP("127.0.0.1", srv.local_port, timeout=30) as s:
            s.sendmail("alice@example.org", ["someone@nullmx.test"], MESSAGE, ["BODY=8BITMIME"])
        for _ in range(600):  # a safety bound, not a speed assertion
            if srv.maildir_files("alice"):
                break
            time.sleep(0.05)
        (bounce,) = [f.read_bytes() for f in srv.maildir_files("alice")]
        assert b"MAILER-DAEMON@mx.example.org" in bounce
        assert_verified(bounce, keys)
    finally:
        srv.stop()


def test_serve_refuses_a_world_readable_key_exit_2(pub: Path, keys: list[DkimKey]) -> None:
    keys[1].path.chmod(0o644)
    srv = make_server(pub / "srv", extra=["--dkim-keys", str(pub / "keys")])
    result = subprocess.run(
        [sys.executable, "-m", "postier", "serve", *srv.args],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("postier:")]
    assert len(errors) == 1, result.stderr  # one line, naming the file and the fix
    assert str(keys[1].path) in errors[0] and "chmod 600" in errors[0]


def test_serve_refuses_a_missing_key_directory_exit_2(pub: Path) -> None:
    srv = make_server(pub / "srv", extra=["--dkim-keys", str(pub / "nope")])
    result = subprocess.run(
        [sys.executable, "-m", "postier", "serve", *srv.args],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert result.returncode == 2
    assert "dkim_keys" in result.stderr and "nope" in result.stderr
