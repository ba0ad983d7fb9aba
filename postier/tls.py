"""TLS contexts for postier: the server's certificates (with SNI and live reload) and the client's.

Why a store rather than one context: certificates are replaced under a running daemon (certbot
renews in place), and one server may answer for several domains. `CertificateStore.context()`
hands out the *current* server context; each new connection asks for it, so a reload only
affects connections that start afterwards, and a connection already in TLS keeps the context
(and certificate) it began with. A failed reload never takes the server down: it keeps the
certificates it has and logs what is wrong with the new ones.
"""

from __future__ import annotations

import _ssl
import asyncio
import contextlib
import datetime as dt
import functools
import logging
import os
import ssl
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from postier.errors import ConfigError

__all__ = [
    "INTERMEDIATE_CIPHERS",
    "CertificateStore",
    "client_context",
    "describe",
    "front_tls_context",
    "peer_chain",
    "sends_tickets",
]

log = logging.getLogger("postier.tls")

StrPath = str | os.PathLike[str]

#: Mozilla "intermediate" (v5.7) for TLS 1.2: forward secrecy and AEAD only. TLS 1.3 suites are
#: configured separately by OpenSSL and its defaults are already the right ones.
INTERMEDIATE_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-CHACHA20-POLY1305",
    ]
)

# RFC 7919 ffdhe2048, the group Mozilla recommends. Without DH parameters OpenSSL silently never
# picks the DHE suites above, which would leave RSA-certificate peers without ECDHE stranded.
_FFDHE2048 = """\
-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""

#: certbot's layout inside a certificate directory: <dir>/<name>/{fullchain,privkey}.pem
CHAIN_NAME = "fullchain.pem"
KEY_NAME = "privkey.pem"

_EXPIRY_WARNING = dt.timedelta(days=14)


# --- loading one certificate/key pair ---------------------------------------------------------


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the TLS {what}: {exc.strerror or exc}") from exc


def _names(cert: x509.Certificate) -> list[str]:
    """The DNS names a certificate answers for: its SAN dNSNames, else (old certs) its CN."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return [n.rstrip(".").lower() for n in names if n]


def _check_pair(cert_file: Path, key_file: Path) -> tuple[list[str], dt.datetime]:
    """Validate a chain and key with messages a person can act on (OpenSSL's are cryptic).

    Returns the leaf's names and expiry. An expired certificate is only warned about: for
    opportunistic SMTP an old certificate is still far better than refusing STARTTLS.
    """
    cert_pem, key_pem = _read(cert_file, "certificate"), _read(key_file, "key")
    if b"PRIVATE KEY-----" in cert_pem and b"CERTIFICATE-----" in key_pem:
        raise ConfigError(
            f"{cert_file}: holds a private key and {key_file} a certificate; "
            "the certificate and key files are swapped"
        )
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as exc:
        raise ConfigError(
            f"{cert_file}: no valid PEM certificate (expected "
            "'-----BEGIN CERTIFICATE-----' blocks, leaf first)"
        ) from exc
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError as exc:
        raise ConfigError(
            f"{key_file}: the private key is protected by a passphrase; "
            "postier needs an unencrypted key (readable by it alone)"
        ) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(
            f"{key_file}: no valid PEM private key (expected a "
            "'-----BEGIN ... PRIVATE KEY-----' block)"
        ) from exc
    pem = serialization.Encoding.PEM
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(pem, spki) != chain[0].public_key().public_bytes(pem, spki):
        raise ConfigError(
            f"{key_file}: this private key does not belong to the first certificate in {cert_file}"
        )
    leaf = chain[0]
    not_after = leaf.not_valid_after_utc
    left = not_after - dt.datetime.now(dt.UTC)
    if left < _EXPIRY_WARNING:
        state = "EXPIRED" if left.total_seconds() < 0 else "expires soon"
        log.warning("%s: certificate %s on %s", cert_file, state, not_after.date().isoformat())
    return _names(leaf), not_after


def _server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A server context with postier's settings and one certificate chain loaded."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(INTERMEDIATE_CIPHERS)
    # Server preference so a weak client choice never wins over a strong suite we both have.
    # No compression (CRIME). No renegotiation: a client-triggered CPU sink we never need.
    # Session tickets are decided by the front context each connection starts with (see
    # front_tls_context): off on mx, on for submission and submissions.
    ctx.options |= (
        ssl.OP_CIPHER_SERVER_PREFERENCE
        | ssl.OP_NO_COMPRESSION
        | ssl.OP_NO_RENEGOTIATION
        | ssl.OP_SINGLE_DH_USE
        | ssl.OP_SINGLE_ECDH_USE
    )
    ctx.verify_mode = ssl.CERT_NONE  # never ask SMTP clients for a certificate
    with tempfile.NamedTemporaryFile("w", suffix=".pem") as dh:  # the API only takes a path
        dh.write(_FFDHE2048)
        dh.flush()
        ctx.load_dh_params(dh.name)
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:  # a race with a renewal, or what cryptography missed
        raise ConfigError(f"{cert_file}, {key_file}: OpenSSL refused the pair: {exc}") from exc
    return ctx


# --- the store -------------------------------------------------------------------------------

_Stamp = tuple[int, int, int, int] | None
Fingerprint = tuple[tuple[str, _Stamp], ...]


def _stamp(path: Path) -> _Stamp:
    """Identity of the file a path resolves to now: stat follows certbot's symlinks."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _lookup(
    exact: dict[str, ssl.SSLContext], wildcard: dict[str, ssl.SSLContext], server_name: str
) -> ssl.SSLContext | None:
    """The context for an SNI name: exact match first, then a one-label wildcard (RFC 6125)."""
    name = server_name.rstrip(".").lower()
    found = exact.get(name)
    if found is None and "." in name:
        found = wildcard.get(name.split(".", 1)[1])
    return found


@dataclass(frozen=True)
class _Snapshot:
    """Everything one load produced; replaced as a whole so readers never see half a reload."""

    default: ssl.SSLContext
    exact: dict[str, ssl.SSLContext]
    wildcard: dict[str, ssl.SSLContext]  # "example.org" -> context of "*.example.org"
    summary: str


def _sni_callback(
    exact: dict[str, ssl.SSLContext],
    wildcard: dict[str, ssl.SSLContext],
) -> Callable[[ssl.SSLObject, str | None, ssl.SSLContext], None]:
    """Bind the callback to one load's maps, so a handshake is consistent across a reload.

    It holds the maps, not the snapshot: no reference cycle through the default context, so
    an old generation is freed as soon as its last connection ends.
    """

    def callback(ssl_object: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        # An exception here would abort the handshake; a wrong name must get the default cert.
        try:
            if server_name:
                chosen = _lookup(exact, wildcard, server_name)
                if chosen is not None:
                    ssl_object.context = chosen
        except Exception:
            log.exception("SNI selection failed for %r; using the default certificate", server_name)

    return callback


class CertificateStore:
    """The server's certificates: a default pair and, optionally, a certbot-style directory.

    Construction loads everything and raises `ConfigError` on any problem (start-up must fail
    loudly); `reload()` afterwards never raises. Thread-safe: the daemon may reload from a
    signal handler on the loop and from `watch()` at the same time.
    """

    def __init__(
        self, cert_file: StrPath, key_file: StrPath, cert_dir: StrPath | None = None
    ) -> None:
        self.cert_file = Path(cert_file)
        self.key_file = Path(key_file)
        self.cert_dir = Path(cert_dir) if cert_dir is not None else None
        self._lock = threading.Lock()
        #: Counts successful loads; lets tests and status output see that a reload happened.
        self.generation = 0
        self._seen = self._fingerprint()
        self._snapshot = self._load()
        self.generation = 1
        log.info("TLS certificates loaded: %s", self._snapshot.summary)

    def context(self) -> ssl.SSLContext:
        """The server context for a connection starting now (call it once per connection)."""
        return self._snapshot.default

    @property
    def summary(self) -> str:
        """One line on what is loaded (for check-config and status output)."""
        return self._snapshot.summary

    def reload(self) -> bool:
        """Re-read every file; swap in the result, or keep the old one and log why not."""
        with self._lock:
            self._seen = self._fingerprint()  # before reading: a later change triggers again
            try:
                snapshot = self._load()
            except ConfigError as exc:
                log.error("TLS reload failed, keeping the current certificates: %s", exc)
                return False
            except Exception as exc:  # never crash a running server over a certificate
                log.exception("TLS reload failed, keeping the current certificates: %s", exc)
                return False
            self._snapshot = snapshot  # one reference assignment: atomic for readers
            self.generation += 1
        log.info("TLS certificates reloaded: %s", snapshot.summary)
        return True

    async def watch(self, interval: float = 60.0) -> None:
        """Run forever (as a task): reload when a certificate or key file changes.

        Changes are seen through stat (device, inode, size, mtime) of the symlink targets, so
        both in-place rewrites and certbot's symlink flips count, as do new or removed domain
        directories. A change that leaves files broken is reported once, not every interval.
        """
        while True:
            await asyncio.sleep(interval)
            await asyncio.to_thread(self.reload_if_changed)

    def reload_if_changed(self) -> bool:
        """Reload when a file changed since the last load; whether it reloaded and succeeded.

        A worker runs this before it serves: one respawned after a crash is a fork of the
        supervisor, whose certificates are those of the start-up."""
        if self._fingerprint() == self._seen:
            return False
        log.debug("certificate files changed; reloading")
        return self.reload()

    # -- internals --

    def _pairs(self) -> list[tuple[str, Path, Path]]:
        """(label, chain, key) for each domain directory, in name order."""
        if self.cert_dir is None:
            return []
        try:
            entries = sorted(p for p in self.cert_dir.iterdir() if p.is_dir())
        except OSError as exc:
            raise ConfigError(
                f"{self.cert_dir}: cannot list the certificate directory: {exc.strerror or exc}"
            ) from exc
        pairs = []
        for entry in entries:
            chain, key = entry / CHAIN_NAME, entry / KEY_NAME
            if chain.exists() and key.exists():
                pairs.append((entry.name.lower(), chain, key))
            else:
                log.warning("%s: skipped, it needs both %s and %s", entry, CHAIN_NAME, KEY_NAME)
        return pairs

    def _fingerprint(self) -> Fingerprint:
        paths = [self.cert_file, self.key_file]
        if self.cert_dir is not None:
            with contextlib.suppress(OSError):
                for entry in sorted(self.cert_dir.iterdir()):
                    paths += [entry / CHAIN_NAME, entry / KEY_NAME]
        return tuple((str(p), _stamp(p)) for p in paths)

    def _load(self) -> _Snapshot:
        names, _ = _check_pair(self.cert_file, self.key_file)
        default = _server_context(self.cert_file, self.key_file)
        loaded = []
        for label, chain, key in self._pairs():
            cert_names, not_after = _check_pair(chain, key)
            loaded.append((not_after, label, cert_names, _server_context(chain, key)))
        # Several certificates may claim a name (certbot keeps "example.org-0001" beside
        # "example.org"): the one valid longest wins. The certificate's own names beat
        # directory labels, which only serve certificates that list no usable name.
        loaded.sort(key=lambda item: item[0], reverse=True)
        exact: dict[str, ssl.SSLContext] = {}
        wildcard: dict[str, ssl.SSLContext] = {}
        for _, _, cert_names, ctx in loaded:
            for name in cert_names:
                if name.startswith("*."):
                    wildcard.setdefault(name[2:], ctx)
                elif "*" not in name:
                    exact.setdefault(name, ctx)
        for _, label, _, ctx in loaded:
            exact.setdefault(label, ctx)
        shown = ", ".join(names[:3]) or "(no names)"
        summary = f"default {self.cert_file} for {shown}"
        if self.cert_dir is not None:
            summary += (
                f"; {len(loaded)} certificate(s) in {self.cert_dir} for "
                f"{len(exact) + len(wildcard)} SNI name(s)"
            )
        default.sni_callback = _sni_callback(exact, wildcard)
        return _Snapshot(default, exact, wildcard, summary)


# --- outbound and reporting ------------------------------------------------------------------


def client_context(*, verify: bool, ca_file: StrPath | None = None) -> ssl.SSLContext:
    """A context for outbound SMTP.

    verify=False is opportunistic TLS (RFC 7435) toward MX hosts: encrypt, check nothing, since
    most MX certificates would fail a check and refusing would only push mail to plaintext.
    verify=True is for a configured smarthost: chain against `ca_file` (or the system's CAs)
    and the host name, which the caller passes as `server_hostname`. `ca_file` is ignored
    when verify is False. Both refuse anything below TLS 1.2.
    """
    if verify:
        try:
            ctx = ssl.create_default_context(cafile=os.fspath(ca_file) if ca_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"{ca_file}: cannot load CA certificates: {getattr(exc, 'strerror', None) or exc}"
            ) from exc
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return ctx


def describe(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> str:
    """The TLS part of a Received header, e.g. `version=TLSv1.3 cipher=TLS_AES_256_GCM_SHA384
    bits=256`; empty before the handshake has completed."""
    cipher = ssl_object.cipher()
    version = ssl_object.version()
    if cipher is None or version is None:
        return ""
    name, _protocol, bits = cipher
    return f"version={version} cipher={name} bits={bits}"


def sends_tickets(role: str) -> bool:
    """Whether a listener role sends TLS session tickets.

    Not on mx: Outlook.com's senders abort STARTTLS with servers that send TLS 1.3 tickets
    (chasquid#64, mox#237, golang/go#70232; Postfix users saw the same), MTAs rarely resume,
    and a ticket key that lives as long as the process weakens forward secrecy. Yes on
    submission and submissions, where our own users' clients reconnect and resume.
    """
    return role != "mx"


def front_tls_context(store: CertificateStore, *, tickets: bool = True) -> ssl.SSLContext:
    """The front context for `store`, with or without session tickets (see _front_context).

    One cache key per (store, tickets) however the caller spells the call: a second context
    made after the fork would hold ticket keys of its own and break resumption.
    """
    return _front_context(store, tickets)


@functools.cache
def _front_context(store: CertificateStore, tickets: bool) -> ssl.SSLContext:
    """The context every TLS connection starts with (STARTTLS and implicit TLS alike).

    It carries the protocol floor and cipher policy, and, as the session context, the
    session-ticket keys. At each ClientHello (OpenSSL calls the SNI callback with or without
    SNI) it switches the connection to the store's current context, whose own SNI callback
    then picks among its certificates: a reload changes the certificates of new connections
    and never the ticket keys. One per store and process, made before the workers fork
    (daemon.build_context), so that every worker can resume every client's session.
    """
    front = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    front.minimum_version = ssl.TLSVersion.TLSv1_2
    front.set_ciphers(INTERMEDIATE_CIPHERS)
    front.options |= (
        ssl.OP_CIPHER_SERVER_PREFERENCE
        | ssl.OP_NO_COMPRESSION
        | ssl.OP_NO_RENEGOTIATION
        | ssl.OP_SINGLE_DH_USE
        | ssl.OP_SINGLE_ECDH_USE
    )

    def select(ssl_object: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        current = store.context()
        ssl_object.context = current
        if current.sni_callback is not None:
            current.sni_callback(ssl_object, server_name, current)  # type: ignore[arg-type]

    if not tickets:  # see sends_tickets: no TLS 1.3 NewSessionTicket, no TLS 1.2 ticket
        front.options |= ssl.OP_NO_TICKET
        front.num_tickets = 0
    front.sni_callback = select  # type: ignore[assignment]
    return front


def peer_chain(stream: object) -> list[bytes]:
    """The certificates the peer sent (DER, leaf first), unverified, for DANE matching.

    The public `get_unverified_chain()` arrived in Python 3.13; since 3.10 the C object has
    offered it privately. Without either, only the leaf is known (enough for DANE-EE).
    """
    ssl_object = stream.writer.get_extra_info("ssl_object")  # type: ignore[attr-defined]
    if ssl_object is None:
        return []
    for owner in (ssl_object, getattr(ssl_object, "_sslobj", None)):
        getter = getattr(owner, "get_unverified_chain", None)
        if getter is not None:
            chain = getter() or []
            return [c if isinstance(c, bytes) else c.public_bytes(_ssl.ENCODING_DER) for c in chain]
    leaf = ssl_object.getpeercert(binary_form=True)
    return [leaf] if leaf else []
