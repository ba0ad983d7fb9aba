"""Routing for outbound mail: MX, AAAA and A look-ups with the failure classes the queue needs.

Why a module of its own: the queue must tell "try again later" (timeouts, SERVFAIL, no
reachable nameserver) from "this will never work" (NXDOMAIN, null MX, a domain with neither MX
nor address records), and that decision is made here, once, as a `DeliveryError` carrying the
exact code and enhanced code that end up in the bounce or the queue listing:

- NXDOMAIN, or no MX and no address records  -> permanent 550 5.1.2
- null MX (RFC 7505: a single MX whose exchange is ".")  -> permanent 556 5.1.10
- timeout, SERVFAIL, no nameserver answering  -> temporary 451 4.4.3

All look-ups go to one resolver (`--dns-server IP[:PORT]`, else the system's), with search
domains disabled: a mail domain is always absolute, and a search suffix would route mail for
a typo to some local host.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
from collections.abc import Callable

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver

from postier.errors import DeliveryError, PostierError

try:  # IDNA 2008 (UTS #46) when the `idna` package is there, else Python's IDNA 2003 codec.
    import idna as _idna
except ImportError:  # pragma: no cover - dnspython usually pulls it in
    _idna = None


def to_ascii_domain(domain: str) -> str:
    """Return the A-label (xn--) form of `domain`, lower-cased, without a trailing dot.

    DNS only knows A-labels; a U-label sent as raw UTF-8 would ask for a name nobody
    publishes. Raises ValueError for a name that cannot be encoded.
    """
    name = domain.strip().rstrip(".")
    if not name:
        raise ValueError("empty domain")
    if name.isascii():
        return name.lower()
    if _idna is not None:
        try:
            return _idna.encode(name, uts46=True, transitional=False).decode("ascii").lower()
        except _idna.IDNAError:
            pass  # fall back to IDNA 2003 below, which accepts a few more legacy names
    try:
        return name.encode("idna").decode("ascii").lower()
    except UnicodeError as exc:
        raise ValueError(f"cannot encode domain {domain!r} as IDNA: {exc}") from None


def parse_dns_server(text: str) -> tuple[str, int]:
    """Parse `--dns-server IP[:PORT]`: `192.0.2.1`, `192.0.2.1:5353`, `::1`, `[::1]:5353`.

    Raises ValueError with a message fit for "postier: --dns-server: ..." on bad input.
    """
    text = text.strip()
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"missing ']' in {text!r}")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"expected ':PORT' after ']' in {text!r}")
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address") from None
    if not port_text:
        return host, 53
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port {port_text!r} in {text!r}")
    return host, int(port_text)


def is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _temporary(what: str) -> DeliveryError:
    return DeliveryError(what, permanent=False, code=451, enhanced="4.4.3")


def _not_found(what: str) -> DeliveryError:
    return DeliveryError(what, permanent=True, code=550, enhanced="5.1.2")


class DnsTemporaryError(PostierError):
    """A look-up failed for now (timeout, SERVFAIL, no server answering): try again later."""


AUTH_CACHE_SIZE = 4096  # answers kept by the authentication look-ups (SPF, DKIM, DMARC)


class Resolver:
    """An asyncio MX/AAAA/A resolver with postier's failure classes.

    `nameserver` None means the system's resolver configuration (/etc/resolv.conf); a missing
    configuration then shows up as a temporary failure at look-up time, not at start-up, so
    the daemon still starts and the queue retries.
    """

    def __init__(
        self,
        nameserver: str | None = None,
        port: int = 53,
        timeout: float = 10.0,
        *,
        shuffle: Callable[[list[str]], None] = random.shuffle,
    ) -> None:
        self.nameserver = nameserver
        self.port = port
        self.timeout = timeout
        self._shuffle = shuffle  # injectable so tests can check the order among equals
        self._resolver: dns.asyncresolver.Resolver | None = None
        self._auth_resolver: dns.asyncresolver.Resolver | None = None

    def _get_resolver(self) -> dns.asyncresolver.Resolver:
        if self._resolver is None:
            try:
                res = dns.asyncresolver.Resolver(configure=self.nameserver is None)
            except (dns.resolver.NoResolverConfiguration, OSError) as exc:
                raise _temporary(f"no DNS resolver configured: {exc}") from None
            if self.nameserver is not None:
                res.nameservers = [self.nameserver]
                res.port = self.port
            res.lifetime = self.timeout
            res.timeout = self.timeout  # one try per server within the lifetime
            res.search = []
            self._resolver = res
        return self._resolver

    async def _query(self, name: str, rdtype: str) -> dns.resolver.Answer | None:
        """Return the answer, None for NODATA; NXDOMAIN and transient failures raise."""
        qname = dns.name.from_text(name)  # absolute: never a search-list suffix
        try:
            return await self._get_resolver().resolve(
                qname, rdtype, search=False, raise_on_no_answer=False
            )
        except dns.resolver.NXDOMAIN:
            raise _not_found(f"{name}: domain not found (NXDOMAIN)") from None
        except dns.exception.Timeout:
            raise _temporary(f"{name} {rdtype}: DNS timeout") from None
        except dns.resolver.NoNameservers as exc:
            raise _temporary(f"{name} {rdtype}: no usable answer: {exc}") from None
        except dns.exception.DNSException as exc:  # YXDOMAIN, malformed answers, ...
            raise _temporary(f"{name} {rdtype}: DNS failure: {exc}") from None
        except OSError as exc:  # e.g. network unreachable for the configured server
            raise _temporary(f"{name} {rdtype}: DNS failure: {exc}") from None

    async def mx_hosts(self, domain: str) -> list[str]:
        """Mail exchangers for `domain`, best preference first, random order among equals.

        No MX records: the domain itself (implicit MX, RFC 5321 §5.1) when it has AAAA or A
        records. Host names come back in A-label form without the trailing dot.
        """
        try:
            name = to_ascii_domain(domain)
        except ValueError as exc:
            raise DeliveryError(str(exc), permanent=True, code=553, enhanced="5.1.2") from None
        answer = await self._query(name, "MX")
        records = [] if answer is None or answer.rrset is None else list(answer.rrset)
        if not records:
            try:
                await self.addresses(name)
            except DeliveryError as exc:
                if exc.permanent:
                    raise _not_found(f"{name}: no MX and no address records") from None
                raise
            return [name]
        real = [r for r in records if r.exchange != dns.name.root]
        if not real:  # RFC 7505: the domain states it accepts no mail
            raise DeliveryError(
                f"{name}: domain does not accept mail (null MX)",
                permanent=True,
                code=556,
                enhanced="5.1.10",
            )
        by_pref: dict[int, list[str]] = {}
        for r in real:
            host = r.exchange.to_text(omit_final_dot=True).lower()
            by_pref.setdefault(r.preference, []).append(host)
        hosts: list[str] = []
        for pref in sorted(by_pref):
            group = by_pref[pref]
            self._shuffle(group)
            hosts.extend(h for h in group if h not in hosts)
        return hosts

    async def addresses(self, host: str) -> list[str]:
        """IPv6 then IPv4 addresses of `host` (an IP literal is returned as is).

        Records from one family are used when the other family's look-up failed, because a
        reachable address is worth more than a complete list; only when no address came back
        does a transient failure win over "not found".
        """
        host = host.strip().strip("[]")
        if is_ip_address(host):
            return [host]
        try:
            name = to_ascii_domain(host)
        except ValueError as exc:
            raise DeliveryError(str(exc), permanent=True, code=553, enhanced="5.1.2") from None
        results = await asyncio.gather(
            self._query(name, "AAAA"), self._query(name, "A"), return_exceptions=True
        )
        found: list[str] = []
        errors: list[DeliveryError] = []
        for result in results:
            if isinstance(result, DeliveryError):
                errors.append(result)
            elif isinstance(result, BaseException):
                raise result
            elif result is not None and result.rrset is not None:
                found.extend(r.address for r in result.rrset)
        if found:
            return found
        for err in errors:
            if not err.permanent:
                raise err
        if errors:
            raise errors[0]
        raise _not_found(f"{name}: no address records (AAAA or A)")

    # -- Cached look-ups for message authentication (SPF, DKIM keys, DMARC) --
    #
    # Why a second, cached dnspython resolver: SPF, DKIM and DMARC ask the same few names for
    # every message from a sender, so their answers are cached for their TTL (dnspython's
    # LRUCache, which caches NXDOMAIN and NODATA too). MX routing above keeps its uncached
    # behaviour. The failure classes differ from routing: "no such record" is an empty list
    # (SPF, DKIM and DMARC treat NXDOMAIN and NODATA alike) and only a transient failure
    # raises, so callers turn it into `temperror`, never into a permanent verdict.

    def _get_auth_resolver(self) -> dns.asyncresolver.Resolver:
        if self._auth_resolver is None:
            try:
                res = dns.asyncresolver.Resolver(configure=self.nameserver is None)
            except (dns.resolver.NoResolverConfiguration, OSError) as exc:
                raise DnsTemporaryError(f"no DNS resolver configured: {exc}") from None
            if self.nameserver is not None:
                res.nameservers = [self.nameserver]
                res.port = self.port
            res.lifetime = self.timeout
            res.timeout = self.timeout
            res.search = []
            res.cache = dns.resolver.LRUCache(AUTH_CACHE_SIZE)
            self._auth_resolver = res
        return self._auth_resolver

    async def lookup(
        self, name: str, rdtype: str, *, lifetime: float | None = None
    ) -> list[dns.rdata.Rdata]:
        """Records of `rdtype` at `name`; [] for NXDOMAIN or NODATA; cached for their TTL.

        Raises DnsTemporaryError for a transient failure, and ValueError for a name that cannot
        be a DNS name (empty or over-long labels, bad IDNA): the record that named it is bad.
        """
        try:
            qname = dns.name.from_text(to_ascii_domain(name))
        except (ValueError, dns.exception.DNSException) as exc:
            raise ValueError(f"{name!r} is not a valid DNS name: {exc}") from None
        try:
            answer = await self._get_auth_resolver().resolve(
                qname, rdtype, search=False, raise_on_no_answer=False, lifetime=lifetime
            )
        except dns.resolver.NXDOMAIN:
            return []
        except (dns.exception.DNSException, OSError) as exc:
            raise DnsTemporaryError(f"{name} {rdtype}: {type(exc).__name__}: {exc}") from None
        return [] if answer.rrset is None else list(answer.rrset)

    def cached(self, name: str, rdtype: str) -> list[dns.rdata.Rdata] | None:
        """What `lookup` would answer now from its cache alone; None when it would have to ask.

        Synchronous, and safe from any thread (dnspython's cache has its own lock): pyspf
        runs in a pool thread, where a trip to the event loop and back costs ~0.2 ms per
        look-up even when the answer is cached (spf.py asks this first). A cached NXDOMAIN
        or NODATA is [] as in `lookup`; a bad name is None (`lookup` says why).
        """
        res = self._auth_resolver
        if res is None or res.cache is None:
            return None
        try:
            qname = dns.name.from_text(to_ascii_domain(name))
            qtype = dns.rdatatype.RdataType.make(rdtype)
        except (ValueError, dns.exception.DNSException):
            return None
        answer = res.cache.get((qname, qtype, dns.rdataclass.IN))
        if answer is not None:
            return [] if answer.rrset is None else list(answer.rrset)
        answer = res.cache.get((qname, dns.rdatatype.ANY, dns.rdataclass.IN))
        if answer is not None and answer.response.rcode() == dns.rcode.NXDOMAIN:
            return []
        return None

    async def txt(self, name: str, *, lifetime: float | None = None) -> list[bytes]:
        """TXT records at `name`, each with its character-strings joined (RFC 7208 §3.3)."""
        records = await self.lookup(name, "TXT", lifetime=lifetime)
        return [b"".join(r.strings) for r in records]


# --- DNSSEC-aware look-ups for outbound TLS (DANE, MTA-STS, TLS-RPT) ------------------------


class SecureAnswer:
    """Records of one look-up and whether our resolver vouched for them (the AD bit).

    We do not validate DNSSEC ourselves: like Postfix, we trust the AD bit of the one
    resolver the operator configured (a validating resolver such as unbound on loopback).
    NXDOMAIN and NODATA are an empty answer, not an error: "no TLSA" and "no policy" are
    ordinary outcomes for these names.
    """

    __slots__ = ("authenticated", "records")

    def __init__(self, records: list[object], authenticated: bool) -> None:
        self.records = records
        self.authenticated = authenticated


class SecureLookups:
    """TLSA and TXT look-ups that ask for (and report) the AD bit, on `resolver`'s server."""

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self._res: dns.asyncresolver.Resolver | None = None

    def _get(self) -> dns.asyncresolver.Resolver:
        if self._res is None:
            base = self.resolver._get_resolver()
            res = dns.asyncresolver.Resolver(configure=False)
            res.nameservers = list(base.nameservers)
            res.port = base.port
            res.lifetime, res.timeout, res.search = base.lifetime, base.timeout, []
            res.use_edns(0, dns.flags.DO, 1232)  # ask for DNSSEC processing
            res.flags = dns.flags.RD | dns.flags.AD  # and for the AD bit (RFC 6840 §5.7)
            self._res = res
        return self._res

    async def query(self, name: str, rdtype: str) -> SecureAnswer:
        """Records of `rdtype` at `name`; DeliveryError (temporary) on any DNS failure."""
        try:
            answer = await self._get().resolve(
                dns.name.from_text(name), rdtype, search=False, raise_on_no_answer=False
            )
        except dns.resolver.NXDOMAIN:
            return SecureAnswer([], False)
        except (dns.exception.DNSException, OSError) as exc:
            raise _temporary(f"{name} {rdtype}: DNS failure: {exc or type(exc).__name__}") from None
        records = [] if answer.rrset is None else list(answer.rrset)
        return SecureAnswer(records, bool(answer.response.flags & dns.flags.AD))

    async def txt(self, name: str) -> list[str]:
        """TXT records at `name`, each one's strings joined (RFC 7208 §3.3 style)."""
        found = await self.query(name, "TXT")
        return [
            b"".join(r.strings).decode("utf-8", "replace")  # type: ignore[attr-defined]
            for r in found.records
        ]

    async def tlsa(self, host: str, port: int = 25) -> SecureAnswer:
        """TLSA records at `_<port>._tcp.<host>` (RFC 7672 §2.2)."""
        return await self.query(f"_{port}._tcp.{to_ascii_domain(host)}", "TLSA")
