"""Authentication-Results (RFC 8601) end to end: pyspf, Mail::DKIM-signed mail, DMARC, the field."""

from __future__ import annotations

import asyncio
import email
import email.policy

import pytest

from postier.dns import Resolver
from postier.mailauth import (
    AuthVerdicts,
    DkimResult,
    DmarcResult,
    SpfResult,
    authenticate,
    check_spf,
    claims_authserv_id,
)
from tests.dnsserver import DnsServer
from tests.mailauth_dns import txt
from tests.mailauth_sign import genkey, key_record, message, sign, spool


@pytest.fixture(scope="module")
def key(tmp_path_factory):
    return genkey(tmp_path_factory.mktemp("dkim-key"), "sel1")


@pytest.fixture(scope="module")
def dns_server(key):
    zone = {
        "example.test": {"TXT": [txt("v=spf1 ip4:192.0.2.0/24 ip6:2001:db8::/32 -all")]},
        "sel1._domainkey.example.test": {"TXT": [txt(key_record(key))]},
        "_dmarc.example.test": {"TXT": [txt("v=DMARC1; p=reject")]},
        "bank.test": {"TXT": [txt("v=spf1 ip4:203.0.113.0/24 -all")]},
        "_dmarc.bank.test": {"TXT": [txt("v=DMARC1; p=reject")]},
        "_dmarc.slow.test": "TIMEOUT",
        "slow.test": {"TXT": [txt("v=spf1 -all")]},
    }
    with DnsServer(zone) as server:
        yield server


def run(server, tmp_path, msg: bytes, ip: str, mail_from: str) -> AuthVerdicts:
    resolver = Resolver("127.0.0.1", server.port, timeout=1.0)
    path = tmp_path / "msg.spool"
    offset = spool(path, msg, sender=mail_from)

    async def main() -> AuthVerdicts:
        spf = await check_spf(resolver, ip, mail_from, "client.test")
        return await authenticate(resolver, path, offset, spf=spf)

    return asyncio.run(main())


def test_signed_mail_from_an_authorized_host(dns_server, key, tmp_path):
    signed = sign(message(), key, "sel1")
    verdicts = run(dns_server, tmp_path, signed, "2001:db8::25", "alice@example.test")
    b = verdicts.dkim[0].signature
    assert (
        verdicts.header("mx.postier.test")
        == (
            "Authentication-Results: mx.postier.test;\n"
            "\tspf=pass smtp.mailfrom=alice@example.test;\n"
            f"\tdkim=pass header.d=example.test header.s=sel1 header.b={_pv(b)};\n"
            "\tdmarc=pass (p=reject dis=none) header.from=example.test\n"
        ).encode()
    )
    assert verdicts.dmarc_disposition() == "none"


def _pv(b: str) -> str:
    return b if "/" not in b else f'"{b}"'


def test_forged_bank_mail_is_rejected_by_policy(dns_server, key, tmp_path):
    forged = message(from_="Bank <security@bank.test>")
    signed = sign(forged, key, "sel1")  # a valid signature, but by example.test
    verdicts = run(dns_server, tmp_path, signed, "192.0.2.5", "alice@example.test")
    assert verdicts.spf.result == "pass" and verdicts.dkim[0].result == "pass"
    assert (verdicts.dmarc.result, verdicts.dmarc_disposition()) == ("fail", "reject")
    assert b"dmarc=fail (p=reject dis=reject) header.from=bank.test" in verdicts.header("mx")


def test_dmarc_look_up_timeout_is_temperror_not_reject(dns_server, key, tmp_path):
    verdicts = run(dns_server, tmp_path, message(from_="x@slow.test"), "192.0.2.5", "x@slow.test")
    assert verdicts.spf.result == "fail"
    assert verdicts.dmarc_disposition() == "temperror"


def test_null_sender_reports_the_helo_identity(dns_server, tmp_path):
    verdicts = run(dns_server, tmp_path, message(), "192.0.2.5", "")
    assert verdicts.spf.identity == "helo"
    assert b"smtp.helo=client.test" in verdicts.header("mx")
    assert b"\tdkim=none;\n" in verdicts.header("mx")


def test_field_parses_as_one_header_and_quotes_peer_values():
    verdicts = AuthVerdicts(
        SpfResult("fail", "mailfrom", "x.test", 'we"ird (x)@x.test', "not (allowed)\r\nBcc: x"),
        [DkimResult("fail", "d.test", "s;1", "ab/cd+ef", "signature did not verify")],
        DmarcResult("none", reason="no author domain in From"),
    )
    field = verdicts.header("mx.postier.test")
    assert field.count(b"\n") == 4 and b"\r" not in field and b"Bcc: x\n" not in field
    parsed = email.message_from_bytes(field + b"\n", policy=email.policy.default)
    value = str(parsed["Authentication-Results"])
    assert 'smtp.mailfrom="we\\"ird (x)@x.test"' in value
    assert 'header.s="s;1"' in value and 'header.b="ab/cd+ef"' in value
    assert "(not [allowed] Bcc: x)" in value


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b" mx.postier.test; spf=pass smtp.mailfrom=a@b", True),
        (b" MX.Postier.Test.; dkim=pass", True),
        (b" (comment (nested)) mx.postier.test 1; none", True),
        (b'\r\n\t"mx.postier.test"; none', True),
        (b" mx.postier.test", True),
        (b" mx.postier.test.evil.test; spf=pass", False),
        (b" other.test; spf=pass (mx.postier.test)", False),
        (b" ; spf=pass", False),
        (b"", False),
        (b" (unterminated mx.postier.test", False),
    ],
)
def test_claims_authserv_id(value, expected):
    assert claims_authserv_id(value, "mx.postier.test") is expected
