"""DKIM keys on disk and their DNS records; `postier dkim keygen` / `record` as users run them.

Keys that postier must refuse are made by openssl, the tool an operator would use, so the
refusals are tested on the files people really have.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
from pathlib import Path

import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest
from cryptography.hazmat.primitives import serialization

from postier.dkim.keys import DkimKey, generate_key, keys_of, load_keys
from postier.dkim.records import plain_value, split_value, zone_file_line
from postier.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def postier(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "postier", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def openssl_key(path: Path, *args: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["openssl", *args, "-out", str(path)], check=True, capture_output=True)
    path.chmod(0o600)
    return path


def txt_strings(zone_line: str) -> list[bytes]:
    """Parse the zone-file line's rdata as a DNS server would."""
    _, rest = zone_line.split(" IN TXT ", 1)
    assert rest.startswith("( ") and rest.endswith(" )")
    rdata = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.TXT, rest[2:-2])
    return list(rdata.strings)  # type: ignore[attr-defined]


def public_der(key: DkimKey) -> bytes:
    private = serialization.load_pem_private_key(key.private_pem, password=None)
    return private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# -- keys -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,bits", [("rsa", 2048), ("ed25519", 0)])
def test_generate_writes_0600_pkcs8_and_never_overwrites(
    tmp_path: Path, kind: str, bits: int
) -> None:
    key = generate_key(tmp_path, "Example.ORG", "s1", kind, bits or 2048)
    assert key.path == tmp_path / "example.org" / "s1.pem"
    assert key.path.stat().st_mode & 0o777 == 0o600
    assert key.private_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    before = key.path.read_bytes()
    with pytest.raises(FileExistsError, match=r"s1\.pem"):
        generate_key(tmp_path, "example.org", "s1", kind, bits or 2048)
    assert key.path.read_bytes() == before
    assert [p.name for p in key.path.parent.iterdir()] == ["s1.pem"]  # no temporary left
    (loaded,) = load_keys(tmp_path)["example.org"]
    assert loaded == key
    assert loaded.algorithm == f"{kind}-sha256"


def test_generate_refuses_weak_or_unknown(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="2048"):
        generate_key(tmp_path, "example.org", "weak", "rsa", 1024)
    with pytest.raises(ValueError, match="key type"):
        generate_key(tmp_path, "example.org", "dsa", "dsa")
    with pytest.raises(ValueError, match="selector"):
        generate_key(tmp_path, "example.org", "bad/selector")


def test_group_readable_key_is_refused_naming_the_file(tmp_path: Path) -> None:
    key = generate_key(tmp_path, "example.org", "s1")
    key.path.chmod(0o640)
    with pytest.raises(ConfigError, match=re.escape(f"{key.path}: mode 0640")):
        load_keys(tmp_path)


def test_1024_bit_rsa_is_refused(tmp_path: Path) -> None:
    path = openssl_key(
        tmp_path / "example.org" / "old.pem",
        "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024",
    )  # fmt: skip
    with pytest.raises(ConfigError, match=re.escape(f"{path}: RSA key of 1024 bits")):
        load_keys(tmp_path)


def test_openssl_keys_are_accepted_and_other_kinds_refused(tmp_path: Path) -> None:
    openssl_key(tmp_path / "example.org" / "a.pem", "genpkey", "-algorithm", "ED25519")
    openssl_key(
        tmp_path / "example.org" / "b.pem",
        "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:3072",
    )  # fmt: skip
    (tmp_path / "example.org" / "b.txt").write_text("what opendkim-genkey leaves beside a key")
    keys = load_keys(tmp_path)["example.org"]
    assert [(k.selector, k.algorithm) for k in keys] == [
        ("a", "ed25519-sha256"),
        ("b", "rsa-sha256"),
    ]

    ec = openssl_key(
        tmp_path / "other.org" / "ec.pem",
        "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
    )  # fmt: skip
    with pytest.raises(ConfigError, match=re.escape(f"{ec}: unsupported key type")):
        load_keys(tmp_path)
    assert len(keys_of(tmp_path, "example.org")) == 2  # the other domain's key is not in the way


def test_pkcs1_pem_is_refused_with_the_conversion_command(tmp_path: Path) -> None:
    key = generate_key(tmp_path, "example.org", "s1")
    private = serialization.load_pem_private_key(key.private_pem, password=None)
    key.path.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ConfigError, match=r"openssl pkcs8 -topk8"):
        load_keys(tmp_path)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such directory"):
        load_keys(tmp_path / "nope")


def test_unicode_domain_directory_is_its_a_label(tmp_path: Path) -> None:
    key = generate_key(tmp_path, "bücher.example", "s1", "ed25519")
    assert key.domain == "xn--bcher-kva.example"
    assert list(load_keys(tmp_path)) == ["xn--bcher-kva.example"]


# -- records ----------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2048, 4096])
def test_rsa_record_strings_fit_and_reassemble_to_the_key(tmp_path: Path, bits: int) -> None:
    key = generate_key(tmp_path, "example.org", "s1", "rsa", bits)
    line = zone_file_line(key)
    assert line.startswith("s1._domainkey.example.org. IN TXT ( ")
    strings = txt_strings(line)
    assert len(strings) >= 2
    assert all(len(s) <= 255 for s in strings)
    joined = b"".join(strings).decode()
    assert joined == plain_value(key) == key.dns_value()
    tags = dict(t.strip().split("=", 1) for t in joined.split(";"))
    assert tags["v"] == "DKIM1" and tags["k"] == "rsa"
    assert base64.b64decode(tags["p"]) == public_der(key)
    # And the same public key as openssl derives from the file.
    openssl = subprocess.run(
        ["openssl", "pkey", "-in", str(key.path), "-pubout", "-outform", "DER"],
        check=True,
        capture_output=True,
    ).stdout
    assert base64.b64decode(tags["p"]) == openssl


def test_ed25519_record_is_the_raw_public_key(tmp_path: Path) -> None:
    key = generate_key(tmp_path, "example.org", "e1", "ed25519")
    (value,) = txt_strings(zone_file_line(key))
    assert value.decode() == f"v=DKIM1; k=ed25519; p={key.public_key_b64()}"
    assert len(base64.b64decode(key.public_key_b64())) == 32  # RFC 8463 §4.2: raw, not SPKI
    assert public_der(key).endswith(base64.b64decode(key.public_key_b64()))


def test_split_value_limits() -> None:
    assert split_value("a" * 510) == ["a" * 255, "a" * 255]
    assert split_value("a" * 256) == ["a" * 255, "a"]
    assert split_value("") == [""]


# -- the commands -----------------------------------------------------------------------


def test_keygen_prints_the_record_and_record_prints_it_again(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    made = postier("dkim", "keygen", "example.org", "--dkim-keys", str(keys), "--selector", "s1")
    assert made.returncode == 0, made.stderr
    zone, plain = made.stdout.splitlines()
    assert zone.startswith('s1._domainkey.example.org. IN TXT ( "v=DKIM1; k=rsa; p=')
    assert b"".join(txt_strings(zone)).decode() == plain
    assert "s1.pem" in made.stderr
    path = keys / "example.org" / "s1.pem"
    assert path.stat().st_mode & 0o777 == 0o600

    again = postier("dkim", "keygen", "example.org", "--dkim-keys", str(keys), "--selector", "s1")
    assert again.returncode == 2
    assert str(path) in again.stderr and "exists" in again.stderr

    ed = postier("dkim", "keygen", "example.org", "--dkim-keys", str(keys), "--type", "ed25519")
    assert ed.returncode == 0, ed.stderr
    assert '._domainkey.example.org. IN TXT ( "v=DKIM1; k=ed25519; p=' in ed.stdout
    assert ed.stdout.split("._domainkey")[0].startswith("ed25519-")  # the dated default

    record = postier("dkim", "record", "example.org", "--dkim-keys", str(keys))
    assert record.returncode == 0, record.stderr
    assert record.stdout.splitlines() == ed.stdout.splitlines() + made.stdout.splitlines()


def test_keygen_refuses_1024_bits(tmp_path: Path) -> None:
    result = postier(
        "dkim", "keygen", "example.org", "--dkim-keys", str(tmp_path), "--bits", "1024"
    )  # fmt: skip
    assert result.returncode == 2
    assert "2048" in result.stderr
    assert not (tmp_path / "example.org").exists() or not any((tmp_path / "example.org").iterdir())


def test_record_without_keys_says_how_to_make_one(tmp_path: Path) -> None:
    result = postier("dkim", "record", "example.org", "--dkim-keys", str(tmp_path))
    assert result.returncode == 1
    assert "postier dkim keygen example.org" in result.stderr
