"""DKIM signatures made by postier, checked by OpenDKIM against keys in a loopback DNS zone.

OpenDKIM (`opendkim-testmsg`, Debian's opendkim-tools) is the independent implementation:
it finds the keys through DNS, served by tests/dnsserver.py inside a namespace of the test's
own (tests/dkim_peer.py). dkimpy checks what OpenDKIM's strictness hides: OpenDKIM refuses a
message with two From fields before it looks at the signature, so "a From added afterwards
breaks it" is shown by dkimpy, and by OpenDKIM with another oversigned field.
"""

from __future__ import annotations

import io
import re
import tracemalloc
from pathlib import Path

import dkim
import pytest

from postier.dkim.keys import DkimKey, generate_key
from postier.dkim.signer import OVERSIGNED, DkimSigner, include_headers
from postier.errors import ConfigError
from tests.dkim_peer import (
    available,
    crlf,
    fields_of,
    key_zone,
    only_signature,
    opendkim_verify,
)

needs_opendkim = pytest.mark.skipif(available() is not None, reason=str(available()))

RETURN_PATH = b"Return-Path: <alice@example.org>\n"
RECEIVED = b"Received: from client.example (client.example [192.0.2.1])\n\tby mx.test; Wed, 02 Dec 2026 07:00:00 +0000\n"  # noqa: E501


def message(headers: bytes = b"", body: bytes = b"Hello,\n\nthis is a test.\n") -> bytes:
    """A message in postier's spool format: Return-Path, our Received, then the message."""
    head = (
        b"From: Alice <alice@example.org>\n"
        b"To: Bob <bob@remote.test>\n"
        b"Subject: a test\n"
        b"Date: Wed, 02 Dec 2026 07:00:00 +0000\n"
        b"Message-ID: <1@example.org>\n"
    )
    return RETURN_PATH + RECEIVED + head + headers + b"\n" + body


@pytest.fixture(scope="module")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("keys")


@pytest.fixture(scope="module")
def keys(keydir: Path) -> dict[str, DkimKey]:
    return {
        "rsa": generate_key(keydir, "example.org", "rsa-s1", "rsa", 2048),
        "ed25519": generate_key(keydir, "example.org", "ed-s1", "ed25519"),
    }


@pytest.fixture(scope="module")
def signer(keydir: Path, keys: dict[str, DkimKey]) -> DkimSigner:
    return DkimSigner(keydir, is_local=lambda domain: domain == "example.org")


@pytest.fixture(scope="module")
def zone(keys: dict[str, DkimKey]) -> dict[str, object]:
    return key_zone(*keys.values())


def sign(signer: DkimSigner, data: bytes, **kw: object) -> bytes:
    """The message as it goes on the wire: after Return-Path, our signatures first."""
    signed = signer.sign_bytes(data, len(RETURN_PATH), **kw)  # type: ignore[arg-type]
    assert signed.startswith(RETURN_PATH)
    return signed[len(RETURN_PATH) :]


def tags(wire: bytes, algorithm: bytes) -> dict[bytes, bytes]:
    (field,) = [f for f in fields_of(wire) if b"a=" + algorithm + b";" in f]
    value = re.sub(rb"\s+", b"", field.split(b":", 1)[1])
    return dict(t.split(b"=", 1) for t in value.split(b";") if t)


def dnsfunc_for(keys: dict[str, DkimKey]):  # type: ignore[no-untyped-def]
    records = {f"{k.dns_name()}.".encode(): k.dns_value().encode() for k in keys.values()}
    return lambda name, timeout=5: records.get(name)


# -- what is signed, and how ------------------------------------------------------------


def test_dual_signature_tags(signer: DkimSigner) -> None:
    wire = sign(signer, message(b"Reply-To: <alice@example.org>\n"))
    sigs = [f for f in fields_of(wire) if f.startswith(b"DKIM-Signature:")]
    assert len(sigs) == 2
    assert wire.startswith(b"DKIM-Signature:")  # above our Received:
    for algorithm in (b"rsa-sha256", b"ed25519-sha256"):
        t = tags(wire, algorithm)
        assert t[b"d"] == b"example.org"
        assert t[b"c"] == b"relaxed/relaxed"
        assert b"l" not in t
        assert t[b"t"].isdigit()
        signed = t[b"h"].split(b":")
        for name in OVERSIGNED:
            present = sum(f.lower().startswith(name.encode() + b":") for f in fields_of(wire))
            assert signed.count(name.encode()) == present + 1, name
        assert b"received" not in signed and b"return-path" not in signed
    assert tags(wire, b"rsa-sha256")[b"bh"] == tags(wire, b"ed25519-sha256")[b"bh"]


def test_include_headers_counts() -> None:
    names = [b"Received", b"From", b"To", b"To", b"Subject", b"X-Mailer", b"References"]
    h = include_headers(names)
    assert h.count(b"to") == 3 and h.count(b"from") == 2 and h.count(b"cc") == 1
    assert b"references" in h and b"x-mailer" not in h and b"received" not in h


@needs_opendkim
@pytest.mark.parametrize("algorithm", [b"rsa-sha256", b"ed25519-sha256"])
def test_opendkim_verifies(signer: DkimSigner, zone: dict[str, object], algorithm: bytes) -> None:
    wire = only_signature(sign(signer, message()), algorithm)
    result = opendkim_verify(crlf(wire), zone)
    assert result.returncode == 0, result.stderr
    # The same message with its body changed does not verify: the check has teeth.
    result = opendkim_verify(crlf(wire + b"one more line\n"), zone)
    assert result.returncode != 0 and "Bad signature" in result.stderr


@needs_opendkim
def test_opendkim_verifies_8bit_body_and_long_folded_headers(
    signer: DkimSigner, zone: dict[str, object]
) -> None:
    long_to = b"To: " + b",\n ".join(b"user%d@remote.test" % i for i in range(40)) + b"\n"
    long_subject = b"Subject: " + b" ".join(b"word%d" % i for i in range(60)) + b"\n"
    headers = (
        b"X-Long: " + b"x" * 900 + b"\n"  # one physical line of 900 octets
        b"Content-Type: text/plain; charset=utf-8\n"
        b"Content-Transfer-Encoding: 8bit\n"
        b"MIME-Version: 1.0\n"
    )
    body = "Grüße aus Köln, 東京 — ∑ ≠ 0\n\ttabs  and   spaces  \n\n\n".encode() * 200
    data = message(headers, body).replace(b"To: Bob <bob@remote.test>\n", long_to)
    data = data.replace(b"Subject: a test\n", long_subject)
    for algorithm in (b"rsa-sha256", b"ed25519-sha256"):
        wire = only_signature(sign(signer, data), algorithm)
        result = opendkim_verify(crlf(wire), zone)
        assert result.returncode == 0, result.stderr


@needs_opendkim
def test_oversigning_breaks_on_added_fields(
    signer: DkimSigner, keys: dict[str, DkimKey], zone: dict[str, object]
) -> None:
    wire = sign(signer, message())
    rsa = only_signature(wire, b"rsa-sha256")
    # A field we do not sign may be added on the way: still valid (the control).
    assert opendkim_verify(crlf(b"X-Added: by a list\n" + rsa), zone).returncode == 0
    # An oversigned field that was absent (Reply-To) breaks it.
    result = opendkim_verify(crlf(b"Reply-To: <thief@evil.test>\n" + rsa), zone)
    assert result.returncode != 0 and "Bad signature" in result.stderr
    # A From added afterwards: OpenDKIM refuses it outright, dkimpy says the signature fails.
    forged = b"From: Thief <thief@evil.test>\n" + wire
    assert opendkim_verify(crlf(only_signature(forged, b"rsa-sha256")), zone).returncode != 0
    dnsfunc = dnsfunc_for(keys)
    intact = dkim.DKIM(crlf(wire))
    assert intact.verify(idx=0, dnsfunc=dnsfunc) and intact.verify(idx=1, dnsfunc=dnsfunc)
    verifier = dkim.DKIM(crlf(forged))
    assert not verifier.verify(idx=0, dnsfunc=dnsfunc)
    assert not verifier.verify(idx=1, dnsfunc=dnsfunc)


# -- which messages, which key ----------------------------------------------------------


@pytest.mark.parametrize(
    "from_field",
    [
        b"From: someone@remote.test\n",  # not our domain
        b"From: a@example.org\nFrom: b@example.org\n",  # two From fields
        b"From: a@example.org, b@remote.test\n",  # addresses of two domains
        b"From: undisclosed\n",  # no address
        b"From: a@sub.example.org\n",  # a subdomain has no keys of its own
    ],
)
def test_not_signed(signer: DkimSigner, from_field: bytes) -> None:
    data = message().replace(b"From: Alice <alice@example.org>\n", from_field)
    assert signer.sign_bytes(data, len(RETURN_PATH)) == data


def test_not_signed_when_not_local(keydir: Path, keys: dict[str, DkimKey]) -> None:
    remote_only = DkimSigner(keydir, is_local=lambda domain: False)
    assert remote_only.sign_bytes(message(), len(RETURN_PATH)) == message()


def test_malformed_header_section_is_sent_unsigned(signer: DkimSigner) -> None:
    data = RETURN_PATH + b"From: a@example.org\nthis is no header\n\nbody\n"
    assert signer.sign_bytes(data, len(RETURN_PATH)) == data


def test_own_messages_use_the_nearest_parent_with_keys(
    signer: DkimSigner, keys: dict[str, DkimKey]
) -> None:
    bounce = message().replace(
        b"From: Alice <alice@example.org>\n",
        b"From: Mail Delivery System <MAILER-DAEMON@mx.example.org>\n",
    )
    assert signer.sign_bytes(bounce, len(RETURN_PATH)) == bounce  # not for ordinary mail
    wire = sign(signer, bounce, own=True)
    assert tags(wire, b"ed25519-sha256")[b"d"] == b"example.org"  # aligned with mx.example.org
    verifier = dkim.DKIM(crlf(wire))
    assert verifier.verify(idx=0, dnsfunc=dnsfunc_for(keys))
    assert verifier.verify(idx=1, dnsfunc=dnsfunc_for(keys))


def test_utf8_from_domain_uses_its_a_label(tmp_path: Path) -> None:
    generate_key(tmp_path, "bücher.example", "s1", "ed25519")
    idn = DkimSigner(tmp_path, is_local=lambda domain: domain == "bücher.example")
    data = RETURN_PATH + "From: Ö <o@bücher.example>\n\nbody\n".encode()
    wire = sign(idn, data)
    assert tags(wire, b"ed25519-sha256")[b"d"] == b"xn--bcher-kva.example"


# -- large messages, reload -------------------------------------------------------------


def test_large_message_is_streamed_not_held(signer: DkimSigner, tmp_path: Path) -> None:
    """A 16 MB body: the signer's Python allocations stay at a few blocks, not the message."""
    path = tmp_path / "big.spool"
    line = b"0123456789 abcdefghij  ABCDEFGHIJ\tklmnopqrst uvwxyz 0123456789 !!\n"
    with open(path, "wb") as f:
        f.write(message(body=b""))
        for _ in range(16 * 1024 * 1024 // len(line)):
            f.write(line)
    tracemalloc.start()
    try:
        fields = signer.signature_for_file(path, len(RETURN_PATH))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert fields.count(b"DKIM-Signature:") == 2
    assert peak < 2 * 1024 * 1024, peak
    # And it is the signature dkimpy verifies over the whole message.
    whole = fields + path.read_bytes()[len(RETURN_PATH) :]
    verifier = dkim.DKIM(crlf(whole))
    keys = {k.dns_name() + ".": k.dns_value() for d in signer.domains() for k in signer.keys_for(d)}
    assert verifier.verify(dnsfunc=lambda name, timeout=5: keys[name.decode()].encode())


def test_signature_reads_from_the_stream_position(signer: DkimSigner) -> None:
    data = message()
    source = io.BytesIO(data)
    source.seek(len(RETURN_PATH))
    assert signer.signature(source).count(b"DKIM-Signature:") == 2


def test_reload_adds_keys_and_keeps_them_on_a_bad_set(tmp_path: Path) -> None:
    own_keydir = tmp_path / "keys"
    generate_key(own_keydir, "example.org", "one", "ed25519")
    signer = DkimSigner(own_keydir)
    assert [k.selector for k in signer.keys_for("example.org")] == ["one"]
    generate_key(own_keydir, "example.org", "two", "ed25519")
    signer.reload()
    assert [k.selector for k in signer.keys_for("example.org")] == ["one", "two"]
    bad = generate_key(own_keydir, "example.org", "three", "ed25519")
    bad.path.chmod(0o644)
    with pytest.raises(ConfigError, match=r"three\.pem"):
        signer.reload()
    assert [k.selector for k in signer.keys_for("example.org")] == ["one", "two"]
    assert sign(signer, message()).count(b"DKIM-Signature:") == 2


def test_no_directory_means_no_signing() -> None:
    signer = DkimSigner(None)
    assert signer.sign_bytes(message(), len(RETURN_PATH)) == message()
