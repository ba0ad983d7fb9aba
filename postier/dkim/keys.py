"""DKIM private keys on disk: `DIR/<domain>/<selector>.pem`, PKCS#8 PEM, RSA >= 2048 or Ed25519.

The layout is the configuration: a key is in force because its file is there, so adding a
domain or rotating a key is a file operation and a reload, never an edit of a list. Every
problem is a ConfigError naming the file, because the operator meets it at start-up (exit 2)
or on SIGHUP, and a key we cannot use must never be skipped silently: mail from that domain
would leave unsigned and land in spam.
"""

from __future__ import annotations

import base64
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import idna
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from postier.errors import ConfigError

RSA_SHA256 = "rsa-sha256"
ED25519_SHA256 = "ed25519-sha256"
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192  # beyond this the TXT record is unwieldy and signing is slow for nothing
KEY_SUFFIX = ".pem"
KINDS = ("rsa", "ed25519")

# RFC 6376 §3.1: a selector is a sub-domain, dot-separated labels of letters, digits, hyphens.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_SELECTOR = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


@dataclass(frozen=True, slots=True)
class DkimKey:
    """One signing key: where it lives, what it signs for, and its PEM bytes."""

    domain: str  # A-label, lower case
    selector: str
    algorithm: str  # "rsa-sha256" | "ed25519-sha256"
    path: Path
    private_pem: bytes

    @property
    def kind(self) -> str:
        """The `k=` tag of the DNS record: "rsa" or "ed25519"."""
        return "ed25519" if self.algorithm == ED25519_SHA256 else "rsa"

    def public_key_b64(self) -> str:
        """The `p=` value: SubjectPublicKeyInfo DER for RSA (RFC 6376), the raw 32 bytes for
        Ed25519 (RFC 8463 §4.2), base64 without line breaks."""
        public = _load_private(self.private_pem, self.path).public_key()
        if isinstance(public, ed25519.Ed25519PublicKey):
            raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        else:
            raw = public.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        return base64.b64encode(raw).decode("ascii")

    def dns_value(self) -> str:
        """The whole TXT value to publish at `<selector>._domainkey.<domain>`."""
        return f"v=DKIM1; k={self.kind}; p={self.public_key_b64()}"

    def dns_name(self) -> str:
        """The owner name of the TXT record, without the trailing dot."""
        return f"{self.selector}._domainkey.{self.domain}"


def a_label(domain: str) -> str:
    """The DNS spelling of a domain (IDNA A-label, lower case), or ValueError."""
    name = domain.strip().rstrip(".").lower()
    if not name:
        raise ValueError("empty domain name")
    try:
        return idna.encode(name, uts46=True).decode("ascii").lower()
    except idna.IDNAError as exc:
        raise ValueError(f"{domain!r} is not a domain name: {exc}") from None


def check_selector(selector: str) -> str:
    """The selector if it is a valid DNS sub-domain (RFC 6376 §3.1), else ValueError."""
    if len(selector) > 63 * 4 or not _SELECTOR.fullmatch(selector):
        raise ValueError(f"{selector!r} is not a valid selector (letters, digits, '-', '.')")
    return selector


def _load_private(pem: bytes, path: Path) -> ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey:
    """Parse and vet one PEM key; the reasons we refuse are the ones an operator can fix."""
    if b"-----BEGIN PRIVATE KEY-----" not in pem:
        raise ConfigError(
            f"{path}: not an unencrypted PKCS#8 PEM key (BEGIN PRIVATE KEY); convert it with "
            f"'openssl pkcs8 -topk8 -nocrypt -in OLD -out {path.name}'"
        )
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: cannot read the private key: {exc}") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise ConfigError(
                f"{path}: RSA key of {key.key_size} bits; DKIM keys need at least {MIN_RSA_BITS}"
            )
        if key.key_size > MAX_RSA_BITS:
            raise ConfigError(f"{path}: RSA key of {key.key_size} bits; at most {MAX_RSA_BITS}")
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    raise ConfigError(f"{path}: unsupported key type; DKIM keys are RSA (>= 2048) or Ed25519")


def _check_mode(path: Path) -> None:
    """Refuse a key that group or others may read: the key is the domain's signature."""
    mode = path.stat().st_mode
    if mode & 0o077:
        raise ConfigError(
            f"{path}: mode {stat.S_IMODE(mode):04o} lets group or others access the DKIM key; "
            f"run 'chmod 600 {path}'"
        )


def read_key(path: Path, domain: str) -> DkimKey:
    """Load one key file, checked: mode, selector spelling, PKCS#8, type and size."""
    selector = path.name[: -len(KEY_SUFFIX)]
    try:
        check_selector(selector)
    except ValueError as exc:
        raise ConfigError(f"{path}: file name gives selector {exc}") from None
    try:
        _check_mode(path)
        pem = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    key = _load_private(pem, path)
    algorithm = ED25519_SHA256 if isinstance(key, ed25519.Ed25519PrivateKey) else RSA_SHA256
    return DkimKey(domain, selector, algorithm, path, pem)


def load_keys(directory: Path) -> dict[str, list[DkimKey]]:
    """All keys under `directory`, by domain (A-label); ConfigError naming the file on any problem.

    Files not ending in `.pem` and names starting with a dot are ignored, so the `.txt` files
    other tools leave beside a key do no harm. Keys of a domain are ordered by selector, which
    makes the order of the signatures stable from one start to the next.
    """
    try:
        entries = sorted(directory.iterdir())
    except FileNotFoundError:
        raise ConfigError(f"dkim_keys: {directory}: no such directory") from None
    except OSError as exc:
        raise ConfigError(f"dkim_keys: {directory}: cannot read: {exc.strerror}") from None
    keys: dict[str, list[DkimKey]] = {}
    for entry in entries:
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        try:
            domain = a_label(entry.name)
        except ValueError as exc:
            raise ConfigError(f"{entry}: directory name: {exc}") from None
        if domain in keys:
            raise ConfigError(f"{entry}: a second directory for domain {domain}")
        found = _read_domain_dir(entry, domain)
        if found:
            keys[domain] = found
    return keys


def _read_domain_dir(entry: Path, domain: str) -> list[DkimKey]:
    try:
        paths = sorted(entry.iterdir())
    except OSError as exc:
        raise ConfigError(f"{entry}: cannot read: {exc.strerror}") from None
    return [
        read_key(path, domain)
        for path in paths
        if path.name.endswith(KEY_SUFFIX) and not path.name.startswith(".") and path.is_file()
    ]


def keys_of(directory: Path, domain: str) -> list[DkimKey]:
    """The keys of one domain (directory spelled as A-label or U-label), or [] when it has
    none; a broken key of another domain does not stand in the way."""
    wanted = a_label(domain)
    if not directory.is_dir():
        raise ConfigError(f"dkim_keys: {directory}: no such directory")
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        try:
            if a_label(entry.name) == wanted:
                return _read_domain_dir(entry, wanted)
        except ValueError:
            continue
    return []


def _new_private(kind: str, bits: int) -> ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey:
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if kind != "rsa":
        raise ValueError(f"key type {kind!r}: expected one of {', '.join(KINDS)}")
    if not MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
        raise ValueError(f"RSA keys need {MIN_RSA_BITS} to {MAX_RSA_BITS} bits, not {bits}")
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def generate_key(
    directory: Path, domain: str, selector: str, kind: str = "rsa", bits: int = 2048
) -> DkimKey:
    """Create `directory/<domain>/<selector>.pem` (0600) and return it; never overwrite one.

    The key is written to a temporary name, fsync'd, then hard-linked to its final name:
    link() fails when the name exists (FileExistsError, nothing touched) and a crash leaves
    either no key or a whole one, never half a PEM that start-up would then refuse.
    """
    domain = a_label(domain)
    check_selector(selector)
    key = _new_private(kind, bits)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    domain_dir = directory / domain
    domain_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    final = domain_dir / f"{selector}{KEY_SUFFIX}"
    if final.exists():
        raise FileExistsError(f"{final}: a key exists already; choose another --selector")
    temp = domain_dir / f".{selector}.{os.getpid()}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(pem)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temp, final)
        except FileExistsError:
            raise FileExistsError(
                f"{final}: a key exists already; choose another --selector"
            ) from None
    finally:
        temp.unlink(missing_ok=True)
    dir_fd = os.open(domain_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    algorithm = ED25519_SHA256 if kind == "ed25519" else RSA_SHA256
    return DkimKey(domain, selector, algorithm, final, pem)
