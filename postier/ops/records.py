"""The DNS records a domain publishes for mail from postier, as a zone-file snippet.

One place decides what we recommend, and `doctor` quotes the same functions in its fixes: the
complaint against other self-checks is that they warn about records their own setup printed.
Every line carries a comment saying why it is there, because the reader pastes it into a DNS
panel and has to know what each line is for.

Choices, each with its reason:
- SPF lists our addresses (no `mx`/`a` terms: every term costs a look-up at every receiver) and
  ends in `~all`: DMARC with DKIM does the enforcing, while some receivers reject `-all` before
  looking at DKIM, which loses legitimately forwarded mail.
- DMARC starts at `p=quarantine` with reports to postmaster: protective from day one, while a
  misconfiguration still delivers (to spam) instead of bouncing.
- MTA-STS lines are commented out: the TXT record only helps once an HTTPS server at
  `mta-sts.<domain>` serves the policy, and without it senders just log fetch errors.
- TLSA `3 1 1` pins our key (not the certificate), so certificate renewals with the same key
  keep it valid; a new key needs a new record published before the switch.
"""

from __future__ import annotations

import hashlib
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from postier.config import Config
from postier.dkim.keys import keys_of
from postier.dkim.records import zone_file_line
from postier.netaddr import interface_addresses

TTL = 3600


def our_addresses(config: Config) -> list[str]:
    """Our public addresses: `public_ip`, else the global addresses the mx listeners bind.

    Private and loopback addresses are left out: receivers never see them, and a server
    behind NAT has to say which address the world sees (`public_ip`).
    """
    if config.public_ip:
        return list(config.public_ip)
    found: list[str] = []
    for spec in config.mx:
        if spec.kind == "ip":
            candidates = [spec.host]
        elif spec.kind == "interface":
            candidates = interface_addresses(spec.host)
        else:  # all addresses: which of them the world sees is not ours to guess
            candidates = []
        for addr in candidates:
            ip = ipaddress.ip_address(addr)
            if ip.is_global and str(ip) not in found:
                found.append(str(ip))
    return found


def txt_rdata(value: str) -> str:
    """`value` as TXT rdata: quoted strings of at most 255 octets (RFC 1035 §3.3.14)."""
    raw = value.encode("ascii")
    parts = [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]
    quoted = [
        '"' + p.decode("ascii").replace("\\", "\\\\").replace('"', '\\"') + '"' for p in parts
    ]
    return " ".join(quoted) if len(quoted) == 1 else "( " + " ".join(quoted) + " )"


def mx_value(config: Config) -> str:
    return f"10 {config.hostname.rstrip('.')}."


def spf_value(addresses: list[str]) -> str:
    terms = [f"ip{ipaddress.ip_address(a).version}:{a}" for a in addresses]
    return " ".join(["v=spf1", *terms, "~all"])


def dmarc_value(domain: str) -> str:
    return f"v=DMARC1; p=quarantine; rua=mailto:postmaster@{domain}"


def tls_rpt_value(domain: str) -> str:
    return f"v=TLSRPTv1; rua=mailto:postmaster@{domain}"


def ptr_name(address: str) -> str:
    return ipaddress.ip_address(address).reverse_pointer + "."


def certificate_path(config: Config) -> Path | None:
    """The certificate chain the mx listener presents for our host name, if configured."""
    if config.tls_cert is not None:
        return config.tls_cert
    if config.tls_cert_dir is not None:
        candidate = config.tls_cert_dir / config.hostname / "fullchain.pem"
        if candidate.is_file():
            return candidate
    return None


def leaf_certificate(path: Path) -> x509.Certificate:
    """The first certificate of a PEM chain; OSError or ValueError when unreadable."""
    return x509.load_pem_x509_certificates(path.read_bytes())[0]


def tlsa_311(cert: x509.Certificate) -> str:
    """DANE-EE, SubjectPublicKeyInfo, SHA-256 (RFC 7671 §5.1): survives renewals, not new keys."""
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return f"3 1 1 {hashlib.sha256(spki).hexdigest()}"


def dkim_keys_dir(config: Config, override: Path | None = None) -> Path | None:
    """The DKIM key directory: `override` (a doctor flag), else the configuration's."""
    found = override or getattr(config, "dkim_keys", None)
    return Path(found) if found else None


def dkim_lines(config: Config, domain: str, dkim_keys: Path | None = None) -> list[str]:
    """The zone-file lines of our DKIM keys for `domain` (empty when it has none)."""
    keys_dir = dkim_keys_dir(config, dkim_keys)
    if keys_dir is None:
        return []
    return [zone_file_line(key) for key in keys_of(keys_dir, domain)]


def _line(name: str, rtype: str, rdata: str, why: str) -> str:
    return f"{name} {TTL} IN {rtype} {rdata}  ; {why}"


def zone_snippet(config: Config, domain: str, *, dkim_keys: Path | None = None) -> str:
    """The records `domain` should publish for mail sent and received by this server.

    `dkim_keys` overrides the configuration's key directory. Raises ConfigError for keys
    that cannot be read (the message names the file).
    """
    domain = domain.rstrip(".").lower()
    host = config.hostname.rstrip(".").lower()
    addresses = our_addresses(config)
    out = [
        f"; DNS records for {domain}, mail server {host} (postier doctor --records)",
        _line(f"{domain}.", "MX", mx_value(config), f"mail for {domain} is delivered to {host}"),
    ]
    if not addresses:
        out.append("; set public_ip (--public-ip) to get the A/AAAA, PTR and SPF records")
    for addr in addresses:
        rtype = "AAAA" if ipaddress.ip_address(addr).version == 6 else "A"
        out.append(_line(f"{host}.", rtype, addr, f"{host} is reached at {addr}"))
    for addr in addresses:
        out.append(
            _line(
                ptr_name(addr),
                "PTR",
                f"{host}.",
                "reverse DNS, set at whoever owns the address (hosting panel); receivers "
                "refuse mail from addresses whose PTR does not name the sending host",
            )
        )
    if addresses:
        out.append(
            _line(
                f"{domain}.",
                "TXT",
                txt_rdata(spf_value(addresses)),
                "SPF: only our addresses send for this domain; ~all leaves enforcing to DMARC",
            )
        )
    dkim = dkim_lines(config, domain, dkim_keys)
    for line in dkim:
        out.append(f"{line}  ; DKIM: the public key receivers verify our signatures with")
    if not dkim:
        out.append(f"; no DKIM key for {domain}: `postier dkim keygen {domain} --dkim-keys DIR`")
    out.append(
        _line(
            f"_dmarc.{domain}.",
            "TXT",
            txt_rdata(dmarc_value(domain)),
            "DMARC: mail failing SPF and DKIM alignment goes to spam; reports to postmaster",
        )
    )
    out.append(
        _line(
            f"_smtp._tls.{domain}.",
            "TXT",
            txt_rdata(tls_rpt_value(domain)),
            "TLS-RPT: senders report TLS failures toward us to postmaster",
        )
    )
    sts = _line(
        f"_mta-sts.{domain}.",
        "TXT",
        txt_rdata("v=STSv1; id=1"),
        f"MTA-STS: uncomment once https://mta-sts.{domain}/.well-known/mta-sts.txt serves "
        f"'version: STSv1', 'mode: testing', 'mx: {host}', 'max_age: 86400'",
    )
    out.append(f"; {sts}")
    out.extend(_tlsa_lines(config, host))
    return "\n".join(out) + "\n"


def _tlsa_lines(config: Config, host: str) -> list[str]:
    path = certificate_path(config)
    if path is None:
        return [f"; no certificate configured: no TLSA record for {host}"]
    try:
        cert = leaf_certificate(path)
    except (OSError, ValueError) as exc:
        return [f"; {path}: cannot read the certificate ({exc}): no TLSA record"]
    return [
        _line(
            f"_25._tcp.{host}.",
            "TLSA",
            tlsa_311(cert),
            "DANE (needs a DNSSEC-signed zone): pins our key; before a key rollover publish the"
            " new key's record beside this one and wait two TTLs before switching",
        )
    ]
