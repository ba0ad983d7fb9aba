"""DKIM verification (RFC 6376, RFC 8463) with dkimpy, the body hashed while streaming.

The work is split in three so that neither the event loop nor memory pays for a big message:

1. `prepare` (thread pool): dkimpy parses the header section and each DKIM-Signature (at most
   `MAX_SIGNATURES`), validating its tags (syntax, x= expiry, t= in the future, i= vs d=).
2. `fetch_keys` (event loop): the key records, concurrently, through our cached resolver.
3. `finish` (thread pool): one streaming pass computes every body hash needed (bodyhash.py),
   then dkimpy checks each header signature (`verify_sig_process` with the body-hash step
   taken out, because we compared bh= ourselves against the streamed hash). The RSA
   arithmetic is OpenSSL's (`postier.dkim.openssl_rsa`), everything around it dkimpy's.

Verdicts (RFC 8601 §2.7.1): pass; fail (signature or body hash does not verify, key revoked);
permerror (malformed signature or key, no key, unacceptable algorithm or key size); temperror
(key look-up failed for now). Nothing here raises for bad input.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import dkim
from dkim.canonicalization import CanonicalizationPolicy
from dkim.util import parse_tag_value

from postier.dkim import openssl_rsa
from postier.dns import DnsTemporaryError, Resolver
from postier.mailauth.bodyhash import BodySpec, hash_bodies
from postier.mailauth.headers import HeaderSection

MAX_SIGNATURES = 5  # signatures verified per message; more are reported as not checked
MAX_SIGNED_FIELDS = 100  # entries in h=; a longer list is a signature bomb, not a signature
MAX_HEADER_FIELDS = 1000  # header fields; dkimpy's field selection costs h= x fields
MAX_KEY_RECORD = 4096  # octets of a key TXT record
MIN_RSA_BITS = 1024  # RFC 8301 §3.2: verifiers must accept 1024..4096 bits
HEADER_B_CHARS = 8  # header.b= prefix length (RFC 6008 §4: at least 8)

_ALGORITHMS = {b"rsa-sha256": "sha256", b"ed25519-sha256": "sha256"}
_dkimpy_log = logging.getLogger("postier.mailauth.dkimpy")


@dataclass(frozen=True, slots=True)
class DkimResult:
    """The verdict for one DKIM-Signature field."""

    result: str  # pass | fail | neutral | permerror | temperror
    domain: str = ""  # d=
    selector: str = ""  # s=
    signature: str = ""  # the start of b=, for header.b
    reason: str = ""


@dataclass(slots=True)
class _Candidate:
    """A signature that passed dkimpy's tag checks and waits for its key and body hash."""

    index: int
    sig: dict[bytes, bytes]
    include: list[bytes]
    header: tuple[bytes, bytes]
    domain: str
    selector: str
    signature: str
    body: BodySpec
    bh: bytes
    key: bytes | None = None  # the key record, once fetched
    error: DkimResult | None = None  # a verdict reached before the crypto


@dataclass(slots=True)
class Prepared:
    """What `prepare` found: verdicts already decided and candidates still to verify."""

    section: HeaderSection
    results: dict[int, DkimResult] = field(default_factory=dict)
    candidates: list[_Candidate] = field(default_factory=list)
    verifier: Any = None  # the dkim.DKIM holding the parsed header section


def _text(value: bytes) -> str:
    return value.decode("utf-8", "replace")


def _permerror(sig: dict[bytes, bytes] | None, reason: str) -> DkimResult:
    sig = sig or {}
    b = re.sub(rb"\s+", b"", sig.get(b"b", b""))[:HEADER_B_CHARS]
    return DkimResult(
        "permerror", _text(sig.get(b"d", b"")), _text(sig.get(b"s", b"")), _text(b), reason
    )


def _count_signatures(raw: bytes) -> int:
    return len(re.findall(rb"(?im)^dkim-signature[ \t]*:", raw))


def prepare(section: HeaderSection) -> Prepared:
    """Parse and validate every DKIM-Signature of the header section (blocking, cheap)."""
    out = Prepared(section)
    count = _count_signatures(section.raw)
    if not count:
        return out
    checked = min(count, MAX_SIGNATURES)
    if section.too_large:
        for i in range(checked):
            out.results[i] = _permerror(None, "header section too large")
        return out
    try:
        verifier = dkim.DKIM(section.raw + b"\r\n", logger=_dkimpy_log, minkey=MIN_RSA_BITS)
    except Exception as exc:  # dkimpy refuses lines that are no header field
        for i in range(checked):
            out.results[i] = _permerror(None, f"malformed header section: {exc}")
        return out
    out.verifier = verifier
    if len(verifier.headers) > MAX_HEADER_FIELDS:
        for i in range(checked):
            out.results[i] = _permerror(None, f"more than {MAX_HEADER_FIELDS} header fields")
        return out
    for i in range(checked):
        try:
            candidate = _candidate(verifier, i)
        except Exception as exc:  # dkimpy's MessageFormatError, ValidationError and the like
            sig = _tags(verifier, i)
            out.results[i] = _permerror(sig, f"bad signature: {exc}"[:200])
            continue
        if isinstance(candidate, DkimResult):
            out.results[i] = candidate
        else:
            out.candidates.append(candidate)
    return out


def _tags(verifier: Any, index: int) -> dict[bytes, bytes] | None:
    """The signature's tags when they parse at all (for d=, s= and b= in a permerror)."""
    fields_ = [v for n, v in verifier.headers if n.lower() == b"dkim-signature"]
    try:
        return parse_tag_value(fields_[index])
    except Exception:
        return None


def _candidate(verifier: Any, index: int) -> _Candidate | DkimResult:
    sig_tags = _tags(verifier, index)
    if sig_tags is not None:
        h = sig_tags.get(b"h", b"")
        if h.count(b":") >= MAX_SIGNED_FIELDS:  # checked before dkimpy splits a bomb
            return _permerror(sig_tags, f"more than {MAX_SIGNED_FIELDS} fields in h=")
    sig, include, sigheaders = verifier.verify_headerprep(index)
    if sig.get(b"a") not in _ALGORITHMS:
        return _permerror(sig, f"algorithm {_text(sig.get(b'a', b''))} not accepted")
    policy = CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple"))
    length = int(sig[b"l"]) if b"l" in sig else None
    bh = base64.b64decode(re.sub(rb"\s+", b"", sig[b"bh"]))
    d = _text(sig[b"d"]).lower().rstrip(".")
    s = _text(sig[b"s"])
    b = _text(re.sub(rb"\s+", b"", sig[b"b"])[:HEADER_B_CHARS])
    body = BodySpec(_text(policy.body_algorithm.name), _ALGORITHMS[sig[b"a"]], length)
    return _Candidate(index, sig, include, sigheaders[index], d, s, b, body, bh)


async def fetch_keys(resolver: Resolver, prepared: Prepared) -> None:
    """Look up each distinct key record once, concurrently; DNS failures become verdicts."""

    async def one(name: str) -> list[bytes] | Exception:
        try:
            return await resolver.txt(name)
        except (DnsTemporaryError, ValueError) as exc:
            return exc

    names = sorted({_key_name(c) for c in prepared.candidates})
    answers = dict(zip(names, await asyncio.gather(*(one(n) for n in names)), strict=True))
    for c in prepared.candidates:
        name = _key_name(c)
        records = answers[name]
        if isinstance(records, DnsTemporaryError):
            c.error = _verdict(c, "temperror", str(records))
        elif isinstance(records, Exception):
            c.error = _verdict(c, "permerror", f"bad key name {name!r}")
        elif not records:
            c.error = _verdict(c, "permerror", f"no key at {name}")
        else:
            c.key = records[0]  # several records: the first (RFC 6376 §3.6.2.2 leaves it open)


def _key_name(c: _Candidate) -> str:
    return f"{c.selector}._domainkey.{c.domain}"


def _verdict(c: _Candidate, result: str, reason: str = "") -> DkimResult:
    return DkimResult(result, c.domain, c.selector, c.signature, reason)


def finish(path: Path, prepared: Prepared) -> list[DkimResult]:
    """Hash the body (one streaming pass) and check each signature (blocking: thread pool)."""
    todo = [c for c in prepared.candidates if c.error is None]
    digests: dict[BodySpec, bytes] = {}
    if todo:
        with open(path, "rb") as f:
            f.seek(prepared.section.body_offset)
            digests = hash_bodies(f, (c.body for c in todo))
    results = dict(prepared.results)
    for c in prepared.candidates:
        if c.error is not None:
            results[c.index] = c.error
        elif digests[c.body] != c.bh:
            results[c.index] = _verdict(c, "fail", "body hash mismatch")
        else:
            results[c.index] = _check_signature(prepared.verifier, c)
    return [results[i] for i in sorted(results)]


@lru_cache(maxsize=256)
def _parse_key(record: bytes) -> tuple[Any, int, bytes, bool]:
    """A key record parsed once per sender key, not per message: dkimpy's ASN.1 is pure
    Python, and an RSA key becomes an OpenSSL key. The parse depends on the record's text
    alone, so the record is the whole cache key (one entry serves every selector that
    publishes the same key)."""
    pk, keysize, ktag, seqtlsrpt = dkim.evaluate_pk(b"key", record)
    if ktag == b"rsa" and pk is not None:
        pk = openssl_rsa.public_key(pk)
    return pk, keysize, ktag, seqtlsrpt


def _check_signature(verifier: Any, c: _Candidate) -> DkimResult:
    key = c.key or b""
    if len(key) > MAX_KEY_RECORD:
        return _verdict(c, "permerror", f"key record longer than {MAX_KEY_RECORD} octets")
    try:
        tags = parse_tag_value(key)
    except Exception:
        return _verdict(c, "permerror", "malformed key record")
    if tags.get(b"p", b"x").strip() == b"":
        return _verdict(c, "fail", "key revoked")
    try:
        pk, keysize, ktag, seqtlsrpt = _parse_key(key)
    except Exception as exc:
        return _verdict(c, "permerror", f"bad key: {exc}"[:200])
    if pk is None or ktag != c.sig[b"a"].split(b"-")[0]:
        return _verdict(c, "permerror", "key type does not match a=")
    verifier.pk, verifier.keysize, verifier.ktag, verifier.seqtlsrpt = pk, keysize, ktag, seqtlsrpt
    sig = {k: v for k, v in c.sig.items() if k != b"bh"}  # the body hash was checked already
    try:
        ok = verifier.verify_sig_process(sig, list(c.include), c.header, None)
    except Exception as exc:  # KeyFormatError (key too small), ValidationError (tlsrpt)...
        return _verdict(c, "permerror", f"{exc}"[:200])
    return _verdict(c, "pass") if ok else _verdict(c, "fail", "signature did not verify")
