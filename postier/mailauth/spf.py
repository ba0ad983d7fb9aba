"""SPF (RFC 7208) with pyspf, its DNS answered by our resolver.

Why pyspf and a bridge: evaluation (macros, include/redirect, the 10-term and 2-void limits,
exp=) is pyspf's, never ours. pyspf is synchronous and asks DNS through one module-level
function, `spf.DNSLookup`; we install a dispatcher there once. In a thread that evaluates for
us, it sends each look-up to the event loop, where our cached `Resolver` answers it; in any
other thread it calls pyspf's original function, so other users of pyspf are unaffected.
`pyspf_dns()` is that per-thread binding, for any caller (doctor uses it too).

The whole evaluation runs in the thread pool, never in the event loop, and is bounded by
RFC 7208 §4.6.4: at most `SPF_TIME_LIMIT` seconds of DNS in total, then `temperror`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import spf

from postier.dns import DnsTemporaryError, Resolver, to_ascii_domain
from postier.log import event

log = logging.getLogger("postier.mailauth")

SPF_TIME_LIMIT = 20.0  # seconds of DNS per evaluation (RFC 7208 §4.6.4 "at least 20 seconds")
MAX_TXT_RECORD = 4096  # octets; a longer TXT record is refused (permerror), not parsed

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")


@dataclass(frozen=True, slots=True)
class SpfResult:
    """The SPF verdict for one identity.

    `identity` is "mailfrom" or "helo" (the HELO name is checked when MAIL FROM is <>);
    `domain` is the domain that was checked, the one DMARC aligns against.
    """

    result: str
    identity: str
    domain: str
    sender: str  # the checked address (MAIL FROM) or the HELO name
    reason: str = ""


# -- the DNS bridge ---------------------------------------------------------------------------

_bound = threading.local()
_original_lookup = spf.DNSLookup


def _dispatch(name: str, qtype: str, strict: Any = True, timeout: float = 20) -> list:
    lookup: Callable[[str, str, float], list] | None = getattr(_bound, "lookup", None)
    if lookup is None:
        return _original_lookup(name, qtype, strict, timeout)
    return lookup(name, qtype, timeout)


spf.DNSLookup = _dispatch


@contextlib.contextmanager
def pyspf_dns(lookup: Callable[[str, str, float], list]) -> Iterator[None]:
    """pyspf evaluations in this thread ask DNS through `lookup` while inside the block.

    `lookup(name, qtype, timeout)` answers in pyspf's format (a list of ((name, qtype),
    value)) and raises spf.TempError for a temporary failure. Per thread, so evaluations in
    other threads (the mx check, doctor) never see each other's resolver and need no lock.
    """
    previous = getattr(_bound, "lookup", None)
    _bound.lookup = lookup
    try:
        yield
    finally:
        _bound.lookup = previous


def _bridge(
    resolver: Resolver, loop: asyncio.AbstractEventLoop
) -> Callable[[str, str, float], list]:
    """A pyspf look-up function that asks `resolver` on `loop` and waits in this thread."""

    def lookup(name: str, qtype: str, timeout: float) -> list:
        # pyspf passes what is left of its overall budget; one look-up also gets no more
        # than the resolver's own timeout, so a silent server costs that, not 20 seconds.
        timeout = max(0.1, min(float(timeout), SPF_TIME_LIMIT, resolver.timeout))
        records = resolver.cached(name, qtype)  # a repeat sender: no trip to the loop
        if records is None:
            future = asyncio.run_coroutine_threadsafe(
                resolver.lookup(name, qtype, lifetime=timeout), loop
            )
            try:
                records = future.result(timeout + 1.0)
            except ValueError:  # not a DNS name: nothing can be there
                return []
            except DnsTemporaryError as exc:
                raise spf.TempError(f"DNS {exc}") from None
            except concurrent.futures.TimeoutError:
                future.cancel()
                raise spf.TempError(f"DNS {name} {qtype}: timeout") from None
        key = (name.lower().rstrip("."), qtype)
        out: list = []
        for r in records:
            if qtype in ("A", "AAAA"):
                out.append((key, r.address))
            elif qtype == "MX":
                out.append((key, (r.preference, r.exchange.to_text(omit_final_dot=True))))
            elif qtype == "PTR":
                out.append((key, r.target.to_text(omit_final_dot=True)))
            elif qtype in ("TXT", "SPF"):
                if sum(len(s) for s in r.strings) > MAX_TXT_RECORD:
                    raise spf.PermError(f"TXT record at {name} longer than {MAX_TXT_RECORD} octets")
                out.append((key, tuple(r.strings)))
        return out

    return lookup


# -- evaluation ---------------------------------------------------------------------------------


def _identity(mail_from: str, helo: str) -> tuple[str, str, str]:
    """(identity, domain, sender as given to pyspf); domain '' when there is nothing to check."""
    if mail_from:
        local, _, domain = mail_from.rpartition("@")
        try:
            domain = to_ascii_domain(domain)
        except ValueError:
            return "mailfrom", "", mail_from
        return "mailfrom", domain, f"{local}@{domain}" if local else domain
    name = helo.strip()
    if not name or name.startswith("[") or _is_ip(name):
        return "helo", "", name
    try:
        return "helo", to_ascii_domain(name), ""
    except ValueError:
        return "helo", "", name


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _evaluate(
    lookup: Callable[[str, str, float], list], ip: str, sender: str, helo: str
) -> tuple[str, str]:
    """Run pyspf in this (pool) thread with `lookup` as its DNS; return (result, reason)."""
    try:
        with pyspf_dns(lookup):
            query = spf.query(ip, sender, helo, timeout=SPF_TIME_LIMIT, querytime=SPF_TIME_LIMIT)
            result, _code, explanation = query.check()
    except (spf.TempError, spf.PermError) as exc:  # raised before check() catches them
        return ("temperror" if isinstance(exc, spf.TempError) else "permerror"), str(exc)
    except Exception as exc:  # pyspf on input it did not expect: a verdict, not a crash
        return "permerror", f"evaluation failed: {type(exc).__name__}: {exc}"
    if result not in RESULTS:
        return "permerror", f"unexpected result {result!r}"
    return result, explanation


async def check_spf(
    resolver: Resolver,
    ip: str,
    mail_from: str,
    helo: str,
    *,
    executor: Executor | None = None,
) -> SpfResult:
    """SPF for MAIL FROM (`mail_from` without brackets; "" for <>, then the HELO name).

    Never raises for bad input or DNS trouble: those are `permerror` and `temperror`.
    """
    identity, domain, sender = _identity(mail_from, helo)
    shown = mail_from if identity == "mailfrom" else helo
    if not domain:
        return SpfResult("none", identity, domain, shown, "no domain to check")
    helo_name = helo.strip() if identity == "mailfrom" else domain
    loop = asyncio.get_running_loop()
    result, reason = await loop.run_in_executor(
        executor, _evaluate, _bridge(resolver, loop), ip, sender, helo_name
    )
    event("spf", logging.DEBUG, log, ip=ip, identity=identity, domain=domain, result=result)
    return SpfResult(result, identity, domain, shown, reason)
