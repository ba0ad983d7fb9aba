"""DNS look-ups for `postier doctor`: one resolver, answers shared for the run, failures named.

Why not `postier.dns.Resolver.lookup`, which has the same classes (records, or [] for
NXDOMAIN/NODATA, or a temporary failure): doctor tells the operator *which* failure it was
("no answer within 5s", "SERVFAIL"), since that is what they go and fix, and it shares one
query among the checks that ask the same name at once during a run. A missing record is a
finding; a time-out or SERVFAIL says nothing about the record and is never reported as
"missing". The resolver is configured like `postier.dns.Resolver`: the `--dns-server` given,
else the system's, with no search list.

pyspf evaluates SPF itself and asks DNS through a module-level function; `spf_lookup()` gives
it one that goes through this same resolver, bound to the evaluating thread only by
`postier.mailauth.spf.pyspf_dns` (the one hook the mx check uses too), so evaluations of
several domains in several threads need no lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import Iterator
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver
import dns.reversename
import spf

from postier.mailauth.spf import pyspf_dns


class DnsFailure(Exception):
    """A look-up that did not answer: time-out, SERVFAIL, no server reachable."""

    def __init__(self, name: str, rdtype: str, reason: str) -> None:
        super().__init__(f"{name} {rdtype}: {reason}")
        self.name = name
        self.rdtype = rdtype
        self.reason = reason


def _configure(res: dns.resolver.BaseResolver, server: tuple[str, int] | None, timeout: float):
    if server is not None:
        res.nameservers = [server[0]]
        res.port = server[1]
    res.lifetime = timeout
    res.timeout = timeout
    res.search = []


class Lookup:
    """Cached async look-ups; `server` None means the system's resolver configuration."""

    def __init__(self, server: tuple[str, int] | None = None, timeout: float = 5.0) -> None:
        self.server = server
        self.timeout = timeout
        self._cache: dict[tuple[str, str], asyncio.Future[list[Any]]] = {}
        self._async: dns.asyncresolver.Resolver | None = None

    def describe_server(self) -> str:
        if self.server is None:
            return "the system's resolver"
        host, port = self.server
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _resolver(self) -> dns.asyncresolver.Resolver:
        if self._async is None:
            res = dns.asyncresolver.Resolver(configure=self.server is None)
            _configure(res, self.server, self.timeout)
            self._async = res
        return self._async

    async def records(self, name: str, rdtype: str) -> list[Any]:
        """The rdata of `name`/`rdtype`; [] when the name or the type does not exist."""
        key = (name.lower().rstrip("."), rdtype)
        if key not in self._cache:  # concurrent checks asking the same share one query
            self._cache[key] = asyncio.ensure_future(self._query(*key))
        return await asyncio.shield(self._cache[key])

    async def _query(self, name: str, rdtype: str) -> list[Any]:
        qname = dns.name.from_text(name)
        try:
            answer = await self._resolver().resolve(
                qname, rdtype, search=False, raise_on_no_answer=False
            )
        except dns.resolver.NXDOMAIN:
            return []
        except dns.exception.Timeout:
            raise DnsFailure(name, rdtype, f"no answer within {self.timeout:g}s") from None
        except dns.resolver.NoNameservers:
            raise DnsFailure(name, rdtype, "the server failed to answer (SERVFAIL)") from None
        except (dns.exception.DNSException, OSError) as exc:
            raise DnsFailure(name, rdtype, f"look-up failed: {exc}") from None
        return [] if answer.rrset is None else list(answer.rrset)

    async def txt(self, name: str) -> list[str]:
        """TXT records, each one's strings joined (RFC 7208 §3.3, RFC 6376 §3.6.2.2)."""
        out = []
        for rdata in await self.records(name, "TXT"):
            out.append(b"".join(rdata.strings).decode("utf-8", "replace"))
        return out

    async def addresses(self, name: str) -> list[str]:
        """AAAA and A addresses of `name`, normalised; a failure of either family raises."""
        v6, v4 = await asyncio.gather(self.records(name, "AAAA"), self.records(name, "A"))
        return [str(ipaddress.ip_address(r.address)) for r in (*v6, *v4)]

    async def ptr(self, address: str) -> list[str]:
        rev = dns.reversename.from_address(address).to_text(omit_final_dot=True)
        records = await self.records(rev, "PTR")
        return [r.target.to_text(omit_final_dot=True).lower() for r in records]

    @contextlib.contextmanager
    def spf_lookup(self) -> Iterator[None]:
        """Let pyspf ask DNS through our resolver; time-outs and SERVFAIL become TempError."""
        res = dns.resolver.Resolver(configure=self.server is None)
        _configure(res, self.server, self.timeout)

        def lookup(name: str, qtype: str, timeout: float = 0) -> list[Any]:
            try:
                answer = res.resolve(name, qtype, search=False, raise_on_no_answer=False)
            except dns.resolver.NXDOMAIN:
                return []
            except (dns.exception.DNSException, OSError) as exc:
                raise spf.TempError(f"DNS {name} {qtype}: {exc}") from None
            out: list[Any] = []
            for rdata in [] if answer.rrset is None else answer.rrset:
                if qtype in ("A", "AAAA"):
                    out.append(((name, qtype), rdata.address))
                elif qtype == "MX":
                    out.append(((name, qtype), (rdata.preference, rdata.exchange)))
                elif qtype == "PTR":
                    out.append(((name, qtype), rdata.target.to_text(True)))
                elif qtype in ("TXT", "SPF"):
                    out.append(((name, qtype), rdata.strings))
            return out

        with pyspf_dns(lookup):
            yield
