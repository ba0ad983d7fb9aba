"""Per-destination TLS levels, and the one decision of which policy applies to a next hop.

The levels are Postfix's (`smtp_tls_policy_maps`), so an operator's habits carry over:

- `none`: never STARTTLS (a peer whose TLS is broken beyond repair);
- `may`: STARTTLS when offered, any certificate, plaintext when it fails (RFC 7435);
- `encrypt`: STARTTLS required, any certificate; no plaintext fallback;
- `verify`: STARTTLS required, certificate chain and MX name verified;
- `dane`: DANE when the MX has secure, usable TLSA records, else `may` (Postfix's "dane").

Precedence, strongest statement first: the operator's `tls_policy` table overrides discovery;
then DANE (RFC 7672 §2.2: DNSSEC beats a web PKI policy, RFC 8461 §2); then MTA-STS; then
opportunistic `may`. Every failure under a required level is temporary (4xx, retried), so a
downgrade attacker can delay mail but never read it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from postier.errors import ConfigError

__all__ = ["OPPORTUNISTIC", "HostTls", "Level", "Source", "parse_policy_table", "static_level"]


class Level(enum.StrEnum):
    NONE = "none"
    MAY = "may"
    ENCRYPT = "encrypt"
    VERIFY = "verify"
    DANE = "dane"


class Source(enum.StrEnum):
    """Which rule set the level came from: the `policy=` field of the delivery log line."""

    TLS_POLICY = "tls-policy"
    MTA_STS = "mta-sts"
    DANE = "dane"
    OPPORTUNISTIC = "opportunistic"
    SMARTHOST = "smarthost"


@dataclass(frozen=True, slots=True)
class HostTls:
    """What TLS one MX host owes us on this attempt, and why.

    `enforce` False is MTA-STS `mode: testing`: failures are logged and reported, and the
    message still goes (over the best TLS the host gives). `tlsa` carries the usable TLSA
    records when `level` is DANE. `report` names the TLS-RPT policy this attempt counts
    toward (None: nothing to report).
    """

    level: Level
    source: Source
    enforce: bool = True
    tlsa: tuple[Any, ...] = ()
    report: Any = field(default=None, compare=False)
    # A failure found before connecting that only gets reported (MTA-STS testing mode).
    noted: TlsFailure | None = field(default=None, compare=False)

    @property
    def required(self) -> bool:
        """True when a failed STARTTLS must defer the message instead of going plaintext."""
        return self.enforce and self.level in (Level.ENCRYPT, Level.VERIFY, Level.DANE)


OPPORTUNISTIC = HostTls(Level.MAY, Source.OPPORTUNISTIC)


def _valid_domain_key(key: str) -> bool:
    name = key[1:] if key.startswith(".") else key
    return bool(name) and " " not in name and "@" not in name and "*" not in name


def parse_policy_table(value: Any, where: str = "tls_policy") -> dict[str, Level]:
    """The TOML table `tls_policy = { "example.com" = "verify", ".example.net" = "may" }`.

    Keys are domains; a leading dot covers every subdomain (not the domain itself), as in
    Postfix's policy maps. Raises ConfigError naming the key and the allowed levels.
    """
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a table of domain = level")
    table: dict[str, Level] = {}
    for raw_key, raw_level in value.items():
        key = str(raw_key).strip().lower().rstrip(".")
        if not _valid_domain_key(key):
            raise ConfigError(f"{where}: {raw_key!r} is not a domain (or .domain)")
        try:
            table[key] = Level(str(raw_level).strip().lower())
        except ValueError:
            allowed = ", ".join(level.value for level in Level)
            raise ConfigError(
                f"{where}: {raw_key!r} = {raw_level!r}: the level must be one of {allowed}"
            ) from None
    return table


def static_level(table: Mapping[str, Level], domain: str) -> Level | None:
    """The operator's level for `domain`: an exact entry, else the nearest `.parent` entry."""
    name = domain.lower().rstrip(".")
    if name in table:
        return table[name]
    labels = name.split(".")
    for i in range(1, len(labels)):
        level = table.get("." + ".".join(labels[i:]))
        if level is not None:
            return level
    return None


class TlsFailure(Exception):
    """A next hop fell short of what its policy demands.

    `result_type` is the RFC 8460 result type (`starttls-not-supported`,
    `certificate-host-mismatch`, `certificate-expired`, `certificate-not-trusted`,
    `validation-failure`, `tlsa-invalid`, `dnssec-invalid`, `sts-policy-fetch-error`, ...);
    `enhanced` the RFC 3463 code the deferral carries.
    """

    # OpenSSL verify codes (X509_V_ERR_*) that have a result type of their own.
    _BY_VERIFY_CODE = {
        10: "certificate-expired",  # CERT_HAS_EXPIRED
        62: "certificate-host-mismatch",  # HOSTNAME_MISMATCH
        18: "certificate-not-trusted",  # DEPTH_ZERO_SELF_SIGNED_CERT
        19: "certificate-not-trusted",  # SELF_SIGNED_CERT_IN_CHAIN
        20: "certificate-not-trusted",  # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
        21: "certificate-not-trusted",  # UNABLE_TO_VERIFY_LEAF_SIGNATURE
    }

    def __init__(
        self,
        result_type: str,
        text: str,
        *,
        enhanced: str = "",
        source: str = "",
        host_tls: HostTls | None = None,
    ) -> None:
        super().__init__(text)
        self.result_type = result_type
        self.host_tls = host_tls  # set when refused before connecting: what to report under
        self.enhanced = enhanced or (
            "4.7.10" if result_type == "starttls-not-supported" else "4.7.5"
        )
        self.source = source

    @classmethod
    def from_verification(cls, exc: Any, peer: str) -> TlsFailure:
        """From ssl.SSLCertVerificationError, keeping OpenSSL's reason for the operator."""
        code = getattr(exc, "verify_code", None)
        result = cls._BY_VERIFY_CODE.get(code or 0, "validation-failure")
        why = getattr(exc, "verify_message", None) or str(exc)
        return cls(result, f"certificate of {peer}: {why}")


class DomainTls:
    """The TLS decision for one destination domain, made once per connection attempt.

    `for_host(mx)` gives each MX host its requirement. Built by `TlsPolicy.for_domain`; a
    smarthost uses `DomainTls.fixed`.
    """

    def __init__(self, domain: str, default: HostTls, *, sts: Any = None, dane: Any = None) -> None:
        self.domain = domain
        self.default = default
        self.sts = sts  # postier.outbound.mta_sts.StsPolicy or None
        self.dane = dane  # async (mx host) -> HostTls | None, or None when DANE is off

    @classmethod
    def fixed(cls, domain: str, host_tls: HostTls) -> DomainTls:
        return cls(domain, host_tls)

    async def for_host(self, host: str) -> HostTls:
        """DANE first (when on and the MX has secure TLSA records), then MTA-STS, then the
        default. Raises TlsFailure for an MX an enforced MTA-STS policy does not list."""
        if self.dane is not None:
            found = await self.dane(host)
            if found is not None:
                return found
        if self.sts is not None:
            return self.sts.for_host(self.domain, host)
        return self.default


class TlsPolicy:
    """Decides, per destination, which TLS policy applies; counts outcomes for TLS-RPT.

    `table` is the operator's `tls_policy`; `mta_sts` a postier.outbound.mta_sts.MtaSts (None:
    off); `dane` a postier.outbound.dane.Dane (None: off); `reports` a
    postier.outbound.tlsrpt.TlsReports (None: nothing is counted).
    """

    def __init__(
        self,
        table: Mapping[str, Level] | None = None,
        *,
        mta_sts: Any = None,
        dane: Any = None,
        reports: Any = None,
    ) -> None:
        self.table = dict(table or {})
        self.mta_sts = mta_sts
        self.dane = dane
        self.reports = reports

    async def for_domain(self, domain: str) -> DomainTls:
        level = static_level(self.table, domain)
        if level is not None and level is not Level.DANE:
            return DomainTls(domain, HostTls(level, Source.TLS_POLICY))
        dane = None
        if self.dane is not None:
            lookup = self.dane

            async def dane(host: str) -> HostTls | None:
                return await lookup.host_tls(domain, host)

        if level is Level.DANE:  # Postfix's "dane": DANE where published, else "may"
            return DomainTls(domain, HostTls(Level.MAY, Source.TLS_POLICY), dane=dane)
        sts = await self.mta_sts.policy(domain) if self.mta_sts is not None else None
        return DomainTls(domain, OPPORTUNISTIC, sts=sts, dane=dane)

    def record_success(
        self, host_tls: HostTls, host: str, address: str, *, sending_ip: str = ""
    ) -> None:
        if self.reports is not None and host_tls.report is not None:
            self.reports.record(host_tls.report, host, address, sending_ip=sending_ip)

    def record_failure(
        self,
        host_tls: HostTls,
        failure: TlsFailure,
        host: str,
        address: str,
        *,
        sending_ip: str = "",
    ) -> None:
        if self.reports is not None and host_tls.report is not None:
            self.reports.record(host_tls.report, host, address, failure, sending_ip=sending_ip)
