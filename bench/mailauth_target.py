"""postier's mx with the SPF, DKIM and DMARC checks on or off, for ``--scenario mailauth``.

Both rows send the same DKIM-signed message (RSA 2048, relaxed/relaxed, signed once by dkimpy
at start) from ``SENDER``, whose domain a loopback DNS responder (tests/dnsserver.py, in the
bench process: its CPU is not the server's) publishes with SPF, the DKIM key and DMARC
``p=reject``; both servers ask that responder (``--dns-server``). The only difference:

- ``checks=True``: ``exempt_networks = []``, so the load from 127.0.0.1 is checked (SPF at
  MAIL, DKIM and DMARC at end of data, the Authentication-Results field added);
- ``checks=False``: the default exempt loopback, so the same messages skip the checks.

The server caches answers for their TTL (60 s here), so after the first message this measures
a repeat sender: the crypto and the parsing, not DNS round trips. bench/mailauth_cost.py
measures the library alone, cold cache included.
"""

from __future__ import annotations

import argparse
import base64
from pathlib import Path

from bench.harness import SENDER
from bench.targets import PostierTarget, _repo_on_path

SELECTOR = "bench"
SENDER_DOMAIN = SENDER.rpartition("@")[2]


def _txt(value: str) -> str:
    """A TXT value as zone text, in quoted strings of at most 255 octets."""
    raw = value.encode()
    return " ".join(f'"{raw[i : i + 255].decode()}"' for i in range(0, len(raw), 255))


def signed_message(private_pem: bytes, size: int) -> bytes:
    """A message from SENDER with a DKIM signature over the usual headers (CRLF)."""
    import dkim

    full, rest = divmod(max(size, 0), 80)
    body = (b"X" * 78 + b"\r\n") * full + (b"X" * max(rest - 2, 0) + b"\r\n" if rest else b"")
    message = (
        f"From: Bench <{SENDER}>\r\nTo: <alice@example.org>\r\nSubject: mailauth bench\r\n"
        "Date: Thu, 01 Jan 2026 00:00:00 +0000\r\nMessage-ID: <mailauth@sender.example>\r\n"
        "\r\n"
    ).encode() + body
    signature = dkim.sign(
        message,
        SELECTOR.encode(),
        SENDER_DOMAIN.encode(),
        private_pem,
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
    )
    return signature + message


def key_pair() -> tuple[bytes, str]:
    """A fresh RSA 2048 key: (PKCS#8 PEM, the DKIM TXT record value)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem, "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()


class MailauthTarget(PostierTarget):
    """postier's mx taking DKIM-signed mail from a domain with SPF, DKIM and DMARC records."""

    def __init__(self, workdir: Path, opts: argparse.Namespace, *, checks: bool, **kw) -> None:
        self.message_file = workdir / "signed.eml"
        loadgen_args = (*kw.pop("loadgen_args", ()), "--message-file", str(self.message_file))
        super().__init__(workdir, opts, loadgen_args=loadgen_args, **kw)
        self.checks = checks
        self.dns = None

    def start(self) -> None:
        _repo_on_path()
        from tests.dnsserver import DnsServer

        pem, record = key_pair()
        self.message_file.write_bytes(signed_message(pem, self.opts.size))
        zone = {
            SENDER_DOMAIN: {"TXT": [_txt("v=spf1 ip4:127.0.0.0/8 -all")]},
            f"{SELECTOR}._domainkey.{SENDER_DOMAIN}": {"TXT": [_txt(record)]},
            f"_dmarc.{SENDER_DOMAIN}": {"TXT": [_txt("v=DMARC1; p=reject")]},
        }
        self.dns = DnsServer(zone).start()
        try:
            super().start()
        except BaseException:
            self.dns.stop()
            self.dns = None
            raise

    def serve_args(self) -> list[str]:
        args = ["--dns-server", f"127.0.0.1:{self.dns.port}"]
        if self.checks:
            conf = self.workdir / "mailauth.toml"
            conf.write_text("exempt_networks = []\n")
            args += ["-c", str(conf)]
        return args

    def stop(self) -> None:
        super().stop()
        if self.dns is not None:
            self.dns.stop()
            self.dns = None
