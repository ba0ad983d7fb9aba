"""Messages signed by an independent DKIM implementation (Perl's Mail::DKIM), spooled as
postier spools them, for the verification tests.
"""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

from cryptography.hazmat.primitives import serialization

SIGNER = Path(__file__).with_name("dkim_sign.pl")


def genkey(directory: Path, selector: str, domain: str = "example.test") -> Path:
    """An RSA 2048 key made by opendkim-genkey; returns the private key file."""
    subprocess.run(
        ["opendkim-genkey", "-D", str(directory), "-d", domain, "-s", selector, "-b", "2048"],
        check=True,
        capture_output=True,
    )
    return directory / f"{selector}.private"


def key_record(private_key: Path) -> str:
    """The DKIM TXT record value that publishes the public half of `private_key`."""
    key = serialization.load_pem_private_key(private_key.read_bytes(), password=None)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()


def sign(
    message: bytes,
    key: Path,
    selector: str,
    domain: str = "example.test",
    *,
    algorithm: str = "rsa-sha256",
    method: str = "relaxed/relaxed",
    headers: str = "",
    expiration: str = "",
) -> bytes:
    """`message` with a DKIM-Signature field from Mail::DKIM prepended (LF line ends)."""
    args = ["perl", str(SIGNER), str(key), domain, selector, algorithm, method, headers, expiration]
    out = subprocess.run(args, input=message, check=True, capture_output=True).stdout
    return out.rstrip(b"\n") + b"\n" + message


def spool(path: Path, message: bytes, sender: str = "alice@example.test") -> int:
    """Write `message` as a postier spool file (LF, Return-Path, Received); its content offset."""
    head = f"Return-Path: <{sender}>\n".encode()
    received = b"Received: from client.test (client.test [192.0.2.5])\n\tby mx.test with ESMTP\n"
    path.write_bytes(head + received + message.replace(b"\r\n", b"\n"))
    return len(head)


def message(
    body: bytes = b"Hello,  world \n\n\n", from_: str = "Alice <alice@example.test>"
) -> bytes:
    return (
        f"From: {from_}\nTo: bob@example.org\nSubject: a test\n"
        "Date: Wed, 02 Dec 2026 07:00:00 +0000\nMessage-ID: <1@example.test>\n\n"
    ).encode() + body
