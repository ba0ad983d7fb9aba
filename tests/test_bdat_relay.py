"""Our SMTP client and BINARYMIME: BDAT to a next hop that offers it (our own listener),
downgrade or a 5.6.3 bounce toward one that does not (a private Postfix: it offers CHUNKING
but never BINARYMIME)."""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from postier.delivery.base import Recipient, RecipientResult, Status
from postier.delivery.binarymime import downgrade, is_binary
from postier.delivery.lmtp import LmtpBackend
from postier.protocol import client as proto
from tests.dnsserver import DnsServer
from tests.server import PostierServer, make_server
from tests.sinks import PrivatePostfix, have, public_tmpdir
from tests.test_bdat_integration import Client
from tests.test_lmtp import Dovecot, dovecot  # noqa: F401 - dovecot is a fixture
from tests.test_smtp_client import TIMEOUTS, rcpts, relay, statuses, stored

ZONE = {"own.test": {"A": ["127.0.0.1"]}, "example.test": {"A": ["127.0.0.1"]}}

# A bare CR, a NUL and a bare LF in a binary MIME part; "\n" is a line end in the spool.
PART = b"\x00\x01bin\rary \xff\n\x00"
MIME = (
    b"From: sender@origin.test\nTo: alice@own.test\nSubject: binary\nMIME-Version: 1.0\n"
    b'Content-Type: multipart/mixed; boundary="b0"\n\n'
    b"--b0\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
    b"caf\xc3\xa9\n"
    b"--b0\nContent-Type: application/octet-stream\nContent-Transfer-Encoding: binary\n\n"
    + PART
    + b"\n--b0--\n"
)
NOT_MIME = b"From: sender@origin.test\nSubject: raw\n\nNUL \x00 and CR \r here\n"


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    with DnsServer(ZONE) as server:
        yield server


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostierServer]:
    srv = make_server(
        tmp_path_factory.mktemp("own"), users="alice@own.test\n", domains=("own.test",)
    ).start()
    try:
        yield srv
    finally:
        assert srv.stop() == 0


def test_wire_helpers() -> None:
    assert proto.bdat(5, last=False) == b"BDAT 5\r\n"
    assert proto.bdat(0, last=True) == b"BDAT 0 LAST\r\n"
    assert proto.spool_to_wire(b"a\r\nb\rc\x00\n.\n") == b"a\r\r\nb\rc\x00\r\n.\r\n"


def test_downgrade_encodes_only_the_binary_part() -> None:
    out = downgrade(MIME)
    assert out is not None and not is_binary(out)
    assert b"caf\xc3\xa9\n" in out and b"Content-Transfer-Encoding: base64\n" in out
    parts = email.message_from_bytes(out, policy=email.policy.default).get_payload()
    assert parts[1].get_payload(decode=True) == PART.replace(b"\n", b"\r\n")


@pytest.mark.parametrize(
    "content",
    [NOT_MIME, b"Subject: \x00 in a header\nMIME-Version: 1.0\n\nbody\n"],
    ids=["no-mime", "header"],
)
def test_no_downgrade_without_mime_parts_to_encode(content: bytes) -> None:
    assert downgrade(content) is None


def test_relay_with_bdat_to_our_own_listener(dns: DnsServer, pub: Path, own: PostierServer) -> None:
    before = set(own.maildir_files("alice"))
    message = stored(pub, MIME, body_8bit=True)
    results = asyncio.run(relay(dns, own.mx_port).deliver(message, rcpts("alice@own.test")))
    assert statuses(results) == [("alice@own.test", Status.DELIVERED, 250, "2.0.0")]
    assert "BDAT LAST" in results[0].text
    [path] = [p for p in own.maildir_files("alice") if p not in before]
    data = path.read_bytes()
    assert data[data.index(b"From: sender@origin.test") :] == MIME


def test_8bit_text_still_goes_by_data(dns: DnsServer, pub: Path, own: PostierServer) -> None:
    text = b"From: sender@origin.test\nSubject: caf\xc3\xa9\n\nplain 8-bit text\n"
    message = stored(pub, text, body_8bit=True)
    results = asyncio.run(relay(dns, own.mx_port).deliver(message, rcpts("alice@own.test")))
    assert statuses(results) == [("alice@own.test", Status.DELIVERED, 250, "2.0.0")]
    assert "end of data" in results[0].text


pytestmark_postfix = pytest.mark.skipif(
    not have("/usr/sbin/postfix"), reason="postfix not installed"
)


@pytest.fixture(scope="module")
def postfix() -> Iterator[PrivatePostfix]:
    with public_tmpdir() as root:
        pf = PrivatePostfix(root / "pf", "example.test", ["alice"])
        with pf:
            yield pf


@pytestmark_postfix
def test_downgrade_toward_postfix(dns: DnsServer, pub: Path, postfix: PrivatePostfix) -> None:
    message = stored(pub, MIME, body_8bit=True)
    results = asyncio.run(relay(dns, postfix.port).deliver(message, rcpts("alice@example.test")))
    assert statuses(results) == [("alice@example.test", Status.DELIVERED, 250, "2.0.0")]
    [got] = postfix.delivered("alice")
    parsed = email.message_from_bytes(got, policy=email.policy.default)
    binary_part = parsed.get_payload()[1]
    assert binary_part["Content-Transfer-Encoding"] == "base64"
    assert binary_part.get_payload(decode=True) == PART.replace(b"\n", b"\r\n")
    assert base64.b64encode(b"caf\xc3\xa9") not in got  # the text part is left as it was


@pytestmark_postfix
def test_binary_without_mime_bounces_5_6_3(
    dns: DnsServer, pub: Path, postfix: PrivatePostfix
) -> None:
    message = stored(pub, NOT_MIME, body_8bit=True)
    results = asyncio.run(relay(dns, postfix.port).deliver(message, rcpts("alice@example.test")))
    assert statuses(results) == [("alice@example.test", Status.PERMANENT, 554, "5.6.3")]
    assert "BINARYMIME" in results[0].text


def test_daemon_relays_a_bdat_message_with_bdat(
    dns: DnsServer, tmp_path: Path, own: PostierServer
) -> None:
    """The whole path: BDAT in on `local`, the queue, the scheduler, BDAT out to our own mx."""
    before = set(own.maildir_files("alice"))
    sender = make_server(
        tmp_path / "sender",
        extra=["--dns-server", f"127.0.0.1:{dns.port}", "--remote-port", str(own.mx_port)],
    ).start()
    try:
        wire = proto.spool_to_wire(MIME)  # the message as a client sends it: CRLF lines
        client = Client(sender.local_port)
        try:
            assert client.command(b"EHLO client.test")[0] == 250
            client.send(
                b"MAIL FROM:<sender@origin.test> BODY=BINARYMIME\r\nRCPT TO:<alice@own.test>\r\n"
                + proto.bdat(len(wire), last=True)
                + wire
            )
            assert [client.reply()[0] for _ in range(3)] == [250, 250, 250]
        finally:
            client.close()
        deadline = time.monotonic() + 30  # a bound on a hung relay, never a measurement
        while not [p for p in own.maildir_files("alice") if p not in before]:
            assert time.monotonic() < deadline, sender.log()
            time.sleep(0.1)
        assert sender.logged("in reply to BDAT LAST")
    finally:
        assert sender.stop() == 0
    [path] = [p for p in own.maildir_files("alice") if p not in before]
    data = path.read_bytes()
    assert data[data.index(b"From: sender@origin.test") :] == MIME


def test_lmtp_to_dovecot_binary_message(dovecot: Dovecot, pub: Path) -> None:  # noqa: F811
    """LMTP shares the transaction and its BINARYMIME decision: one reply per recipient,
    and a binary message that Dovecot cannot take as is arrives downgraded."""
    backend = LmtpBackend(f"127.0.0.1:{dovecot.port}", timeouts=TIMEOUTS)

    async def go() -> list[RecipientResult]:
        try:
            return await backend.deliver(
                stored(pub, MIME, body_8bit=True),
                [Recipient("alice@example.test", user="alice@example.test"),
                 Recipient("ghost@example.test")],
            )  # fmt: skip
        finally:
            await backend.close()

    results = asyncio.run(go())
    assert statuses(results) == [
        ("alice@example.test", Status.DELIVERED, 250, "2.0.0"),
        ("ghost@example.test", Status.PERMANENT, 550, "5.1.1"),
    ]
    # Dovecot's LMTP offers no BINARYMIME: the binary part arrives in base64.
    assert "in reply to end of data" in results[0].text
    [msg] = dovecot.messages("alice")
    binary_part = msg.get_payload()[1]
    assert binary_part["Content-Transfer-Encoding"] == "base64"
    assert binary_part.get_payload(decode=True) == PART.replace(b"\n", b"\r\n")
