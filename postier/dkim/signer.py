"""DKIM signing of queued mail (RFC 6376, RFC 8463), with dkimpy.

The signer works on postier's spool format (`postier.delivery.base`): LF line ends, the
`Return-Path:` line, our `Received:`, then the message. It returns the `DKIM-Signature:`
header fields (LF line ends) that go right after the Return-Path line, so the message on the
wire starts with them, above our Received:.

Which key: the domain of the `From:` header, when it is a local domain with keys. Exactly one
From field whose addresses all share that domain, or no signature: a message with two From
fields is one no receiver should trust, and signing it would vouch for it. Our own bounces and
delay warnings come from MAILER-DAEMON@<hostname>; they are signed with the keys of that name
or of its nearest parent domain that has keys, which DMARC's relaxed alignment accepts.

How: relaxed/relaxed, no `l=`, `t=` set, the headers RFC 6376 §5.4.1 recommends, and the ones
that must not be added later oversigned (listed once more in `h=` than they occur). Header
hashing, the signature and the folding of the field are dkimpy's (`DomainSigner.gen_header`,
called with the tags `DKIM.sign` would build); only the body hash is computed beside it,
streaming (`postier.dkim.bodyhash`), so a 35 MB message is read once and never held in
memory. RSA and Ed25519 share the sha256 body hash: dual signing reads the body once. The
RSA signature itself is OpenSSL's (`postier.dkim.openssl_rsa`: dkimpy's is pure Python).
"""

from __future__ import annotations

import email.utils
import io
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

import dkim
import idna
from cryptography.hazmat.primitives import serialization
from dkim.canonicalization import CanonicalizationPolicy

from postier import log
from postier.delivery.base import StoredMessage
from postier.delivery.fsutil import copy_from, write_all
from postier.dkim import openssl_rsa
from postier.dkim.bodyhash import hash_stream
from postier.dkim.keys import ED25519_SHA256, DkimKey, a_label, load_keys
from postier.errors import ConfigError

_LOG = logging.getLogger("postier.dkim")

# RFC 6376 §5.4.1's recommended set (dkimpy's DKIM.SHOULD): signed as often as they occur.
SIGNED = tuple(h.decode() for h in dkim.DKIM.SHOULD)
# Signed once more than they occur, so a copy added on the way breaks the signature.
OVERSIGNED = (
    "from",
    "subject",
    "date",
    "to",
    "cc",
    "message-id",
    "reply-to",
    "mime-version",
    "content-type",
)
MAX_HEADER_BYTES = 1024 * 1024  # a header section larger than this is not signed (logged)
_CANON = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")


class Unsignable(Exception):
    """The message cannot carry our signature; the reason is for the log line."""


@dataclass(frozen=True, slots=True)
class _Signing:
    """A key ready to sign: dkimpy's parsed private key, made once per (re)load."""

    key: DkimKey
    private: Any  # an OpenSSL RSA key (openssl_rsa signs with it), or a nacl SigningKey


def _prepare(key: DkimKey) -> _Signing:
    if key.algorithm != ED25519_SHA256:
        return _Signing(key, openssl_rsa.private_key(key.private_pem))
    try:
        import nacl.signing
    except ImportError:
        raise ConfigError(
            f"{key.path}: Ed25519 signing needs PyNaCl (pip install pynacl)"
        ) from None
    private = serialization.load_pem_private_key(key.private_pem, password=None)
    seed = private.private_bytes(  # type: ignore[union-attr]
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return _Signing(key, nacl.signing.SigningKey(seed))


def include_headers(names: list[bytes]) -> list[bytes]:
    """`h=`: the signed fields present, in message order, then each oversigned name once more."""
    present = [n.lower() for n in names if n.lower().decode("ascii", "replace") in SIGNED]
    return present + [n.encode() for n in OVERSIGNED]


def read_header_section(source: BinaryIO, limit: int = MAX_HEADER_BYTES) -> bytes:
    """The header fields up to (not including) the empty line; `source` is left at the body."""
    lines: list[bytes] = []
    size = 0
    while line := source.readline(limit + 1 - size):
        if line in (b"\n", b"\r\n"):
            break
        size += len(line)
        if size > limit:
            raise Unsignable(f"header section larger than {limit} bytes")
        lines.append(line)
    return b"".join(lines)


def from_domain(headers: list[list[bytes]]) -> str:
    """The one domain of the one `From:` field (A-label), or Unsignable saying why not."""
    values = [value for name, value in headers if name.lower() == b"from"]
    if len(values) != 1:
        raise Unsignable(f"{len(values)} From fields")
    text = values[0].decode("utf-8", "replace").replace("\r", "").replace("\n", "")
    domains = {addr.rpartition("@")[2] for _, addr in email.utils.getaddresses([text]) if addr}
    if len(domains) != 1 or "" in domains:
        raise Unsignable("From has no address or addresses of several domains")
    try:
        return a_label(domains.pop())
    except ValueError as exc:
        raise Unsignable(f"From domain: {exc}") from None


class DkimSigner:
    """The keys in force and the signing of one message. Thread-safe: sessions call `sign_*`
    from the thread pool while `reload()` (SIGHUP) swaps the keys in one assignment."""

    def __init__(
        self, directory: Path | None, is_local: Callable[[str], bool] = lambda domain: True
    ) -> None:
        self.directory = directory
        self.is_local = is_local
        self._keys: dict[str, list[_Signing]] = {}
        self._reload_lock = threading.Lock()
        self.reload()

    def reload(self) -> None:
        """Load the keys again. On a ConfigError the keys in force stay, and it propagates:
        at start-up that is exit 2; on SIGHUP the caller logs it and keeps signing."""
        with self._reload_lock:
            loaded = load_keys(self.directory) if self.directory is not None else {}
            prepared = {d: [_prepare(k) for k in keys] for d, keys in loaded.items()}
            self._keys = prepared
        for domain, keys in prepared.items():
            log.event(
                "dkim-keys",
                logger=_LOG,
                domain=domain,
                selectors=",".join(f"{s.key.selector}:{s.key.kind}" for s in keys),
            )

    def domains(self) -> list[str]:
        return sorted(self._keys)

    def keys_for(self, domain: str) -> list[DkimKey]:
        return [s.key for s in self._keys.get(domain, [])]

    def _is_local(self, domain: str) -> bool:
        """Local domains may be configured in either IDNA spelling; keys are by A-label."""
        if self.is_local(domain):
            return True
        if "xn--" not in domain:
            return False
        try:
            return self.is_local(idna.decode(domain))
        except idna.IDNAError:
            return False

    def _signing_keys(self, domain: str, own: bool) -> list[_Signing]:
        keys = self._keys  # one read: a concurrent reload never mixes two sets
        if not own:
            found = keys.get(domain, [])
            return found if found and self._is_local(domain) else []
        labels = domain.split(".")
        for i in range(len(labels) - 1):
            found = keys.get(".".join(labels[i:]))
            if found:
                return found
        return []

    def signature(self, source: BinaryIO, *, own: bool = False, queue_id: str = "") -> bytes:
        """The DKIM-Signature fields (LF ends) for the message read from `source`, which is
        positioned at the first header; b"" when no key applies. `own`: a message postier
        wrote itself (bounce, delay warning), which may use a parent domain's keys."""
        if not self._keys:
            return b""
        try:
            raw = read_header_section(source)
            try:
                headers, _ = dkim.rfc822_parse(raw)
            except (dkim.MessageFormatError, IndexError) as exc:  # IndexError: leading fold
                raise Unsignable(f"malformed header section: {exc}") from None
            domain = from_domain(headers)
            keys = self._signing_keys(domain, own)
            if not keys:
                log.event(
                    "dkim-unsigned",
                    logging.DEBUG,
                    _LOG,
                    qid=queue_id,
                    domain=domain,
                    reason="no key for the From domain",
                )
                return b""
        except Unsignable as exc:
            log.event("dkim-unsigned", logging.INFO, _LOG, qid=queue_id, reason=str(exc))
            return b""
        body_hash = hash_stream(source)
        names = include_headers([name for name, _ in headers])
        fields = []
        for signing in keys:
            try:
                fields.append(_sign_headers(signing, headers, names, body_hash))
            except Exception as exc:  # never fail the commit for it: the others still sign
                log.event(
                    "dkim-error",
                    logging.ERROR,
                    _LOG,
                    qid=queue_id,
                    key=str(signing.key.path),
                    error=str(exc),
                )
        if fields:
            log.event(
                "dkim-signed",
                logger=_LOG,
                qid=queue_id,
                d=keys[0].key.domain,
                s=",".join(s.key.selector for s in keys),
                signatures=len(fields),
            )
        return b"".join(fields)

    def signature_for_file(
        self, path: Path, content_offset: int, *, own: bool = False, queue_id: str = ""
    ) -> bytes:
        """`signature()` of a spool file (blocking: run it in the thread pool)."""
        if not self._keys:
            return b""
        with open(path, "rb") as source:
            source.seek(content_offset)
            return self.signature(source, own=own, queue_id=queue_id)

    def signed_copy(self, message: StoredMessage, directory: Path) -> StoredMessage | None:
        """A signed copy of a spool file, fsync'd in `directory`, or None when unsigned.

        Blocking (thread pool). The queue hard-links a spool file it is given, and the session
        still delivers the unsigned original to local recipients, so the signature cannot be
        written into that file: the copy costs one more pass over the message, made by the
        kernel (copy_from), never through Python memory. The caller removes the copy once it
        is committed; the queue's start-up clears `directory` after a crash.
        """
        fields = self.signature_for_file(
            message.path, message.content_offset, queue_id=message.queue_id
        )
        if not fields:
            return None
        path = directory / f"{message.queue_id}.dkim"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with open(message.path, "rb") as source:
                write_all(fd, os.pread(source.fileno(), message.content_offset, 0))
                write_all(fd, fields)
                copy_from(source, fd, message.content_offset)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        return replace(message, path=path, size=os.stat(path).st_size)

    def sign_bytes(
        self, data: bytes, content_offset: int, *, own: bool = False, queue_id: str = ""
    ) -> bytes:
        """A whole spool-format message, with our signatures inserted after Return-Path."""
        source = io.BytesIO(data)
        source.seek(content_offset)
        fields = self.signature(source, own=own, queue_id=queue_id)
        if not fields:
            return data
        return data[:content_offset] + fields + data[content_offset:]


def _sign_headers(
    signing: _Signing, headers: list[list[bytes]], names: list[bytes], body_hash: bytes
) -> bytes:
    """One DKIM-Signature field: the tags DKIM.sign builds (without l=), signed by dkimpy."""
    key = signing.key
    algorithm = key.algorithm.encode()
    domain = key.domain.encode()
    signer = dkim.DKIM(signature_algorithm=algorithm, linesep=b"\n", logger=_LOG)
    signer.headers = headers
    signer.hasher = dkim.HASH_ALGORITHMS[algorithm]
    tags = [
        (b"v", b"1"),
        (b"a", algorithm),
        (b"c", _CANON.to_c_value()),
        (b"d", domain),
        (b"i", b"@" + domain),
        (b"q", b"dns/txt"),
        (b"s", key.selector.encode()),
        (b"t", str(int(time.time())).encode()),
        (b"h", b" : ".join(names)),
        (b"bh", body_hash),
        (b"b", b"0" * 60),  # dkimpy's placeholder: b= folds onto a line of its own
    ]
    value = signer.gen_header(tags, tuple(names), _CANON, b"DKIM-Signature", signing.private)
    return b"DKIM-Signature: " + value
