"""DMARC (RFC 7489): policy discovery, identifier alignment and the policy to apply.

- The organizational domain comes from the Public Suffix List shipped in `publicsuffixlist`
  (no download, no hand-written list).
- The record is looked up at `_dmarc.<From domain>`, then at `_dmarc.<organizational domain>`
  (where `sp=` applies to subdomains).
- pass: SPF passed for an aligned domain, or a DKIM signature passed with an aligned d=.
  Otherwise, when a look-up that could still have produced an aligned pass failed for now
  (SPF temperror, DKIM temperror, the record look-up itself), the verdict is `temperror`:
  a temporary error never becomes `fail`, so never a reject.
- `pct=` samples failing messages; the ones left out get the next milder policy (§6.6.4).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache

from publicsuffixlist import PublicSuffixList

from postier.dns import DnsTemporaryError, Resolver
from postier.mailauth.dkim_verify import DkimResult
from postier.mailauth.spf import SpfResult

MAX_RECORD = 4096  # octets; a longer DMARC record is refused (permerror)
MAX_AUTHOR_DOMAINS = 5  # From domains evaluated per message
POLICIES = ("none", "quarantine", "reject")
_DISPOSITION_RANK = {"reject": 0, "quarantine": 1, "temperror": 2, "none": 3}
_RESULT_RANK = {"fail": 0, "temperror": 1, "permerror": 2, "none": 3, "pass": 4}
_MILDER = {"reject": "quarantine", "quarantine": "none", "none": "none"}


@dataclass(frozen=True, slots=True)
class DmarcResult:
    """The DMARC verdict for the author (From) domain."""

    result: str  # pass | fail | none | temperror | permerror
    from_domain: str = ""
    policy: str = ""  # the policy that applies (p= or sp=), "" without a record
    disposition: str = "none"  # none | quarantine | reject | temperror (after pct)
    reason: str = ""


@dataclass(frozen=True, slots=True)
class DmarcRecord:
    policy: str  # p= or sp= as it applies to the From domain
    pct: int
    adkim: str  # "r" | "s"
    aspf: str


@cache
def _psl() -> PublicSuffixList:
    return PublicSuffixList()


@lru_cache(maxsize=4096)  # the list's look-up encodes every label: cache per domain
def organizational_domain(domain: str) -> str:
    """The registrable domain (RFC 7489 §3.2); a public suffix itself stays as it is."""
    domain = domain.lower().rstrip(".")
    return _psl().privatesuffix(domain) or domain


def aligned(a: str, b: str, mode: str) -> bool:
    """Identifier alignment: strict is equality, relaxed is the same organizational domain."""
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    if mode == "s":
        return a == b
    return organizational_domain(a) == organizational_domain(b)


def parse_record(text: bytes, *, subdomain: bool) -> DmarcRecord | str:
    """A DMARC record, or the reason it is invalid (RFC 7489 §6.3)."""
    if len(text) > MAX_RECORD:
        return f"record longer than {MAX_RECORD} octets"
    try:
        value = text.decode("ascii")
    except UnicodeDecodeError:
        return "record is not ASCII"
    tags: dict[str, str] = {}
    for part in value.split(";"):
        name, sep, val = part.partition("=")
        if sep:
            tags.setdefault(name.strip().lower(), val.strip())
    p = tags.get("p", "").lower()
    if p not in POLICIES:
        if "rua" in tags:  # §6.6.3: invalid or missing p= with rua= means p=none
            p = "none"
        else:
            return f"invalid p={tags.get('p', '')!r}"
    policy = p
    if subdomain and tags.get("sp", "").lower() in POLICIES:
        policy = tags["sp"].lower()
    try:
        pct = min(100, max(0, int(tags.get("pct", "100"))))
    except ValueError:
        pct = 100
    adkim = "s" if tags.get("adkim", "r").lower() == "s" else "r"
    aspf = "s" if tags.get("aspf", "r").lower() == "s" else "r"
    return DmarcRecord(policy, pct, adkim, aspf)


def _is_dmarc(text: bytes) -> bool:
    head = text.lstrip()[:8]
    return head == b"v=DMARC1" and text.lstrip()[8:].lstrip()[:1] in (b";", b"")


async def find_record(resolver: Resolver, domain: str) -> DmarcRecord | str | None:
    """The record for `domain` (None: no DMARC; str: why it is unusable).

    Raises DnsTemporaryError when a look-up failed for now.
    """
    org = organizational_domain(domain)
    names = [(domain, False)] if org == domain else [(domain, False), (org, True)]
    for name, subdomain in names:
        try:
            texts = await resolver.txt(f"_dmarc.{name}")
        except ValueError:
            return None
        records = [t for t in texts if _is_dmarc(t)]
        if len(records) > 1:
            return None  # §6.6.3: several records mean no DMARC
        if records:
            return parse_record(records[0], subdomain=subdomain)
    return None


def _verdict_for(
    record: DmarcRecord,
    domain: str,
    spf: SpfResult,
    dkim: Sequence[DkimResult],
    sample: Callable[[], float],
) -> DmarcResult:
    spf_aligned = bool(spf.domain) and aligned(spf.domain, domain, record.aspf)
    dkim_aligned = [d for d in dkim if d.domain and aligned(d.domain, domain, record.adkim)]
    if spf_aligned and spf.result == "pass":
        return DmarcResult("pass", domain, record.policy, "none", "spf aligned")
    if any(d.result == "pass" for d in dkim_aligned):
        return DmarcResult("pass", domain, record.policy, "none", "dkim aligned")
    if (spf_aligned and spf.result == "temperror") or any(
        d.result == "temperror" for d in dkim_aligned
    ):
        # p=none asks for nothing either way: no reason to make the sender retry
        disposition = "none" if record.policy == "none" else "temperror"
        return DmarcResult("temperror", domain, record.policy, disposition, "aligned check failed")
    disposition = record.policy
    if record.pct < 100 and sample() * 100 >= record.pct:
        disposition = _MILDER[disposition]  # §6.6.4: not sampled
    return DmarcResult("fail", domain, record.policy, disposition, "no aligned pass")


async def check_dmarc(
    resolver: Resolver,
    from_domains: Sequence[str],
    spf: SpfResult,
    dkim: Sequence[DkimResult],
    *,
    sample: Callable[[], float] = random.random,
) -> DmarcResult:
    """DMARC for the author domains; with several, the one asking the most decides."""
    if not from_domains:
        return DmarcResult("none", reason="no author domain in From")
    results: list[DmarcResult] = []
    for domain in from_domains[:MAX_AUTHOR_DOMAINS]:
        try:
            record = await find_record(resolver, domain)
        except DnsTemporaryError as exc:
            results.append(DmarcResult("temperror", domain, "", "temperror", str(exc)))
            continue
        if record is None:
            results.append(DmarcResult("none", domain, reason="no DMARC record"))
        elif isinstance(record, str):
            results.append(DmarcResult("permerror", domain, reason=record))
        else:
            results.append(_verdict_for(record, domain, spf, dkim, sample))
    return min(results, key=lambda r: (_DISPOSITION_RANK[r.disposition], _RESULT_RANK[r.result]))
