"""DANE for SMTP (RFC 7672, RFC 6698, RFC 7671): TLSA look-up and matching.

Why these rules:
- TLSA records count only when our resolver vouched for them (the AD bit) and the MX
  RRset they hang off was secure too: an unsigned record is something anyone on the path
  could have written, so it is ignored (RFC 7672 §2.2), as Postfix does.
- DANE-EE(3) pins the server's own certificate or key: the name and the expiry are not
  checked (§3.1.1), which is what lets self-signed MX certificates be authenticated.
- DANE-TA(2) pins an issuer in the chain the server sends; the chain up to it must hold
  together and the leaf must name the MX host (§3.1.2).
- PKIX-TA(0) and PKIX-EE(1) would need a CA list the sender and receiver agree on, which SMTP
  does not have; they are "unusable" (§3.1.3), as are records with unknown parameters or a
  digest of the wrong length. Only unusable records: TLS is still required, unauthenticated.
- A usable record set that matches nothing is a temporary failure, never plaintext (§2.2).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from postier.dns import SecureLookups, to_ascii_domain
from postier.outbound.mta_sts import ReportPolicy
from postier.outbound.tls_policy import HostTls, Level, Source, TlsFailure

DANE_TA, DANE_EE = 2, 3
_DIGEST_SIZES = {1: 32, 2: 64}  # matching type -> bytes (SHA2-256, SHA2-512)


@dataclass(frozen=True, slots=True)
class Tlsa:
    usage: int
    selector: int
    mtype: int
    data: bytes

    @classmethod
    def from_rdata(cls, rdata: object) -> Tlsa:
        return cls(rdata.usage, rdata.selector, rdata.mtype, rdata.cert)  # type: ignore[attr-defined]

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"

    @property
    def usable(self) -> bool:
        """DANE-TA or DANE-EE, a known selector, and a digest of the right length."""
        if self.usage not in (DANE_TA, DANE_EE) or self.selector not in (0, 1):
            return False
        if self.mtype == 0:
            return bool(self.data)
        return _DIGEST_SIZES.get(self.mtype) == len(self.data)

    def matches(self, cert: x509.Certificate) -> bool:
        if self.selector == 0:
            selected = cert.public_bytes(serialization.Encoding.DER)
        else:
            selected = cert.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        if self.mtype == 1:
            selected = hashlib.sha256(selected).digest()
        elif self.mtype == 2:
            selected = hashlib.sha512(selected).digest()
        return selected == self.data


def _names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return [n.lower().rstrip(".") for n in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return [str(a.value).lower().rstrip(".") for a in cns]


def name_matches(cert: x509.Certificate, host: str) -> bool:
    """RFC 6125 matching: exact, or a `*.` wildcard standing for exactly the first label."""
    host = to_ascii_domain(host)
    first, _, rest = host.partition(".")
    for name in _names(cert):
        if name == host or (name.startswith("*.") and first and name[2:] == rest):
            return True
    return False


def _chain_up_to(chain: Sequence[x509.Certificate], top: int) -> bool:
    """True when chain[0] .. chain[top] each issued the one before (signature and name)."""
    try:
        for i in range(top):
            chain[i].verify_directly_issued_by(chain[i + 1])
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def check(records: Sequence[Tlsa], chain_der: Sequence[bytes], host: str) -> None:
    """Raise TlsFailure unless the server's chain satisfies one usable record."""
    try:
        chain = [x509.load_der_x509_certificate(der) for der in chain_der]
    except ValueError as exc:
        raise TlsFailure(
            "validation-failure", f"unreadable certificate from {host}: {exc}"
        ) from None
    if not chain:
        raise TlsFailure("validation-failure", f"{host} sent no certificate")
    leaf = chain[0]
    if any(r.usage == DANE_EE and r.matches(leaf) for r in records):
        return
    name_mismatch = False
    for r in (r for r in records if r.usage == DANE_TA):
        for top, cert in enumerate(chain):
            if top == 0 or not r.matches(cert) or not _chain_up_to(chain, top):
                continue
            if not name_matches(leaf, host):
                name_mismatch = True
                continue
            if leaf.not_valid_after_utc < dt.datetime.now(dt.UTC):
                raise TlsFailure("certificate-expired", f"certificate of {host} has expired")
            return
    if name_mismatch:
        raise TlsFailure(
            "certificate-host-mismatch",
            f"certificate of {host} chains to its DANE-TA record but does not name the host",
        )
    raise TlsFailure(
        "validation-failure",
        f"certificate of {host} matches none of its TLSA records "
        f"({'; '.join(str(r) for r in records)})",
    )


class Dane:
    """The DANE part of the policy decision: `host_tls(domain, mx)` or None (no DANE)."""

    def __init__(self, lookups: SecureLookups) -> None:
        self.lookups = lookups

    async def host_tls(self, domain: str, host: str) -> HostTls | None:
        """DANE when the MX RRset, the host's addresses and its TLSA RRset are all secure.

        An insecure MX or address (RFC 7672 §2.2.1, §2.2.2) means no DANE for that host: a
        forged name could bring forged records along. A DNS failure while looking for TLSA
        under secure names raises DeliveryError (temporary): the records may exist, so going
        on without them could be a downgrade.
        """
        mx = await self.lookups.query(to_ascii_domain(domain), "MX")
        if not mx.authenticated:
            return None
        answers = [await self.lookups.query(to_ascii_domain(host), t) for t in ("AAAA", "A")]
        found_addresses = [a for a in answers if a.records]
        if not found_addresses or not all(a.authenticated for a in found_addresses):
            return None
        found = await self.lookups.tlsa(host)
        if not found.authenticated or not found.records:
            return None
        records = [Tlsa.from_rdata(r) for r in found.records]
        report = ReportPolicy(domain, "tlsa", tuple(str(r) for r in records))
        usable = tuple(r for r in records if r.usable)
        if not usable:  # §2.2: encrypt, but there is nothing to authenticate against
            return HostTls(Level.ENCRYPT, Source.DANE, report=report)
        return HostTls(Level.DANE, Source.DANE, tlsa=usable, report=report)


def tlsa_record(cert_pem: bytes, mx_host: str) -> str:
    """The DANE-EE record (3 1 1) to publish for our own MX, as a zone-file line, from the
    leaf of our certificate chain, with the rollover warning `postier doctor --records`
    prints: 3 1 1 pins the key, so a renewal that keeps the key keeps the record, and a new
    key needs its record published (beside the old one) a few TTLs before the switch."""
    leaf = x509.load_pem_x509_certificates(cert_pem)[0]
    spki = leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    name = f"_25._tcp.{to_ascii_domain(mx_host)}."
    return (
        f"{name} IN TLSA 3 1 1 {hashlib.sha256(spki).hexdigest()}\n"
        "; DANE-EE pins the key: before a key rollover, publish the new key's record beside\n"
        "; this one and wait at least two TTLs (certbot: --reuse-key keeps the key and record)"
    )
