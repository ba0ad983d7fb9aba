"""MTA-STS (RFC 8461): discovery, the HTTPS fetch, the on-disk cache, and what a policy asks.

Why each rule:
- The policy is only as good as the web PKI behind it, so the fetch verifies the policy
  host's certificate (system CAs or `--tls-ca-file`), follows no redirect (§3.3), reads at
  most 64 KiB and gives up after a time-out: a hostile or broken policy host must not stall
  the queue.
- Policies are cached on disk under the queue directory until `max_age` runs out (§5.1), so a
  restart does not forget them and an attacker who blocks the policy host later cannot make
  us forget them either. A new TXT `id` triggers a refetch; a failed refetch keeps the cached
  policy; no TXT record with a cached policy keeps it too.
- A domain without a valid policy is delivered as before (opportunistic): MTA-STS can only
  raise the bar, never refuse mail because the policy machinery failed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

from postier.delivery.fsutil import atomic_write
from postier.dns import SecureLookups
from postier.errors import DeliveryError
from postier.log import event
from postier.outbound.tls_policy import OPPORTUNISTIC, HostTls, Level, Source, TlsFailure

log = logging.getLogger("postier.outbound.mta_sts")

MAX_POLICY_BYTES = 64 * 1024  # RFC 8461 §3.3: senders may limit the size; 64 KiB is usual
MAX_AGE_LIMIT = 31_557_600  # §3.2: max_age is at most one year
WELL_KNOWN = "/.well-known/mta-sts.txt"
_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_DOMAIN = re.compile(r"[a-z0-9-]+(\.[a-z0-9-]+)+")
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


class PolicyError(ValueError):
    """A policy or TXT record that does not follow RFC 8461's grammar."""


class FetchError(Exception):
    """The policy could not be fetched (TLS, HTTP status, redirect, size, time-out)."""


@dataclass(frozen=True, slots=True)
class ReportPolicy:
    """What TLS-RPT needs to know about the policy an attempt was made under (RFC 8460 §4.3)."""

    domain: str
    policy_type: str  # "sts", "tlsa" or "no-policy-found"
    strings: tuple[str, ...] = ()  # the policy lines (sts) or TLSA records (tlsa)
    mx_patterns: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class StsPolicy:
    mode: str  # enforce, testing or none
    mx: tuple[str, ...]
    max_age: int
    policy_id: str = ""  # the TXT id this policy was fetched under
    fetched_at: float = 0.0
    text: str = ""

    def expired(self, now: float | None = None) -> bool:
        return (now if now is not None else time.time()) >= self.fetched_at + self.max_age

    def matches(self, host: str) -> bool:
        """§4.1: an exact name, or `*.example.com` standing for exactly one label."""
        name = host.lower().rstrip(".")
        for pattern in self.mx:
            if pattern.startswith("*."):
                first, _, rest = name.partition(".")
                if first and rest == pattern[2:]:
                    return True
            elif name == pattern:
                return True
        return False

    def report(self, domain: str) -> ReportPolicy:
        lines = tuple(line for line in self.text.replace("\r\n", "\n").split("\n") if line)
        return ReportPolicy(domain, "sts", lines, self.mx)

    def for_host(self, domain: str, host: str) -> HostTls:
        """Verify under `enforce` (TlsFailure for an MX the policy does not list); verify but
        deliver anyway under `testing`; `none` is no policy at all."""
        if self.mode == "none":
            return OPPORTUNISTIC
        enforce = self.mode == "enforce"
        report = self.report(domain)
        if not self.matches(host):
            failure = TlsFailure(
                "validation-failure",
                f"MX {host} is not allowed by the MTA-STS policy of {domain} "
                f"(mx: {', '.join(self.mx)})",
                source=Source.MTA_STS.value,
                host_tls=HostTls(Level.VERIFY, Source.MTA_STS, report=report),
            )
            if enforce:
                raise failure
            # testing: report this failure once, then try as usual without counting again
            return HostTls(Level.VERIFY, Source.MTA_STS, enforce=False, noted=failure)
        return HostTls(Level.VERIFY, Source.MTA_STS, enforce=enforce, report=report)


def _valid_pattern(pattern: str) -> bool:
    """`mx.example.com` or `*.example.com`: a wildcard only as the whole leftmost label."""
    name = pattern[2:] if pattern.startswith("*.") else pattern
    labels = name.split(".")
    return len(labels) >= 2 and all(_LABEL.fullmatch(label) for label in labels)


def parse_policy(text: str, policy_id: str = "", fetched_at: float = 0.0) -> StsPolicy:
    """Parse a policy body (§3.2). Lines may end in CRLF or LF; unknown keys are ignored;
    `version: STSv1`, a known `mode`, `max_age` and (unless mode is none) an `mx` are required.
    """
    values: dict[str, str] = {}
    mx: list[str] = []
    for raw in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        line = raw.strip()
        if not line:
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise PolicyError(f"line without 'key: value': {line[:60]!r}")
        key, value = key.strip().lower(), value.strip()
        if key == "mx":
            pattern = value.lower().rstrip(".")
            if not _valid_pattern(pattern):
                raise PolicyError(f"bad mx pattern {value[:60]!r}")
            mx.append(pattern)
        else:
            values.setdefault(key, value)
    if values.get("version") != "STSv1":
        raise PolicyError("missing or unknown version (expected 'version: STSv1')")
    mode = values.get("mode", "")
    if mode not in ("enforce", "testing", "none"):
        raise PolicyError(f"bad mode {mode[:20]!r}")
    age = values.get("max_age", "")
    if not age.isdigit() or len(age) > 10 or int(age) > MAX_AGE_LIMIT:
        raise PolicyError(f"bad max_age {age[:20]!r}")
    if mode != "none" and not mx:
        raise PolicyError("no mx pattern")
    return StsPolicy(mode, tuple(dict.fromkeys(mx)), int(age), policy_id, fetched_at, text)


def parse_txt(records: list[str]) -> str | None:
    """The policy id from the `_mta-sts` TXT records (§3.1), or None when there is no valid
    record: records not starting with `v=STSv1` are ignored; more than one left is none."""
    ours = [r for r in records if r.replace(" ", "").startswith("v=STSv1;") or r == "v=STSv1"]
    if len(ours) != 1:
        return None
    fields = {}
    for part in ours[0].split(";"):
        key, sep, value = part.strip().partition("=")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    policy_id = fields.get("id", "")
    return policy_id if _ID.fullmatch(policy_id) else None


def _fetch_blocking(
    name: str, address: str, port: int, context: ssl.SSLContext, timeout: float
) -> str:
    """GET the policy from `address` as `name` (SNI, certificate name and Host header)."""
    import http.client

    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((address, port), timeout=timeout)
    except OSError as exc:
        raise FetchError(f"connect to {name}[{address}]:{port}: {exc}") from None
    conn = http.client.HTTPConnection(name, port, timeout=timeout)
    try:
        try:
            conn.sock = context.wrap_socket(sock, server_hostname=name)
        except ssl.SSLCertVerificationError as exc:
            raise FetchError(f"certificate of {name}: {exc.verify_message}") from None
        conn.request("GET", WELL_KNOWN, headers={"Host": name, "Connection": "close"})
        resp = conn.getresponse()
        if resp.status != 200:  # redirects included: §3.3 forbids following them
            raise FetchError(f"https://{name}{WELL_KNOWN} answered {resp.status} {resp.reason}")
        length = resp.getheader("Content-Length")
        if length and length.isdigit() and int(length) > MAX_POLICY_BYTES:
            raise FetchError(f"policy of {length} bytes is larger than {MAX_POLICY_BYTES}")
        body = b""
        while len(body) <= MAX_POLICY_BYTES:
            if time.monotonic() > deadline:
                raise FetchError(f"policy fetch from {name} took longer than {timeout:g}s")
            chunk = resp.read(8192)
            if not chunk:
                break
            body += chunk
        if len(body) > MAX_POLICY_BYTES:
            raise FetchError(f"policy larger than {MAX_POLICY_BYTES} bytes")
        return body.decode("utf-8")
    except (OSError, http.client.HTTPException, UnicodeDecodeError) as exc:
        why = "timeout" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
        raise FetchError(f"policy fetch from {name}: {why}") from None
    finally:
        conn.close()


class MtaSts:
    """Finds the MTA-STS policy of a domain: TXT id, cache under `cache_dir`, HTTPS fetch.

    `policy(domain)` never raises: a domain without a usable policy gets None (opportunistic
    delivery), and every failure is logged (and reported to TLS-RPT through `reports`).
    """

    def __init__(
        self,
        lookups: SecureLookups,
        cache_dir: Path,
        *,
        context: ssl.SSLContext,
        port: int = 443,
        timeout: float = 30.0,
        reports: object = None,
    ) -> None:
        self.lookups = lookups
        self.cache_dir = Path(cache_dir)
        self.context = context
        self.port = port
        self.timeout = timeout
        self.reports = reports

    async def policy(self, domain: str) -> StsPolicy | None:
        domain = domain.lower().rstrip(".")
        if not _DOMAIN.fullmatch(domain):  # also keeps the cache file name a plain name
            return None
        cached = await asyncio.to_thread(self._load, domain)
        try:
            policy_id = parse_txt(await self.lookups.txt(f"_mta-sts.{domain}"))
        except DeliveryError as exc:  # DNS trouble: what we know still holds (§5.1)
            event(
                "mta-sts",
                logging.WARNING,
                log,
                domain=domain,
                result="txt-failed",
                reason=str(exc),
                cached=cached is not None,
            )
            return cached
        if policy_id is None or (cached is not None and cached.policy_id == policy_id):
            return cached
        try:
            policy = await self._fetch(domain, policy_id)
        except (FetchError, PolicyError, DeliveryError) as exc:
            result = (
                "sts-policy-invalid" if isinstance(exc, PolicyError) else "sts-policy-fetch-error"
            )
            event(
                "mta-sts",
                logging.WARNING,
                log,
                domain=domain,
                result=result,
                reason=str(exc),
                cached=cached is not None,
            )
            record = getattr(self.reports, "record_policy_failure", None)
            if record is not None:
                record(domain, result, str(exc))
            return cached
        await asyncio.to_thread(self._save, domain, policy)
        event(
            "mta-sts",
            logger=log,
            domain=domain,
            result="fetched",
            id=policy_id,
            mode=policy.mode,
            max_age=policy.max_age,
        )
        return policy

    async def _fetch(self, domain: str, policy_id: str) -> StsPolicy:
        name = f"mta-sts.{domain}"
        addresses = await self.lookups.resolver.addresses(name)
        last: Exception = FetchError(f"{name}: no address")
        for address in addresses:
            try:
                text = await asyncio.wait_for(
                    asyncio.to_thread(
                        _fetch_blocking, name, address, self.port, self.context, self.timeout
                    ),
                    self.timeout + 1.0,
                )
            except TimeoutError:
                last = FetchError(f"policy fetch from {name} timed out")
                continue
            except FetchError as exc:
                last = exc
                continue
            return parse_policy(text, policy_id, time.time())
        raise last

    # -- the cache: one JSON file per domain, replaced atomically --

    def _path(self, domain: str) -> Path:
        return self.cache_dir / f"{domain}.json"

    def _load(self, domain: str) -> StsPolicy | None:
        try:
            data = json.loads(self._path(domain).read_text("utf-8"))
            policy = parse_policy(data["policy"], str(data["id"]), float(data["fetched_at"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            event(
                "mta-sts",
                logging.WARNING,
                log,
                domain=domain,
                result="cache-unreadable",
                reason=str(exc),
            )
            return None
        return None if policy.expired() else policy

    def _save(self, domain: str, policy: StsPolicy) -> None:
        try:
            self.cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            data = {"id": policy.policy_id, "fetched_at": policy.fetched_at, "policy": policy.text}
            atomic_write(self._path(domain), json.dumps(data).encode(), 0o600)
        except OSError as exc:  # the policy still applies to this attempt
            event(
                "mta-sts",
                logging.WARNING,
                log,
                domain=domain,
                result="cache-write-failed",
                reason=str(exc),
            )
