"""postier.dkim.openssl_rsa: dkimpy's RSA through OpenSSL gives dkimpy's own results.

The reference is dkimpy's pure-Python RSA (`dkim.crypto`), which still runs for keys in
dkimpy's form (its dicts of integers): signatures must be the same bytes (RSASSA-PKCS1-v1_5 is
deterministic) and verification the same verdicts, down to the short-key policy. The verdicts
are also checked end to end, through `authenticate` and a loopback DNS responder.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import re
import subprocess
import time
from pathlib import Path

import dkim
import dkim.crypto
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from postier.dkim import openssl_rsa
from postier.dkim.keys import DkimKey, generate_key
from postier.dkim.signer import DkimSigner, _sign_headers, _Signing, include_headers
from postier.dns import Resolver
from postier.mailauth import SpfResult, authenticate, dkim_verify
from tests.dnsserver import DnsServer
from tests.mailauth_dns import txt
from tests.mailauth_sign import message, spool

NO_SPF = SpfResult("none", "mailfrom", "example.test", "alice@example.test")


def pem_of(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def record_of(public: rsa.RSAPublicKey) -> str:
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()


def small_key(tmp: Path, bits: int) -> rsa.RSAPrivateKey:
    """A key below cryptography's minimum for new keys, made by the openssl tool."""
    path = tmp / f"rsa{bits}.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(path), str(bits)], check=True)
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, rsa.RSAPrivateKey]:
    tmp = tmp_path_factory.mktemp("rsa")
    found = {
        f"rsa{bits}": rsa.generate_private_key(public_exponent=65537, key_size=bits)
        for bits in (1024, 2048, 3072)
    }
    found["rsa512"] = small_key(tmp, 512)
    found["other"] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return found


def test_installed_in_dkimpy() -> None:
    assert dkim.RSASSA_PKCS1_v1_5_sign is openssl_rsa.sign
    assert dkim.RSASSA_PKCS1_v1_5_verify is openssl_rsa.verify


# -- signatures: the same bytes ----------------------------------------------------------


@pytest.mark.parametrize("name", ["rsa512", "rsa1024", "rsa2048", "rsa3072"])
@pytest.mark.parametrize("hash_name", ["sha256", "sha1"])
def test_signature_equals_dkimpy(keys, name: str, hash_name: str) -> None:
    key = keys[name]
    ours = openssl_rsa.private_key(pem_of(key))
    theirs = dkim.crypto.parse_pem_private_key(pem_of(key))
    for i in range(20):
        digest = dkim.HashThrough(hashlib.new(hash_name, b"message %d" % i))
        assert openssl_rsa.sign(digest, ours) == bytes(
            dkim.crypto.RSASSA_PKCS1_v1_5_sign(digest, theirs)
        )


def test_signature_with_a_leading_zero_octet_equals_dkimpy(keys) -> None:
    """1 in 256 signatures starts with 0x00: both keep it, at the modulus' length."""
    key = openssl_rsa.private_key(pem_of(keys["rsa1024"]))
    theirs = dkim.crypto.parse_pem_private_key(pem_of(keys["rsa1024"]))
    for i in range(5000):  # P(no leading zero in 5000) = (255/256)^5000 < 1e-8
        digest = dkim.HashThrough(hashlib.sha256(b"%d" % i))
        signature = openssl_rsa.sign(digest, key)
        if signature[0] == 0:
            break
    else:
        pytest.fail("no signature with a leading zero octet")
    assert len(signature) == 128
    assert signature == bytes(dkim.crypto.RSASSA_PKCS1_v1_5_sign(digest, theirs))


def test_a_key_in_dkimpys_form_still_signs_with_dkimpy(keys) -> None:
    theirs = dkim.crypto.parse_pem_private_key(pem_of(keys["rsa2048"]))
    digest = dkim.HashThrough(hashlib.sha256(b"x"))
    assert openssl_rsa.sign(digest, theirs) == dkim.crypto.RSASSA_PKCS1_v1_5_sign(digest, theirs)


def test_digest_too_large_for_the_key_is_dkimpys_error() -> None:
    tiny = rsa.RSAPublicNumbers(65537, 2**479 + 1).public_key()  # 60 octets < 51 + 11
    digest = dkim.HashThrough(hashlib.sha256(b"x"))
    with pytest.raises(dkim.crypto.DigestTooLargeError):
        openssl_rsa.verify(digest, b"\1" * 60, tiny)
    with pytest.raises(dkim.crypto.DigestTooLargeError):
        dkim.crypto.RSASSA_PKCS1_v1_5_verify(
            digest, b"\1" * 60, {"modulus": 2**479 + 1, "publicExponent": 65537}
        )


def _header_field(key: DkimKey, private: object, data: bytes) -> bytes:
    headers, _ = dkim.rfc822_parse(data.split(b"\n\n", 1)[0] + b"\n")
    names = include_headers([name for name, _ in headers])
    return _sign_headers(_Signing(key, private), headers, names, b"bodyhash==")


def test_signer_field_equals_dkimpys(tmp_path: Path) -> None:
    """The DKIM-Signature field postier's signer makes, byte for byte as with dkimpy's RSA."""
    key = generate_key(tmp_path, "example.org", "s1", "rsa", 2048)
    data = b"From: Alice <alice@example.org>\nTo: bob@remote.test\nSubject: hi\n\nbody\n"
    ours = openssl_rsa.private_key(key.private_pem)
    theirs = dkim.crypto.parse_pem_private_key(key.private_pem)
    for _ in range(3):  # t= is the clock's second: retry when it ticked in between
        field, reference = _header_field(key, ours, data), _header_field(key, theirs, data)
        if re.search(rb"t=\d+", field)[0] == re.search(rb"t=\d+", reference)[0]:
            break
        time.sleep(0.1)
    assert b"a=rsa-sha256" in field
    assert field == reference


def test_signer_output_verifies_with_dkimpys_rsa(tmp_path: Path) -> None:
    key = generate_key(tmp_path, "example.org", "s1", "rsa", 2048)
    signer = DkimSigner(tmp_path)
    data = b"From: Alice <alice@example.org>\nTo: bob@remote.test\nSubject: hi\n\nbody\n"
    field = signer.signature(io.BytesIO(data))
    record = key.dns_value().encode()
    wire = (field + data).replace(b"\n", b"\r\n")
    # dkim.verify parses the record itself: a key in dkimpy's form, checked by dkimpy's RSA
    assert dkim.verify(wire, dnsfunc=lambda name, timeout=5: record)


# -- verification: the same verdicts ------------------------------------------------------


def _cases(keys) -> dict[str, tuple[rsa.RSAPrivateKey, rsa.RSAPublicKey, bytes]]:
    """name -> (signing key, published key, transformation of the signature octets)."""
    k = keys["rsa2048"]
    same = lambda s: s  # noqa: E731
    return {
        "good": (k, k.public_key(), same),
        "good-1024": (keys["rsa1024"], keys["rsa1024"].public_key(), same),
        "good-3072": (keys["rsa3072"], keys["rsa3072"].public_key(), same),
        "bit-flipped": (k, k.public_key(), lambda s: s[:100] + bytes([s[100] ^ 1]) + s[101:]),
        "truncated": (k, k.public_key(), lambda s: s[:-1]),
        "first-octet-cut": (k, k.public_key(), lambda s: s[1:]),
        "empty": (k, k.public_key(), lambda s: b""),
        "too-long": (k, k.public_key(), lambda s: s + b"\0"),
        "wrong-key": (k, keys["other"].public_key(), same),
        "short-key-good": (keys["rsa512"], keys["rsa512"].public_key(), same),
        "short-key-bad": (keys["rsa512"], keys["rsa512"].public_key(), lambda s: s[::-1]),
    }


def _dkimpy_form(public: rsa.RSAPublicKey) -> dict[str, int]:
    numbers = public.public_numbers()
    return {"modulus": numbers.n, "publicExponent": numbers.e}


@pytest.mark.parametrize(
    "case",
    [
        "good",
        "good-1024",
        "good-3072",
        "bit-flipped",
        "truncated",
        "first-octet-cut",
        "empty",
        "too-long",
        "wrong-key",
        "short-key-good",
        "short-key-bad",
    ],
)
def test_verify_equals_dkimpy(keys, case: str) -> None:
    signing, public, change = _cases(keys)[case]
    theirs = dkim.crypto.parse_pem_private_key(pem_of(signing))
    digest = dkim.HashThrough(hashlib.sha256(b"the header fields"))
    signature = change(bytes(dkim.crypto.RSASSA_PKCS1_v1_5_sign(digest, theirs)))
    expected = dkim.crypto.RSASSA_PKCS1_v1_5_verify(digest, signature, _dkimpy_form(public))
    key = openssl_rsa.public_key(_dkimpy_form(public))
    assert isinstance(key, rsa.RSAPublicKey)
    assert openssl_rsa.verify(digest, signature, key) is expected
    assert expected is case.startswith(("good", "short-key-good"))


def test_leading_zero_octets_left_out_verify_as_with_dkimpy(keys) -> None:
    """A signer that drops the leading zero octet of its signature: dkimpy accepts it."""
    private = openssl_rsa.private_key(pem_of(keys["rsa1024"]))
    for i in range(5000):
        digest = dkim.HashThrough(hashlib.sha256(b"%d" % i))
        signature = openssl_rsa.sign(digest, private)
        if signature[0] == 0:
            break
    public = _dkimpy_form(keys["rsa1024"].public_key())
    assert dkim.crypto.RSASSA_PKCS1_v1_5_verify(digest, signature[1:], public)
    assert openssl_rsa.verify(digest, signature[1:], openssl_rsa.public_key(public))


def test_signature_above_the_modulus_is_invalid(keys) -> None:
    """The one difference, on purpose: s + n is no signature (RFC 8017 §5.2.2), though
    dkimpy reduces it modulo n and accepts it."""
    k = keys["rsa2048"]
    digest = dkim.HashThrough(hashlib.sha256(b"x"))
    signature = openssl_rsa.sign(digest, k)
    n = k.public_key().public_numbers().n
    for forged in ((int.from_bytes(signature, "big") + n).to_bytes(257, "big"), b"\xff" * 256):
        assert not openssl_rsa.verify(digest, forged, k.public_key())


def test_numbers_openssl_refuses_stay_with_dkimpy() -> None:
    odd = {"modulus": 2**1023 + 1, "publicExponent": 4}
    assert openssl_rsa.public_key(odd) is odd


# -- end to end: authenticate() against dkimpy on whole messages -----------------------------


def _sign_message(private: rsa.RSAPrivateKey, selector: str) -> bytes:
    msg = message().replace(b"\n", b"\r\n")
    field = dkim.sign(
        msg,
        selector.encode(),
        b"example.test",
        pem_of(private),
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=[b"from", b"to", b"subject"],
    )
    return field + msg


def _dkimpy_verdict(wire: bytes, record: str) -> str:
    """dkimpy's own verdict, its RSA in pure Python (it parses the record into its dict)."""
    verifier = dkim.DKIM(wire, minkey=1024)
    try:
        ok = verifier.verify(dnsfunc=lambda name, timeout=5: record.encode())
    except dkim.DKIMException:
        return "permerror"
    return "pass" if ok else "fail"


def _truncate_b(wire: bytes) -> bytes:
    """The last four characters of b= (the field's end) cut: a signature one octet short."""
    end = wire.index(b"\r\nFrom: ")
    assert re.fullmatch(rb"[A-Za-z0-9+/]{2}==", wire[end - 4 : end])
    return wire[: end - 4] + wire[end:]


E2E = {
    # case: (signing key, selector whose record is served, tamper, expected verdict)
    "good": ("rsa2048", "sel", None, "pass"),
    "header-changed": ("rsa2048", "sel", lambda w: w.replace(b"a test", b"a Test"), "fail"),
    "truncated-b": ("rsa2048", "sel", _truncate_b, "fail"),
    "wrong-key": ("rsa2048", "wrong", None, "fail"),
    "short-key": ("rsa512", "short", None, "permerror"),
    "short-key-bad": ("rsa512", "short", lambda w: w.replace(b"a test", b"a Test"), "fail"),
}


@pytest.fixture(scope="module")
def e2e_zone(keys) -> dict[str, str]:
    return {
        "sel": record_of(keys["rsa2048"].public_key()),
        "wrong": record_of(keys["other"].public_key()),
        "short": record_of(keys["rsa512"].public_key()),
    }


@pytest.fixture(scope="module")
def e2e_dns(e2e_zone):
    zone = {f"{s}._domainkey.example.test": {"TXT": [txt(r)]} for s, r in e2e_zone.items()}
    with DnsServer(zone) as server:
        yield server


def test_the_verifier_holds_openssl_keys(e2e_zone) -> None:
    pk, keysize, ktag, _ = dkim_verify._parse_key(e2e_zone["sel"].encode())
    assert isinstance(pk, rsa.RSAPublicKey) and (keysize, ktag) == (2048, b"rsa")


@pytest.mark.parametrize("case", sorted(E2E))
def test_authenticate_verdict_equals_dkimpy(keys, e2e_zone, e2e_dns, tmp_path, case) -> None:
    name, selector, tamper, expected = E2E[case]
    wire = _sign_message(keys[name], selector)
    if tamper is not None:
        changed = tamper(wire)
        assert changed != wire
        wire = changed
    assert _dkimpy_verdict(wire, e2e_zone[selector]) == expected
    path = tmp_path / "msg.spool"
    offset = spool(path, wire)
    resolver = Resolver("127.0.0.1", e2e_dns.port, timeout=1.0)
    verdicts = asyncio.run(authenticate(resolver, path, offset, spf=NO_SPF))
    [result] = verdicts.dkim
    assert result.result == expected, result
