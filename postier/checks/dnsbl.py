"""DNS blocklists: is the client's address listed, and how much does that weigh?

A client is looked up in every configured list at once (IPv4 as reversed octets, IPv6 as
reversed nibbles, RFC 5782). Each list has a weight, and the client is refused when the sum of
the weights of the lists that list it reaches the threshold — Postfix postscreen's
`postscreen_dnsbl_sites` / `postscreen_dnsbl_threshold`, so one list can be trusted alone and
two weaker ones only together. A list entry is written as in postscreen:

    "zen.spamhaus.org"              weight 1, any 127.0.0.0/8 answer counts
    "zen.spamhaus.org*3"            weight 3
    "bl.example=127.0.0.2*2"        only the answer 127.0.0.2 counts ("=127.0.0.2,127.0.0.4")

Answers outside 127.0.0.0/8, and 127.255.255.0/24 (Spamhaus's "error / query refused" codes),
are ignored with a log line: they mean the list is misused or broken, never that the client is
bad. A time-out or SERVFAIL counts as "not listed" with a log line: a DNS failure must never
keep mail out. Answers are cached for their TTL.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from dataclasses import dataclass, field

import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver

from postier import log

_LOG = logging.getLogger("postier.dnsbl")
_LOOPBACK_NET = ipaddress.ip_network("127.0.0.0/8")
_ERROR_CODES = ipaddress.ip_network("127.255.255.0/24")
MAX_CACHE = 20000


@dataclass(frozen=True, slots=True)
class DnsblSite:
    zone: str
    weight: int = 1
    codes: frozenset[str] = frozenset()  # empty: any 127.0.0.0/8 answer

    @classmethod
    def parse(cls, text: str) -> DnsblSite:
        """Parse "zone[=code,code][*weight]"; ValueError with a message on bad input."""
        spec = text.strip()
        weight = 1
        if "*" in spec:
            spec, _, w = spec.rpartition("*")
            if not w.lstrip("-").isdigit():
                raise ValueError(f"bad weight in DNSBL entry {text!r}")
            weight = int(w)
        codes: frozenset[str] = frozenset()
        if "=" in spec:
            spec, _, code_text = spec.partition("=")
            try:
                codes = frozenset(
                    str(ipaddress.IPv4Address(c.strip())) for c in code_text.split(",")
                )
            except ValueError:
                raise ValueError(f"bad answer code in DNSBL entry {text!r}") from None
        zone = spec.strip().rstrip(".").lower()
        if not zone or "." not in zone or any(c.isspace() for c in zone):
            raise ValueError(f"bad DNSBL zone in {text!r}")
        return cls(zone, weight, codes)


@dataclass(frozen=True, slots=True)
class DnsblHit:
    zone: str
    code: str
    weight: int
    reason: str


@dataclass(frozen=True, slots=True)
class DnsblResult:
    score: int = 0
    hits: tuple[DnsblHit, ...] = ()
    errors: tuple[str, ...] = ()  # lists that could not be asked (time-out, SERVFAIL)

    def listed(self, threshold: int) -> bool:
        return bool(self.hits) and self.score >= threshold

    def reason(self) -> str:
        """The text for the SMTP reply: the first list's own TXT reason, else its name."""
        for hit in self.hits:
            if hit.reason:
                return hit.reason
        return f"listed at {self.hits[0].zone}" if self.hits else ""


def query_name(ip: str, zone: str) -> str:
    """The name to ask: 4.3.2.1.zone, or the 32 reversed nibbles of an IPv6 address."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    reverse = addr.reverse_pointer  # "4.3.2.1.in-addr.arpa" / nibbles + ".ip6.arpa"
    return reverse.rsplit(".", 2)[0] + "." + zone


@dataclass(slots=True)
class _Cached:
    expires: float
    codes: list[str]
    reason: str


@dataclass
class DnsblChecker:
    """Looks clients up in `sites`, through one resolver, with a TTL cache."""

    sites: list[DnsblSite]
    resolver: dns.asyncresolver.Resolver
    _cache: dict[str, _Cached] = field(default_factory=dict)

    async def check(self, ip: str) -> DnsblResult:
        results = await asyncio.gather(*(self._site(ip, s) for s in self.sites))
        hits = tuple(h for h, _ in results if h is not None)
        errors = tuple(e for _, e in results if e)
        return DnsblResult(sum(h.weight for h in hits), hits, errors)

    async def _site(self, ip: str, site: DnsblSite) -> tuple[DnsblHit | None, str]:
        name = query_name(ip, site.zone)
        cached = self._cache.get(name)
        if cached is None or cached.expires < time.monotonic():
            try:
                cached = await self._look_up(name, site)
            except (dns.exception.DNSException, OSError) as exc:
                log.event(
                    "dnsbl-error",
                    logging.WARNING,
                    _LOG,
                    ip=ip,
                    dnsbl=site.zone,
                    error=type(exc).__name__,
                )
                return None, site.zone
            if len(self._cache) >= MAX_CACHE:
                self._cache.clear()
            self._cache[name] = cached
        counted = [c for c in cached.codes if not site.codes or c in site.codes]
        if not counted:
            return None, ""
        return DnsblHit(site.zone, counted[0], site.weight, cached.reason), ""

    async def _look_up(self, name: str, site: DnsblSite) -> _Cached:
        qname = dns.name.from_text(name)
        try:
            answer = await self.resolver.resolve(qname, "A", search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer) as exc:
            ttl = _negative_ttl(exc)
            return _Cached(time.monotonic() + ttl, [], "")
        codes: list[str] = []
        for rr in answer:
            addr = ipaddress.IPv4Address(rr.address)
            if addr not in _LOOPBACK_NET or addr in _ERROR_CODES:
                log.event(
                    "dnsbl-odd-answer",
                    logging.WARNING,
                    _LOG,
                    dnsbl=site.zone,
                    answer=addr,
                    note="ignored: not a listing code",
                )
                continue
            codes.append(str(addr))
        reason = ""
        if codes:
            reason = await self._reason(qname)
        ttl = answer.rrset.ttl if answer.rrset is not None else 300
        return _Cached(time.monotonic() + max(ttl, 1), codes, reason)

    async def _reason(self, qname: dns.name.Name) -> str:
        """The list's TXT explanation, printable ASCII only (it goes into a reply line)."""
        try:
            answer = await self.resolver.resolve(qname, "TXT", search=False)
        except (dns.exception.DNSException, OSError):
            return ""
        for rr in answer:
            text = b"".join(rr.strings).decode("ascii", "replace")
            clean = "".join(c for c in text if 32 <= ord(c) < 127)
            return clean[:200]
        return ""


def _negative_ttl(exc: Exception) -> float:
    """The SOA minimum of a negative answer when the server sent one, else 5 minutes."""
    response = getattr(exc, "response", None)
    try:
        if callable(response):
            resp = response()  # NoAnswer.response() in dnspython 2
            for rrset in resp.authority:
                return float(min(rrset.ttl, rrset[0].minimum))
    except Exception:  # the TTL is a nicety; the answer stands
        pass
    return 300.0
