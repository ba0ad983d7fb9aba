"""Inbound message authentication: SPF, DKIM and DMARC verdicts and Authentication-Results.

The one entry point for the end-of-data check is `authenticate`; `check_spf` runs at MAIL time
(greylisting can reuse its result). Everything blocking (pyspf, header parsing, the streaming
body hash, the crypto) runs in the thread pool; DNS goes through the shared cached `Resolver`.
No function here raises for bad input or DNS trouble: those are verdicts (permerror,
temperror), and a temporary error is never turned into `fail`, so never into a reject.

    spf = await check_spf(resolver, "192.0.2.1", "alice@example.org", "mail.example.org")
    verdicts = await authenticate(resolver, spool_path, content_offset, spf=spf, executor=pool)
    header = verdicts.header("mx.example.net")         # prepend above our Received:
    if verdicts.dmarc_disposition() == "reject" and config.dmarc_reject: ... 550 5.7.1
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

from postier.dns import DnsTemporaryError, Resolver
from postier.mailauth import dkim_verify
from postier.mailauth.dkim_verify import DkimResult
from postier.mailauth.dmarc import DmarcResult, check_dmarc, organizational_domain
from postier.mailauth.headers import HeaderSection, from_domains, read_header_section
from postier.mailauth.results import claims_authserv_id, render
from postier.mailauth.spf import SpfResult, check_spf

__all__ = [
    "AuthVerdicts",
    "DkimResult",
    "DmarcResult",
    "SpfResult",
    "authenticate",
    "check_spf",
    "claims_authserv_id",
]


@dataclass(frozen=True, slots=True)
class AuthVerdicts:
    """The three verdicts for one message."""

    spf: SpfResult
    dkim: list[DkimResult]
    dmarc: DmarcResult

    def header(self, authserv_id: str) -> bytes:
        """`Authentication-Results: <authserv_id>; spf=...; dkim=...; dmarc=...` (LF, folded)."""
        return render(authserv_id, self.spf, self.dkim, self.dmarc)

    def dmarc_disposition(self) -> str:
        """What the sender's policy asks after pct=: none, quarantine, reject or temperror.

        A temperror (the record could not be read) asks for nothing when the From domain
        itself passed SPF or DKIM: DMARC passes under any record then, strict ones too, so
        a retry would gain nothing."""
        disposition = self.dmarc.disposition
        if disposition == "temperror" and self._from_domain_passed():
            return "none"
        return disposition

    def _from_domain_passed(self) -> bool:
        domain = self.dmarc.from_domain.lower()
        if not domain:
            return False
        if self.spf.result == "pass" and self.spf.domain.lower() == domain:
            return True
        return any(d.result == "pass" and d.domain.lower() == domain for d in self.dkim)


def _read(path: Path, offset: int) -> tuple[HeaderSection, dkim_verify.Prepared]:
    """The header section and its DKIM signatures parsed, in one trip to the pool (each trip
    costs about 0.1 ms of CPU); and the Public Suffix List loaded once (tens of ms)."""
    organizational_domain("example.org")
    section = read_header_section(path, offset)
    return section, dkim_verify.prepare(section)


async def _warm_dmarc(resolver: Resolver, domains: list[str]) -> None:
    """Ask for the DMARC records while DKIM works, so check_dmarc finds them in the cache."""
    names = {f"_dmarc.{d}" for d in domains} | {
        f"_dmarc.{organizational_domain(d)}" for d in domains
    }
    for result in await asyncio.gather(*(resolver.txt(n) for n in names), return_exceptions=True):
        if isinstance(result, BaseException) and not isinstance(
            result, DnsTemporaryError | ValueError
        ):
            raise result


async def authenticate(
    resolver: Resolver,
    message_path: Path,
    content_offset: int,
    *,
    spf: SpfResult,
    executor: Executor | None = None,
) -> AuthVerdicts:
    """DKIM and DMARC for the spooled message at `content_offset` of `message_path`.

    The file holds the message from `content_offset` on (LF or CRLF line ends); it is read
    twice, header section first, then the body in blocks: never whole in memory. Only an
    unreadable file raises (OSError): that is the server's trouble, not the message's.
    """
    loop = asyncio.get_running_loop()
    section, prepared = await loop.run_in_executor(executor, _read, message_path, content_offset)
    authors = from_domains(section.raw)
    await asyncio.gather(
        dkim_verify.fetch_keys(resolver, prepared), _warm_dmarc(resolver, authors[:5])
    )
    dkim = await loop.run_in_executor(executor, dkim_verify.finish, message_path, prepared)
    dmarc = await check_dmarc(resolver, authors, spf, dkim)
    return AuthVerdicts(spf, dkim, dmarc)
