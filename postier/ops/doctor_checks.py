"""Doctor's checks of one mail domain: MX, SPF, DKIM, DMARC, MTA-STS and TLS-RPT.

Each check returns the problems it found, one per thing a person has to change, and quotes the
record `postier doctor --records` recommends as the fix, so doctor never warns about its own
advice. A check stops at the first problem that makes the later ones meaningless (two SPF
records: evaluating either is beside the point), which keeps one cause to one line.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.name
import spf
from publicsuffixlist import PublicSuffixList

from postier.config import Config
from postier.dkim.keys import keys_of
from postier.dkim.records import zone_file_line
from postier.ops.doctor_dns import Lookup
from postier.ops.doctor_problem import Problem
from postier.ops.records import dmarc_value, mx_value, spf_value, tls_rpt_value, txt_rdata

#: TEST-NET-1 / documentation addresses: no real record lists them, so evaluating SPF for them
#: walks the whole record, which exposes look-up limits that our own address might not reach.
PROBE_ADDRESSES = ("192.0.2.1", "2001:db8::1")
_STS_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")
_psl: PublicSuffixList | None = None


@dataclass(frozen=True, slots=True)
class DomainContext:
    config: Config
    hostname: str
    addresses: tuple[str, ...]
    dkim_keys: Path | None  # the key directory, None when DKIM signing is not configured


def _tags(record: str) -> dict[str, str]:
    """`k=v; k=v` tag lists (DMARC, MTA-STS, TLS-RPT), first occurrence of a tag wins."""
    out: dict[str, str] = {}
    for part in record.split(";"):
        key, sep, value = part.partition("=")
        if sep and key.strip() and key.strip() not in out:
            out[key.strip()] = value.strip()
    return out


def organizational_domain(domain: str) -> str:
    global _psl
    if _psl is None:
        _psl = PublicSuffixList()
    return _psl.privatesuffix(domain.lower()) or domain.lower()


# --- MX -----------------------------------------------------------------------------------


async def check_mx(ctx: DomainContext, lookup: Lookup, domain: str) -> list[Problem]:
    records = await lookup.records(domain, "MX")
    fix = f"publish: {domain}. IN MX {mx_value(ctx.config)}"
    if not records:
        what = "no MX record, so senders try the domain's own address or give up"
        return [Problem("mx", domain, what, fix)]
    if all(r.exchange == dns.name.root for r in records):
        what = "a null MX (RFC 7505) says the domain receives no mail"
        return [Problem("mx", domain, what, f"replace it: {fix}")]
    hosts = sorted({r.exchange.to_text(omit_final_dot=True).lower() for r in records})
    if ctx.hostname not in hosts:
        what = f"the MX records name {', '.join(hosts)}, not our host name {ctx.hostname}"
        return [Problem("mx", domain, what, fix)]
    return []


# --- SPF ----------------------------------------------------------------------------------


def _spf_records(txts: list[str]) -> list[str]:
    return [t for t in txts if t.lower() == "v=spf1" or t.lower().startswith("v=spf1 ")]


def _evaluate(lookup: Lookup, domain: str, hostname: str, addresses: list[str]) -> list[Any]:
    """pyspf's (result, explanation) for each address; blocking, so run in a thread."""
    results = []
    with lookup.spf_lookup():
        for address in addresses:
            query = spf.query(i=address, s=f"postmaster@{domain}", h=hostname)
            result, _code, explanation = query.check()
            results.append((result, getattr(query, "prob", "") or explanation))
    return results


def _with_addresses(record: str, addresses: tuple[str, ...], missing: list[str]) -> str:
    """`record` with ip4:/ip6: terms for `missing` inserted before its final `all`."""
    terms = record.split()
    new = [f"ip{ipaddress.ip_address(a).version}:{a}" for a in missing if a in addresses]
    at = next(
        (i for i, t in enumerate(terms) if t.lower().lstrip("+-~?") == "all"),
        len(terms),
    )
    return " ".join(terms[:at] + new + terms[at:])


async def check_spf(ctx: DomainContext, lookup: Lookup, domain: str) -> list[Problem]:
    records = _spf_records(await lookup.txt(domain))
    suggested = f"publish: {domain}. IN TXT {txt_rdata(spf_value(list(ctx.addresses)))}"
    if not records:
        what = "no SPF record, so receivers cannot tell that our addresses send for it"
        return [Problem("spf", domain, what, suggested)]
    if len(records) > 1:
        what = f"{len(records)} SPF records; receivers answer permerror to more than one"
        return [Problem("spf", domain, what, f"merge them into one; {suggested}")]
    record = records[0]
    if any(t.lower() in ("all", "+all") for t in record.split()[1:]):
        what = f'"{record}" ends in +all, which lets every address on the Internet pass'
        return [Problem("spf", domain, what, suggested)]
    everyone = [*PROBE_ADDRESSES, *ctx.addresses]
    results = await asyncio.to_thread(_evaluate, lookup, domain, ctx.hostname, everyone)
    for result, why in results:
        if result == "temperror":
            what = f"evaluating the SPF record hit a DNS failure ({why})"
            fix = f"make sure every name the record of {domain} refers to answers, then retry"
            return [Problem("dns", f"{domain} SPF", what, fix)]
        if result == "permerror":
            if "too many dns lookups" in why.lower():
                what = (
                    f'"{record}" needs more than 10 DNS look-ups ({why}); receivers say permerror'
                )
                fix = f"replace include:/a/mx terms by ip4:/ip6: terms, e.g. {suggested}"
            elif "void lookup" in why.lower():
                what = (
                    f'"{record}" refers to names that do not exist ({why}); receivers answer '
                    "permerror"
                )
                fix = f"remove the terms naming domains without records, e.g. {suggested}"
            else:
                what = f'"{record}" is broken ({why}); receivers answer permerror'
                fix = suggested
            return [Problem("spf", domain, what, fix)]
    failing = [
        (address, result)
        for address, (result, _why) in zip(everyone, results, strict=True)
        if address in ctx.addresses and result != "pass"
    ]
    if not failing:
        return []
    fixed = _with_addresses(record, ctx.addresses, [a for a, _ in failing])
    return [
        Problem(
            "spf",
            domain,
            f'our address {address} gets "{result}" from "{record}", so mail sent from it '
            "does not pass SPF",
            f"publish: {domain}. IN TXT {txt_rdata(fixed)}",
        )
        for address, result in failing
    ]


# --- DKIM ---------------------------------------------------------------------------------


def _dkim_p(txt: str) -> str | None:
    """The p= of a DKIM key record (RFC 6376 §3.6.1), whitespace removed; None if not one."""
    tags = _tags(txt)
    if "p" not in tags or tags.get("v", "DKIM1") != "DKIM1":
        return None
    return "".join(tags["p"].split())


async def check_dkim(ctx: DomainContext, lookup: Lookup, domain: str) -> list[Problem]:
    keys = keys_of(ctx.dkim_keys, domain) if ctx.dkim_keys is not None else []
    if not keys:
        what = "we have no DKIM key for it, so its mail carries no signature and DMARC fails"
        fix = (
            f"postier dkim keygen {domain} --dkim-keys DIR, set dkim_keys = DIR, "
            "and publish the record it prints"
        )
        return [Problem("dkim", domain, what, fix)]
    problems = []
    for key in keys:
        name = f"{key.selector}._domainkey.{domain}"
        published = [p for p in map(_dkim_p, await lookup.txt(name)) if p is not None]
        ours = key.public_key_b64()
        fix = f"publish: {zone_file_line(key)}"
        if not published:
            what = "no DKIM key record, so receivers cannot verify our signatures"
        elif len(published) > 1:
            what = f"{len(published)} DKIM key records; receivers may pick any of them"
        elif published[0] == "":
            what = "the record revokes the key (empty p=), so our signatures fail"
        elif published[0] != ours:
            what = "the published p= is not the key we sign with, so our signatures fail"
        else:
            continue
        problems.append(Problem("dkim", name, what, fix))
    return problems


# --- DMARC --------------------------------------------------------------------------------


async def check_dmarc(ctx: DomainContext, lookup: Lookup, domain: str) -> list[Problem]:
    name = f"_dmarc.{domain}"
    records = [t for t in await lookup.txt(name) if t.startswith("v=DMARC1")]
    fix = f"publish: {name}. IN TXT {txt_rdata(dmarc_value(domain))}"
    if not records:
        what = "no DMARC record: Gmail and Yahoo want one, and forged mail from the domain passes"
        return [Problem("dmarc", name, what, fix)]
    if len(records) > 1:
        what = f"{len(records)} DMARC records; receivers then apply none (RFC 7489 §6.6.3)"
        return [Problem("dmarc", name, what, f"remove all but one; {fix}")]
    tags = _tags(records[0])
    policy = tags.get("p", "").lower()
    if policy not in ("none", "quarantine", "reject"):
        what = f'"{records[0]}" has no valid p= tag, so receivers ignore it'
        return [Problem("dmarc", name, what, fix)]
    problems = []
    if policy == "none":
        what = "p=none only monitors: forged mail from the domain is still delivered"
        problems.append(Problem("dmarc", name, what, fix))
    for uri in filter(None, (u.strip() for u in tags.get("rua", "").split(","))):
        if not uri.lower().startswith("mailto:"):
            continue
        address = uri[len("mailto:") :].split("!", 1)[0]
        rua_domain = address.rpartition("@")[2].lower().rstrip(".")
        if (
            "@" not in address
            or not rua_domain
            or organizational_domain(rua_domain) == organizational_domain(domain)
        ):
            continue
        auth = f"{domain}._report._dmarc.{rua_domain}"
        if any(t.startswith("v=DMARC1") for t in await lookup.txt(auth)):
            continue
        what = (
            f"reports go to {address}, outside the domain, and {rua_domain} has not agreed "
            "to receive them, so receivers send none (RFC 7489 §7.1)"
        )
        fix_rua = (
            f"send rua to an address in {domain}, or have the zone of {rua_domain} "
            f'publish: {auth}. IN TXT "v=DMARC1"'
        )
        problems.append(Problem("dmarc", name, what, fix_rua))
    return problems


# --- MTA-STS and TLS-RPT ------------------------------------------------------------------


async def check_mta_sts(ctx: DomainContext, lookup: Lookup, domain: str) -> list[Problem]:
    """Only when published: one v=STSv1 record with a valid id, and a policy host that resolves."""
    name = f"_mta-sts.{domain}"
    records = [t for t in await lookup.txt(name) if t.startswith("v=STSv1")]
    if not records:
        return []
    if len(records) > 1:
        what = f"{len(records)} MTA-STS records; senders then use no policy (RFC 8461 §3.1)"
        return [Problem("mta-sts", name, what, 'keep one "v=STSv1; id=..." record')]
    policy_id = _tags(records[0]).get("id", "")
    if not _STS_ID.match(policy_id):
        what = f'"{records[0]}" needs id= with 1 to 32 letters or digits (RFC 8461 §3.1)'
        fix = f'publish, with a new id whenever the policy changes: {name}. IN TXT "v=STSv1; id=1"'
        return [Problem("mta-sts", name, what, fix)]
    policy_host = f"mta-sts.{domain}"
    if not await lookup.addresses(policy_host):
        what = f"{policy_host} has no address, so senders cannot fetch the policy"
        fix = f"serve https://{policy_host}/.well-known/mta-sts.txt, or remove the {name} record"
        return [Problem("mta-sts", name, what, fix)]
    return []


async def check_tls_rpt(ctx: DomainContext, lookup: Lookup, domain: str) -> list[Problem]:
    """Only when published: one v=TLSRPTv1 record whose rua URIs are mailto: or https:."""
    name = f"_smtp._tls.{domain}"
    records = [t for t in await lookup.txt(name) if t.startswith("v=TLSRPTv1")]
    if not records:
        return []
    fix = f"publish: {name}. IN TXT {txt_rdata(tls_rpt_value(domain))}"
    if len(records) > 1:
        what = f"{len(records)} TLS-RPT records; senders then report nothing (RFC 8460 §3)"
        return [Problem("tls-rpt", name, what, f"remove all but one; {fix}")]
    uris = [u.strip() for u in _tags(records[0]).get("rua", "").split(",") if u.strip()]
    if not uris or any(not u.lower().startswith(("mailto:", "https:")) for u in uris):
        what = f'"{records[0]}" needs rua= with mailto: or https: addresses'
        return [Problem("tls-rpt", name, what, fix)]
    return []


DOMAIN_CHECKS = (check_mx, check_spf, check_dkim, check_dmarc, check_mta_sts, check_tls_rpt)
