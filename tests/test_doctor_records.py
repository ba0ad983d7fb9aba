"""`postier doctor --records` and `zone_snippet()`: the zone text parses back and is right.

The output is read back with dnspython's zone parser (as a DNS server would read it), and the
TLSA digest is recomputed with the openssl command line, independently of our code.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import shutil
import subprocess
import sys
from pathlib import Path

import dns.name
import dns.rdatatype
import dns.zone
import pytest
import trustme

from postier.config import build
from postier.dkim.keys import generate_key, keys_of
from postier.ops.records import zone_snippet
from tests.doctorenv import DOMAIN, HOST, run_doctor

OPENSSL = shutil.which("openssl")


@pytest.fixture
def setup(tmp_path: Path) -> dict[str, Path]:
    ca = trustme.CA()
    leaf = ca.issue_cert(HOST, not_after=dt.datetime.now(dt.UTC) + dt.timedelta(days=90))
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    generate_key(tmp_path / "dkim", DOMAIN, "rsa1")
    generate_key(tmp_path / "dkim", DOMAIN, "ed1", kind="ed25519")
    return {"cert": cert, "key": key, "dkim": tmp_path / "dkim"}


def _records(setup: dict[str, Path]) -> str:
    code, out, err = run_doctor(
        "-H", HOST, "-s", DOMAIN, "--public-ip", "192.0.2.25", "--public-ip", "2001:db8::25",
        "--mx", "127.0.0.1:2525", "--tls-cert", str(setup["cert"]), "--tls-key",
        str(setup["key"]), "--dkim-keys", str(setup["dkim"]), "--records",
    )  # fmt: skip
    assert code == 0, err
    return out


def _rdatas(zone: dns.zone.Zone, name: str, rtype: str) -> list:
    rdataset = zone.get_rdataset(dns.name.from_text(name), dns.rdatatype.from_text(rtype))
    return list(rdataset) if rdataset is not None else []


def _txt(zone: dns.zone.Zone, name: str) -> list[str]:
    return [b"".join(r.strings).decode() for r in _rdatas(zone, name, "TXT")]


def test_records_parse_back_and_say_the_right_things(setup: dict[str, Path]) -> None:
    text = _records(setup)
    zone = dns.zone.from_text(text, origin=dns.name.root, relativize=False, check_origin=False)

    mx = _rdatas(zone, f"{DOMAIN}.", "MX")
    assert [(r.preference, r.exchange.to_text()) for r in mx] == [(10, f"{HOST}.")]
    assert [r.address for r in _rdatas(zone, f"{HOST}.", "A")] == ["192.0.2.25"]
    assert [r.address for r in _rdatas(zone, f"{HOST}.", "AAAA")] == ["2001:db8::25"]
    for address in ("192.0.2.25", "2001:db8::25"):
        ptr = ipaddress.ip_address(address).reverse_pointer + "."
        assert [r.target.to_text() for r in _rdatas(zone, ptr, "PTR")] == [f"{HOST}."]
    assert _txt(zone, f"{DOMAIN}.") == ["v=spf1 ip4:192.0.2.25 ip6:2001:db8::25 ~all"]
    assert _txt(zone, f"_dmarc.{DOMAIN}.") == [
        f"v=DMARC1; p=quarantine; rua=mailto:postmaster@{DOMAIN}"
    ]
    assert _txt(zone, f"_smtp._tls.{DOMAIN}.") == [f"v=TLSRPTv1; rua=mailto:postmaster@{DOMAIN}"]

    keys = keys_of(setup["dkim"], DOMAIN)
    assert {k.selector for k in keys} == {"rsa1", "ed1"}
    for key in keys:
        (rdata,) = _rdatas(zone, f"{key.selector}._domainkey.{DOMAIN}.", "TXT")
        assert all(len(s) <= 255 for s in rdata.strings)
        assert b"".join(rdata.strings).decode() == key.dns_value()
        if key.kind == "rsa":
            assert len(rdata.strings) > 1  # a 2048-bit key needs splitting

    (tlsa,) = _rdatas(zone, f"_25._tcp.{HOST}.", "TLSA")
    assert (tlsa.usage, tlsa.selector, tlsa.mtype) == (3, 1, 1)
    if OPENSSL:
        pubkey = subprocess.run([OPENSSL, "x509", "-pubkey", "-noout", "-in", str(setup["cert"])],
                                capture_output=True, check=True).stdout  # fmt: skip
        der = subprocess.run([OPENSSL, "pkey", "-pubin", "-outform", "DER"], input=pubkey,
                             capture_output=True, check=True).stdout  # fmt: skip
        digest = subprocess.run([OPENSSL, "dgst", "-sha256", "-r"], input=der,
                                capture_output=True, check=True).stdout.split()[0]  # fmt: skip
        assert tlsa.cert.hex() == digest.decode()

    # MTA-STS needs an HTTPS policy host first: offered, but commented out.
    assert not _txt(zone, f"_mta-sts.{DOMAIN}.")
    assert f'; _mta-sts.{DOMAIN}. 3600 IN TXT "v=STSv1; id=1"' in text
    assert f"https://mta-sts.{DOMAIN}/.well-known/mta-sts.txt" in text


def test_every_record_line_says_why(setup: dict[str, Path]) -> None:
    lines = [line for line in _records(setup).splitlines() if line.strip()]
    records = [line for line in lines if not line.startswith(";")]
    assert len(records) >= 10
    for line in records:
        assert "  ; " in line, line
    tlsa = next(line for line in records if " TLSA " in line)
    assert "key rollover" in tlsa


def test_zone_snippet_interface_without_dkim_keys(setup: dict[str, Path]) -> None:
    """The call `postier setup` makes; a domain without keys gets the keygen hint."""
    config = build({}, {"hostname": HOST, "domain": [DOMAIN], "public_ip": ["192.0.2.25"],
                        "tls_cert": str(setup["cert"]), "tls_key": str(setup["key"])})  # fmt: skip
    text = zone_snippet(config, DOMAIN)
    zone = dns.zone.from_text(text, origin=dns.name.root, relativize=False, check_origin=False)
    assert _txt(zone, f"{DOMAIN}.") == ["v=spf1 ip4:192.0.2.25 ~all"]
    assert f"; no DKIM key for {DOMAIN}: `postier dkim keygen {DOMAIN}" in text
    assert _rdatas(zone, f"_25._tcp.{HOST}.", "TLSA")


def test_bad_public_ip_is_a_usage_error() -> None:
    code, _out, err = run_doctor("-H", HOST, "--public-ip", "not-an-ip", DOMAIN, "--records")
    assert code == 2
    assert err.startswith("postier doctor: --public-ip: ")
    assert len(err.strip().splitlines()) == 1


def test_config_file_public_ip_and_check_config(setup: dict[str, Path], tmp_path: Path) -> None:
    """public_ip from TOML (a list), as `serve` and `check-config` read it too."""
    config = tmp_path / "postier.toml"
    config.write_text(
        f'hostname = "{HOST}"\ndomain = ["{DOMAIN}"]\n'
        'public_ip = ["192.0.2.25", "2001:DB8::25"]\nmx = ["127.0.0.1:2525"]\n'
    )
    code, out, err = run_doctor("-c", str(config), "--records")
    assert code == 0, err
    assert "v=spf1 ip4:192.0.2.25 ip6:2001:db8::25 ~all" in out  # normalised spelling
    checked = subprocess.run(
        [sys.executable, "-m", "postier", "check-config", "-c", str(config)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr
    assert 'public_ip = ["192.0.2.25", "2001:db8::25"]' in checked.stdout
