"""Doctor's checks of our own host: its addresses, reverse DNS, certificate and TLSA record.

These are asked once per run, whatever the number of domains: they are about the machine that
sends and receives, not about a domain.

FCrDNS (forward-confirmed reverse DNS) has two halves and each is reported once: the PTR of
each address must name our host (`check_ptr`) and our host's A/AAAA records must hold that
address (`check_addresses`). A person fixes them in two different places (the hosting panel
and the zone), so they are two problems, never one problem reported twice.

The certificate check speaks SMTP: connect to our host name as DNS gives it, on the mx
listener's port (25 in production; tests run the server on a high loopback port), ask for
STARTTLS, and verify the certificate against the system's CAs or `--tls-ca-file`, the way a
sender enforcing MTA-STS would.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from postier.ops.doctor_dns import Lookup
from postier.ops.doctor_problem import Problem
from postier.ops.records import leaf_certificate, ptr_name, tlsa_311

EXPIRY_MARGIN = dt.timedelta(days=14)
SMTP_TIMEOUT = 15.0  # seconds for the whole STARTTLS probe: our own server, nearby


@dataclass(frozen=True, slots=True)
class HostContext:
    hostname: str
    addresses: tuple[str, ...]  # ours: public_ip, else the listeners'
    mx_port: int
    ca_file: Path | None
    cert_file: Path | None  # what we configured, for TLSA when the probe got no certificate


def _family(address: str) -> str:
    return "IPv6" if ipaddress.ip_address(address).version == 6 else "IPv4"


def _rtype(address: str) -> str:
    return "AAAA" if ipaddress.ip_address(address).version == 6 else "A"


async def check_addresses(host: HostContext, lookup: Lookup) -> list[Problem]:
    """Our host name's A/AAAA records are exactly our addresses."""
    found = await lookup.addresses(host.hostname)
    problems = []
    for addr in host.addresses:
        if addr not in found:
            problems.append(
                Problem(
                    "address",
                    host.hostname,
                    f"no {_rtype(addr)} record for our {_family(addr)} address {addr}: senders "
                    f"cannot reach us there and its reverse DNS is not forward-confirmed",
                    f"publish: {host.hostname}. IN {_rtype(addr)} {addr}",
                )
            )
    for addr in found:
        if addr not in host.addresses:
            problems.append(
                Problem(
                    "address",
                    host.hostname,
                    f"{_rtype(addr)} record {addr} is not one of our addresses "
                    f"({', '.join(host.addresses)}): mail sent there does not reach us",
                    f"remove that record, or add {addr} to public_ip if it is ours",
                )
            )
    return problems


async def check_ptr(host: HostContext, lookup: Lookup, address: str) -> list[Problem]:
    """The PTR of `address` names our host (IPv4 and IPv6 are asked separately, per address)."""
    names = await lookup.ptr(address)
    fix = (
        f"ask whoever owns {address} (your hosting provider's panel) to set its reverse DNS: "
        f"{ptr_name(address)} IN PTR {host.hostname}."
    )
    if not names:
        return [
            Problem(
                "ptr",
                address,
                f"our {_family(address)} address has no PTR record, and receivers such as "
                "Gmail refuse mail from addresses without reverse DNS",
                fix,
            )
        ]
    if host.hostname not in names:
        return [
            Problem(
                "ptr",
                address,
                f"the PTR names {', '.join(names)}, not our host name {host.hostname}, so "
                "receivers cannot confirm who sends",
                fix,
            )
        ]
    return []


@dataclass(slots=True)
class _Probe:
    problems: list[Problem]
    leaf: x509.Certificate | None = None


async def _read_reply(reader: asyncio.StreamReader) -> tuple[int, list[str]]:
    lines = []
    while True:
        raw = await reader.readline()
        if not raw:
            raise ConnectionError("connection closed by the server")
        text = raw.decode("utf-8", "replace").rstrip("\r\n")
        lines.append(text[4:])
        if len(text) < 4 or text[3] != "-":
            return int(text[:3]) if text[:3].isdigit() else 0, lines


def _verifying_context(ca_file: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


async def _starttls(host: HostContext, address: str) -> _Probe:
    """One SMTP conversation up to a verified TLS handshake; problems say what failed."""
    subject = f"{host.hostname}:{host.mx_port}"
    reader, writer = await asyncio.open_connection(address, host.mx_port)
    try:
        code, _ = await _read_reply(reader)
        writer.write(b"EHLO doctor.invalid\r\n")
        code, lines = await _read_reply(reader)
        if code != 250 or not any(line.upper().split()[:1] == ["STARTTLS"] for line in lines):
            what = f"the mx listener at {address} does not offer STARTTLS"
            fix = "set tls_cert and tls_key (--tls-cert, --tls-key) and restart postier"
            return _Probe([Problem("certificate", subject, what, fix)])
        writer.write(b"STARTTLS\r\n")
        code, lines = await _read_reply(reader)
        if code != 220:
            what = f"STARTTLS answered {code} {' '.join(lines)}"
            return _Probe([Problem("certificate", subject, what, "see postier's log")])
        try:
            await writer.start_tls(_verifying_context(host.ca_file), server_hostname=host.hostname)
        except ssl.SSLCertVerificationError as exc:
            return _Probe([_verify_problem(host, subject, exc)])
        except ssl.SSLError as exc:
            what = f"the TLS handshake with {address} failed ({exc.reason or exc})"
            fix = "see postier's log for the TLS error and check tls_cert/tls_key"
            return _Probe([Problem("certificate", subject, what, fix)])
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True)
        leaf = x509.load_der_x509_certificate(der)
        writer.write(b"QUIT\r\n")
        return _Probe(_expiry_problems(subject, leaf), leaf)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (OSError, ssl.SSLError):
            pass  # the probe is done; a rough close changes nothing about the verdict


def _verify_problem(host: HostContext, subject: str, exc: ssl.SSLCertVerificationError) -> Problem:
    message = exc.verify_message or str(exc)
    if exc.verify_code == 62 or "hostname mismatch" in message.lower():  # X509_V_ERR_HOSTNAME_…
        return Problem(
            "certificate",
            subject,
            f"the certificate is not valid for the name {host.hostname}",
            f"get a certificate that names {host.hostname} (certbot certonly -d "
            f"{host.hostname}) and point tls_cert/tls_key at it",
        )
    if exc.verify_code == 10:  # X509_V_ERR_CERT_HAS_EXPIRED
        return Problem(
            "certificate",
            subject,
            f"the certificate has expired ({message})",
            "renew it (certbot renew) and send postier SIGHUP",
        )
    return Problem(
        "certificate",
        subject,
        f"the certificate does not verify ({message}); senders enforcing MTA-STS refuse it",
        "use a certificate from a public CA (Let's Encrypt: certbot certonly -d "
        f"{host.hostname}) with its full chain in tls_cert",
    )


def _expiry_problems(subject: str, leaf: x509.Certificate) -> list[Problem]:
    not_after = leaf.not_valid_after_utc
    left = not_after - dt.datetime.now(dt.UTC)
    if left >= EXPIRY_MARGIN:
        return []
    return [
        Problem(
            "certificate",
            subject,
            f"the certificate expires on {not_after:%Y-%m-%d %H:%M} UTC, in {left.days} days",
            "renew it now (certbot renew) and send postier SIGHUP",
        )
    ]


async def check_certificate(
    host: HostContext, lookup: Lookup
) -> tuple[list[Problem], x509.Certificate | None]:
    """STARTTLS to our MX name; returns the problems and the certificate it presented."""
    addresses = await lookup.addresses(host.hostname)
    if not addresses:
        return [], None  # check_addresses reports the missing records
    subject = f"{host.hostname}:{host.mx_port}"
    errors = []
    for address in addresses:
        try:
            probe = await asyncio.wait_for(_starttls(host, address), SMTP_TIMEOUT)
        except (OSError, ConnectionError, TimeoutError, ssl.SSLError, ValueError) as exc:
            errors.append(f"{address}: {exc or type(exc).__name__}")
            continue
        return probe.problems, probe.leaf
    what = f"cannot speak SMTP to {host.hostname} ({'; '.join(errors)})"
    fix = f"make sure postier serve listens on port {host.mx_port} there and the firewall allows it"
    return [Problem("certificate", subject, what, fix)], None


def _tlsa_matches(record: object, leaf: x509.Certificate) -> bool:
    """Does a DANE-EE record (usage 3) match `leaf` (RFC 6698 §2.1.2, §2.1.3)?"""
    selector, mtype, data = record.selector, record.mtype, record.cert  # type: ignore[attr-defined]
    if selector == 0:
        material = leaf.public_bytes(serialization.Encoding.DER)
    else:
        material = leaf.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    if mtype == 1:
        material = hashlib.sha256(material).digest()
    elif mtype == 2:
        material = hashlib.sha512(material).digest()
    return material == data


async def check_tlsa(
    host: HostContext, lookup: Lookup, leaf: x509.Certificate | None
) -> list[Problem]:
    """A published DANE-EE record must match the key we serve, or DANE senders defer our mail.

    Only usage 3 is judged: DANE-TA (2) depends on the chain a CA may change, and a set with
    any usage-2 record may be right without matching the leaf, so it is left alone.
    """
    name = f"_25._tcp.{host.hostname}"
    records = await lookup.records(name, "TLSA")
    if not records or any(r.usage != 3 for r in records):
        return []
    if leaf is None and host.cert_file is not None:
        try:
            leaf = leaf_certificate(host.cert_file)
        except (OSError, ValueError):
            leaf = None
    if leaf is None or any(_tlsa_matches(r, leaf) for r in records):
        return []
    return [
        Problem(
            "tlsa",
            name,
            "no TLSA record matches the key we serve, so DANE senders will not deliver to us",
            "publish it beside the old one, and remove the old one once nothing serves the "
            f"old key: {name}. IN TLSA {tlsa_311(leaf)}",
        )
    ]
