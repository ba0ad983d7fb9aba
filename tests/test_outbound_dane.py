"""DANE (RFC 7672): TLSA matching, then delivery to real receivers with records our loopback
DNS responder serves with or without the AD bit."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from postier.delivery.base import RecipientResult, Status
from postier.delivery.smtp import SmtpRelay, Timeouts
from postier.dns import Resolver, SecureLookups
from postier.outbound.dane import Dane, Tlsa, check
from postier.outbound.mta_sts import MtaSts
from postier.outbound.tls_policy import Level, TlsFailure, TlsPolicy
from postier.tls import client_context
from tests.outbound_helpers import (
    Pki,
    PolicyHost,
    Receivers,
    SecureDnsServer,
    policy_text,
    rcpt,
    start_receivers,
    stored,
)


def _certs(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def spki_sha256(cert: x509.Certificate) -> str:
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def cert_sha256(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


World = tuple[Receivers, SecureDnsServer, PolicyHost]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("dane")
    pki = Pki(root / "pki")
    recv = start_receivers(root, pki)
    good, ca = _certs(root / "certs" / "good" / "fullchain.pem")[0], pki.ca
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    expired = _certs(root / "certs" / "expired" / "fullchain.pem")[0]
    mx = {
        "dane.test": "mx.dane.test",
        "danebad.test": "mx.danebad.test",  # gets the default certificate
        "daneexp.test": "mx.expired.test",
        "daneta.test": "mx.daneta.test",
        "danetabad.test": "mx.danetabad.test",  # default certificate: right CA, wrong name
        "daneinsecure.test": "mx.daneinsecure.test",
        "daneunusable.test": "mx.daneunusable.test",
        "danemalformed.test": "mx.danemalformed.test",
        "daneaddr.test": "mx.daneaddr.test",  # its address answer is not secure
    }
    tlsa = {
        "mx.dane.test": [f"3 1 1 {spki_sha256(good)}"],
        "mx.danebad.test": [f"3 1 1 {spki_sha256(good)}"],
        "mx.expired.test": [f"3 1 1 {spki_sha256(expired)}"],
        "mx.daneta.test": [f"2 0 1 {cert_sha256(ca_cert)}"],
        "mx.danetabad.test": [f"2 0 1 {cert_sha256(ca_cert)}"],
        "mx.daneinsecure.test": ["3 1 1 " + "00" * 32],  # would fail if it were trusted
        "mx.danemalformed.test": [],  # served raw, see below
        "mx.daneaddr.test": ["3 1 1 " + "00" * 32],  # would fail if it were used
        "mx.daneunusable.test": ["1 1 1 " + "00" * 32, "0 0 1 " + "00" * 32, "3 2 1 " + "00" * 32],
    }
    zone: dict[str, object] = {}
    secure: set[str] = set()
    for domain, host in mx.items():
        zone[domain] = {"MX": [(10, host)]}
        zone[host] = {"A": ["127.0.0.1"]}
        zone[f"_25._tcp.{host}"] = {"TLSA": tlsa[host]}
        secure.add(domain)
        if domain != "daneinsecure.test":
            secure.add(f"_25._tcp.{host}")
        if domain != "daneaddr.test":
            secure.add(host)
    # DANE beats MTA-STS: dane.test's enforced policy does not even list its MX.
    zone["_mta-sts.dane.test"] = {"TXT": ['"v=STSv1; id=1"']}
    zone["mta-sts.dane.test"] = {"A": ["127.0.0.1"]}
    try:
        with (
            SecureDnsServer(zone, secure) as dns_server,
            PolicyHost(pki, ["mta-sts.dane.test"]) as host,
        ):
            host.policies["mta-sts.dane.test"] = policy_text("enforce", "mx.other.test")
            # A DANE-EE SHA2-256 record with 2 bytes of digest: dnspython refuses to write it.
            dns_server.raw_tlsa["_25._tcp.mx.danemalformed.test"] = [b"\x03\x01\x01\xab\xcd"]
            yield recv, dns_server, host
    finally:
        recv.tls.stop()
        recv.plain.stop()


def send(world: World, tmp: Path, to: str) -> tuple[RecipientResult, str]:
    recv, dns_server, host = world
    resolver = Resolver("127.0.0.1", dns_server.port, timeout=2.0)
    lookups = SecureLookups(resolver)
    context = client_context(verify=True, ca_file=recv.pki.ca_file)
    sts = MtaSts(lookups, tmp / "cache", context=context, port=host.port, timeout=2.0)
    relay = SmtpRelay(
        "client.test",
        resolver=resolver,
        timeouts=Timeouts.uniform(10.0),
        remote_port=recv.tls.mx_port,
        tls_policy=TlsPolicy(mta_sts=sts, dane=Dane(lookups)),
        ca_file=str(recv.pki.ca_file),
    )

    async def go() -> tuple[RecipientResult, str]:
        async with relay.session(to.rpartition("@")[2]) as s:
            res = await s.send(stored(tmp), rcpt(to))
            return res[0], s.tls_state()

    return asyncio.run(go())


# --- matching without the network ------------------------------------------------------------


def test_usable_records(tmp_path: Path) -> None:
    assert Tlsa(3, 1, 1, b"\0" * 32).usable and Tlsa(2, 0, 2, b"\0" * 64).usable
    assert not Tlsa(3, 1, 1, b"\0" * 31).usable  # wrong length for SHA2-256
    assert not Tlsa(3, 1, 2, b"\0" * 32).usable  # wrong length for SHA2-512
    assert not Tlsa(1, 1, 1, b"\0" * 32).usable and not Tlsa(0, 0, 1, b"\0" * 32).usable
    assert not Tlsa(3, 2, 1, b"\0" * 32).usable and not Tlsa(3, 1, 3, b"\0" * 32).usable
    assert not Tlsa(3, 0, 0, b"").usable


def test_dane_ee_selectors_and_matching_types(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    chain_path, _ = pki.issue("mx.x.test")
    chain = _certs(chain_path)
    leaf = chain[0]
    der = [c.public_bytes(serialization.Encoding.DER) for c in chain]
    spki = leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for record in (
        Tlsa(3, 1, 1, hashlib.sha256(spki).digest()),
        Tlsa(3, 1, 2, hashlib.sha512(spki).digest()),
        Tlsa(3, 1, 0, spki),
        Tlsa(3, 0, 0, der[0]),
        Tlsa(3, 0, 1, hashlib.sha256(der[0]).digest()),
    ):
        check([record], der, "any.name.test")  # DANE-EE ignores the name
    with pytest.raises(TlsFailure, match="matches none") as info:
        check([Tlsa(3, 1, 1, b"\1" * 32)], der, "mx.x.test")
    assert info.value.result_type == "validation-failure"
    ta = Tlsa(2, 0, 1, hashlib.sha256(der[-1]).digest())
    check([ta], der, "mx.x.test")
    with pytest.raises(TlsFailure) as info:
        check([ta], der, "mx.y.test")
    assert info.value.result_type == "certificate-host-mismatch"
    with pytest.raises(TlsFailure):
        check([ta], der[:1], "mx.x.test")  # the anchor is not in the chain
    with pytest.raises(TlsFailure):
        check([ta], [b"not a certificate"], "mx.x.test")


# --- delivery ---------------------------------------------------------------------------------


def test_dane_ee_match_is_delivered_verified_over_mta_sts(
    world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "postier")
    res, tls = send(world, tmp_path, "alice@dane.test")
    assert res.status is Status.DELIVERED and tls == "verified" and res.tls_policy == "dane"
    assert any("tls=verified policy=dane" in r.getMessage() for r in caplog.records)


def test_dane_ee_ignores_expiry(world: World, tmp_path: Path) -> None:
    res, tls = send(world, tmp_path, "alice@daneexp.test")
    assert res.status is Status.DELIVERED and tls == "verified"


def test_dane_ee_mismatch_defers_never_plaintext(world: World, tmp_path: Path) -> None:
    recv = world[0]
    before = recv.delivered(recv.tls)
    res, _ = send(world, tmp_path, "alice@danebad.test")
    assert (res.status, res.enhanced) == (Status.TEMPORARY, "4.7.5")
    assert res.tls_failure.startswith("validation-failure") and res.tls_policy == "dane"
    assert recv.delivered(recv.tls) == before


def test_dane_ta(world: World, tmp_path: Path) -> None:
    res, tls = send(world, tmp_path, "alice@daneta.test")
    assert res.status is Status.DELIVERED and tls == "verified" and res.tls_policy == "dane"
    res, _ = send(world, tmp_path, "alice@danetabad.test")
    assert res.status is Status.TEMPORARY
    assert res.tls_failure.startswith("certificate-host-mismatch")


@pytest.mark.parametrize("domain", ["daneinsecure.test", "daneaddr.test"])
def test_tlsa_without_ad_is_ignored(world: World, tmp_path: Path, domain: str) -> None:
    """TLSA without the AD bit, or under an MX host whose address is not secure."""
    res, tls = send(world, tmp_path, f"alice@{domain}")
    assert res.status is Status.DELIVERED and res.tls_policy == "opportunistic"
    assert tls == "encrypted"


def test_only_unusable_records_still_require_tls(world: World, tmp_path: Path) -> None:
    res, tls = send(world, tmp_path, "alice@daneunusable.test")
    assert res.status is Status.DELIVERED and tls == "encrypted" and res.tls_policy == "dane"


def test_table_overrides_dane(world: World, tmp_path: Path) -> None:
    recv, dns_server, _ = world
    resolver = Resolver("127.0.0.1", dns_server.port, timeout=2.0)
    policy = TlsPolicy({"danebad.test": Level.ENCRYPT}, dane=Dane(SecureLookups(resolver)))
    relay = SmtpRelay(
        "client.test",
        resolver=resolver,
        timeouts=Timeouts.uniform(10.0),
        remote_port=recv.tls.mx_port,
        tls_policy=policy,
    )
    res = asyncio.run(relay.deliver(stored(tmp_path), rcpt("alice@danebad.test")))
    assert res[0].status is Status.DELIVERED and res[0].tls_policy == "tls-policy"


def test_tlsa_of_the_wrong_length_defers_without_crashing(
    world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "postier")
    res, _ = send(world, tmp_path, "alice@danemalformed.test")
    assert res.status is Status.TEMPORARY, res.text
    assert "TLSA" in res.text


def test_tlsa_record_for_our_own_mx(tmp_path: Path) -> None:
    from postier.outbound.dane import tlsa_record

    chain, _ = Pki(tmp_path).issue("mx.ours.test")
    text = tlsa_record(chain.read_bytes(), "MX.Ours.Test")
    first = text.splitlines()[0]
    leaf = _certs(chain)[0]
    assert first == f"_25._tcp.mx.ours.test. IN TLSA 3 1 1 {spki_sha256(leaf)}"
    assert "rollover" in text
    record = Tlsa(3, 1, 1, bytes.fromhex(first.rsplit(" ", 1)[1]))
    check([record], [leaf.public_bytes(serialization.Encoding.DER)], "mx.ours.test")
