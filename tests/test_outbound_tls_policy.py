"""The per-domain TLS levels (none/may/encrypt/verify) against real receiving MX servers.

The receivers are our own `postier serve` processes on loopback (tests/outbound_helpers.py):
one offering STARTTLS with a valid, a wrong-name or an expired certificate (chosen by SNI),
one without STARTTLS. Certificates come from a private trustme CA given as `ca_file`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from postier.config import build, load_toml
from postier.delivery.base import RecipientResult, Status
from postier.delivery.smtp import SmtpRelay, Timeouts
from postier.dns import Resolver
from postier.errors import ConfigError
from postier.outbound.tls_policy import Level, TlsPolicy, parse_policy_table, static_level
from tests.outbound_helpers import Pki, Receivers, SecureDnsServer, rcpt, start_receivers, stored

ZONE = {
    **{
        d: {"MX": [(10, f"mx.{d}")]}
        for d in ("good.test", "wrongname.test", "expired.test", "plain.test")
    },
    "mx.good.test": {"A": ["127.0.0.1"]},
    "mx.wrongname.test": {"A": ["127.0.0.1"]},
    "mx.expired.test": {"A": ["127.0.0.1"]},
    "mx.plain.test": {"A": ["127.0.0.1"]},
}


@pytest.fixture(scope="module")
def receivers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Receivers]:
    root = tmp_path_factory.mktemp("receivers")
    recv = start_receivers(root, Pki(root / "pki"))
    try:
        yield recv
    finally:
        recv.tls.stop()
        recv.plain.stop()


@pytest.fixture(scope="module")
def dns_server() -> Iterator[SecureDnsServer]:
    with SecureDnsServer(ZONE) as server:
        yield server


def send(
    dns: SecureDnsServer, port: int, pki: Pki, tmp: Path, to: str, table: dict[str, Level]
) -> tuple[RecipientResult, str]:
    relay = SmtpRelay(
        "client.test",
        resolver=Resolver("127.0.0.1", dns.port, timeout=2.0),
        remote_port=port,
        timeouts=Timeouts.uniform(10.0),
        tls_policy=TlsPolicy(table),
        ca_file=str(pki.ca_file),
    )

    async def go() -> tuple[RecipientResult, str]:
        async with relay.session(to.rpartition("@")[2]) as s:
            res = await s.send(stored(tmp), rcpt(to))
            return res[0], s.tls_state()

    return asyncio.run(go())


def test_policy_table_parsing() -> None:
    table = parse_policy_table({"Example.COM.": "verify", ".legacy.example": "MAY"})
    assert table == {"example.com": Level.VERIFY, ".legacy.example": Level.MAY}
    assert static_level(table, "example.com") is Level.VERIFY
    assert static_level(table, "a.b.legacy.example") is Level.MAY
    assert static_level(table, "legacy.example") is None  # ".domain" covers subdomains only
    for bad in ({"x.test": "secure"}, {"*.x.test": "may"}, {"": "may"}, ["x.test"]):
        with pytest.raises(ConfigError, match="tls_policy"):
            parse_policy_table(bad)


def test_toml_table_and_flags(tmp_path: Path) -> None:
    conf = tmp_path / "p.toml"
    conf.write_text('tls_policy = { "example.com" = "verify", "legacy.example" = "may" }\n')
    cfg = build(load_toml(conf), {"mta_sts": False, "mta_sts_port": "8443"})
    assert dict(cfg.tls_policy) == {"example.com": "verify", "legacy.example": "may"}
    assert (cfg.mta_sts, cfg.dane, cfg.mta_sts_port) == (False, True, 8443)
    conf.write_text('tls_policy = { "example.com" = "strict" }\n')
    with pytest.raises(ConfigError, match=r"p.toml: tls_policy: 'example.com' = 'strict'"):
        load_toml(conf)
    with pytest.raises(ConfigError, match="tls_ca_file"):
        build({}, {"tls_ca_file": str(tmp_path / "missing.pem")})


def test_verify_delivers_with_a_valid_certificate(
    receivers: Receivers,
    dns_server: SecureDnsServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "postier.delivery.smtp")
    before = receivers.delivered(receivers.tls)
    res, tls = send(
        dns_server,
        receivers.tls.mx_port,
        receivers.pki,
        tmp_path,
        "alice@good.test",
        {"good.test": Level.VERIFY},
    )
    assert res.status is Status.DELIVERED and tls == "verified"
    assert res.tls_policy == "tls-policy" and res.tls_failure == ""
    assert receivers.delivered(receivers.tls) == before + 1
    line = next(r.getMessage() for r in caplog.records if "event=delivery" in r.getMessage())
    assert "tls=verified policy=tls-policy" in line


@pytest.mark.parametrize(
    ("domain", "result_type"),
    [
        ("wrongname.test", "certificate-host-mismatch"),
        ("expired.test", "certificate-expired"),
    ],
)
def test_verify_defers_a_bad_certificate(
    receivers: Receivers, dns_server: SecureDnsServer, tmp_path: Path, domain: str, result_type: str
) -> None:
    before = receivers.delivered(receivers.tls)
    res, _ = send(
        dns_server,
        receivers.tls.mx_port,
        receivers.pki,
        tmp_path,
        f"alice@{domain}",
        {domain: Level.VERIFY},
    )
    assert (res.status, res.code, res.enhanced) == (Status.TEMPORARY, 451, "4.7.5")
    assert res.tls_failure.startswith(result_type) and "tls-policy" in res.text
    assert receivers.delivered(receivers.tls) == before


def test_encrypt_accepts_any_certificate_but_not_plaintext(
    receivers: Receivers, dns_server: SecureDnsServer, tmp_path: Path
) -> None:
    res, tls = send(
        dns_server,
        receivers.tls.mx_port,
        receivers.pki,
        tmp_path,
        "alice@wrongname.test",
        {"wrongname.test": Level.ENCRYPT},
    )
    assert res.status is Status.DELIVERED and tls == "encrypted"
    before = receivers.delivered(receivers.plain)
    res, tls = send(
        dns_server,
        receivers.plain.mx_port,
        receivers.pki,
        tmp_path,
        "alice@plain.test",
        {"plain.test": Level.ENCRYPT},
    )
    assert (res.status, res.enhanced) == (Status.TEMPORARY, "4.7.10")
    assert res.tls_failure.startswith("starttls-not-supported")
    assert receivers.delivered(receivers.plain) == before


def test_none_and_may(receivers: Receivers, dns_server: SecureDnsServer, tmp_path: Path) -> None:
    res, tls = send(
        dns_server,
        receivers.tls.mx_port,
        receivers.pki,
        tmp_path,
        "alice@good.test",
        {"good.test": Level.NONE},
    )
    assert res.status is Status.DELIVERED and tls == "none"
    res, tls = send(
        dns_server, receivers.tls.mx_port, receivers.pki, tmp_path, "alice@expired.test", {}
    )  # opportunistic: any certificate will do
    assert res.status is Status.DELIVERED and tls == "encrypted"
    assert res.tls_policy == "opportunistic"
    res, tls = send(
        dns_server, receivers.plain.mx_port, receivers.pki, tmp_path, "alice@plain.test", {}
    )
    assert res.status is Status.DELIVERED and tls == "none"
