"""The SMTP AUTH password file, in Dovecot's passwd-file form.

One file can serve postier and Dovecot, so the format is Dovecot's:
``address:{SCHEME}hash[:uid:gid:gecos:home:shell:extra]`` one per line, ``#`` comments and
blank lines allowed. Only the first two fields matter to us; the rest are kept untouched by
``postier passwd``. The seeds' simple ``login password`` lines (whitespace-separated, no
scheme) are read as ``{PLAIN}`` so old set-ups keep working, and the daemon warns about them
at start-up (``PasswordFile.plain_users``).

Look-ups are case-insensitive over the whole address (local part included). That is what
Dovecot does with its default ``auth_username_format = %Lu``, so both programs accept the
same spellings; two entries that differ only in case are therefore an error.

Error messages name the file and line but never echo the line: it holds a secret.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import stat
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import argon2
import bcrypt

from postier.errors import ConfigError

SCHEMES = ("ARGON2ID", "BLF-CRYPT", "PLAIN")
# CLEAR is Dovecot's other name for PLAIN.
_SCHEME_ALIASES = {"CLEAR": "PLAIN"}
_BCRYPT_RE = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}")
_BCRYPT_MAX = 72  # bytes; crypt_blowfish (Dovecot) ignores the rest, bcrypt>=5 refuses it
_BCRYPT_ROUNDS = 12
_CONTROL_RE = re.compile(r"[\x00-\x20\x7f]")


@dataclass(frozen=True, slots=True)
class Entry:
    """One credential line. `extra` is the raw text after the password field (no colon)."""

    user: str
    scheme: str
    secret: str
    lineno: int
    simple: bool = False  # written as `login password`
    extra: str | None = None

    def render(self) -> str:
        """The line in passwd-file form; simple lines are upgraded to it."""
        line = f"{self.user}:{{{self.scheme}}}{self.secret}"
        return f"{line}:{self.extra}" if self.extra is not None else line


def parse_line(line: str, where: str, lineno: int) -> Entry | None:
    """Parse one line; None for a comment or blank. `where` is the file name for errors."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None

    def bad(what: str) -> ConfigError:
        return ConfigError(f"{where}:{lineno}: {what}")

    colon, space = text.find(":"), _first_space(text)
    if colon == -1 or (space != -1 and space < colon):
        parts = text.split(None, 1)
        if len(parts) != 2:
            raise bad("expected `address:{SCHEME}hash` or `login password`")
        user, secret = parts
        entry = Entry(user, "PLAIN", secret.strip(), lineno, simple=True)
    else:
        user, _, rest = text.partition(":")
        field, sep, extra = rest.partition(":")
        m = re.fullmatch(r"\{([A-Za-z0-9._-]+)\}(.*)", field, re.DOTALL)
        if not m:
            raise bad("password field must start with a {SCHEME} such as {ARGON2ID}")
        scheme = m.group(1).upper()
        scheme = _SCHEME_ALIASES.get(scheme, scheme)
        if scheme not in SCHEMES:
            raise bad(f"unknown password scheme {{{m.group(1)}}} (use one of {', '.join(SCHEMES)})")
        entry = Entry(user, scheme, m.group(2), lineno, extra=extra if sep else None)
    if not entry.user or _CONTROL_RE.search(entry.user):
        raise bad("address is empty or contains spaces or control characters")
    if not entry.secret:
        raise bad("empty password")
    if entry.scheme == "ARGON2ID":
        if not entry.secret.startswith("$argon2id$"):
            raise bad("{ARGON2ID} hash must start with $argon2id$")
        try:
            argon2.extract_parameters(entry.secret)
        except argon2.exceptions.InvalidHashError:
            raise bad("malformed {ARGON2ID} hash") from None
    elif entry.scheme == "BLF-CRYPT":
        m = _BCRYPT_RE.fullmatch(entry.secret)
        if not m or not 4 <= int(m.group(1)) <= 31:
            raise bad("malformed {BLF-CRYPT} hash (expected $2y$NN$ and 53 characters)")
    return entry


def _first_space(text: str) -> int:
    m = re.search(r"\s", text)
    return m.start() if m else -1


def parse_text(text: bytes, where: str) -> list[tuple[str, Entry | None]]:
    """Every line with its parsed entry (None for comments), for `postier passwd` to rewrite.

    Raises ConfigError for undecodable or malformed lines and for duplicate addresses.
    """
    out: list[tuple[str, Entry | None]] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{where}:{lineno}: not valid UTF-8") from None
        entry = parse_line(line, where, lineno)
        if entry is not None:
            key = entry.user.lower()
            if key in seen:
                first = seen[key]
                raise ConfigError(f"{where}:{lineno}: duplicate address (first on line {first})")
            seen[key] = lineno
        out.append((line, entry))
    return out


def hash_password(password: str, scheme: str = "ARGON2ID") -> str:
    """Hash for storage, with the {SCHEME} prefix: ``{ARGON2ID}$argon2id$v=19$...``.

    BLF-CRYPT hashes are written ``$2y$`` as Dovecot writes them. Passwords over 72 bytes are
    refused for BLF-CRYPT rather than silently truncated. Blocking (tens of milliseconds).
    """
    if not password or "\x00" in password:
        raise ValueError("password must be non-empty and contain no NUL")
    scheme = scheme.upper()
    if scheme == "ARGON2ID":
        return "{ARGON2ID}" + argon2.PasswordHasher().hash(password)
    if scheme == "BLF-CRYPT":
        raw = password.encode("utf-8")
        if len(raw) > _BCRYPT_MAX:
            raise ValueError("BLF-CRYPT cannot hash passwords over 72 bytes; use ARGON2ID")
        hashed = bcrypt.hashpw(raw, bcrypt.gensalt(_BCRYPT_ROUNDS)).decode("ascii")
        return "{BLF-CRYPT}$2y$" + hashed[4:]
    raise ValueError(f"cannot hash with scheme {scheme!r}; use ARGON2ID or BLF-CRYPT")


def _check(scheme: str, secret: str, password: str) -> bool:
    """Does `password` match the stored `secret`? Never raises on bad input."""
    # surrogatepass: a lone surrogate cannot match anything stored, but must not raise.
    raw = password.encode("utf-8", "surrogatepass")
    if scheme == "PLAIN":
        # Digests first, so the comparison time does not depend on the stored length either.
        a = hashlib.sha256(raw).digest()
        return hmac.compare_digest(a, hashlib.sha256(secret.encode("utf-8")).digest())
    if scheme == "ARGON2ID":
        try:
            return argon2.PasswordHasher().verify(secret, raw)
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            return False
    if scheme == "BLF-CRYPT":
        # Dovecot truncates at 72 bytes; do the same so both accept the same passwords.
        try:
            return bcrypt.checkpw(raw[:_BCRYPT_MAX], ("$2b$" + secret[4:]).encode("ascii"))
        except ValueError:
            return False
    return False


class PasswordFile:
    """The credentials loaded from one file. Immutable after load; reload by loading again."""

    def __init__(self, entries: list[Entry], path: str = "", world_readable: bool = False):
        self.path = path
        self.world_readable = world_readable
        self._entries = {e.user.lower(): e for e in entries}
        self._dummy: tuple[str, str] | None = None
        self._dummy_lock = threading.Lock()

    @classmethod
    def load(cls, path: str | Path) -> PasswordFile:
        """Read and validate the file; ConfigError (file:line: what) on any problem."""
        try:
            data = Path(path).read_bytes()
            mode = Path(path).stat().st_mode
        except OSError as e:
            raise ConfigError(f"{path}: cannot read password file: {e.strerror}") from None
        entries = [e for _, e in parse_text(data, str(path)) if e is not None]
        return cls(entries, str(path), bool(mode & stat.S_IROTH))

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, user: object) -> bool:
        return isinstance(user, str) and user.lower() in self._entries

    @property
    def plain_users(self) -> tuple[str, ...]:
        """Users whose password is stored in clear text; the daemon warns about these."""
        return tuple(e.user for e in self._entries.values() if e.scheme == "PLAIN")

    def canonical(self, user: str) -> str | None:
        """The address as the file spells it (for logs and the MAIL FROM ownership check)."""
        entry = self._entries.get(user.lower())
        return entry.user if entry else None

    def verify(self, user: str, password: str) -> bool:
        """True if `password` is right for `user`.

        Blocking: argon2/bcrypt take tens of milliseconds, so the daemon must call this in
        its thread pool, never on the event loop. An unknown user costs the same hashing as a
        known one (a dummy hash of the file's usual scheme and cost), so response time does
        not reveal which addresses exist. Thread-safe.
        """
        entry = self._entries.get(user.lower())
        if entry is None:
            scheme, secret = self._dummy_hash()
            _check(scheme, secret, password)
            return False
        return _check(entry.scheme, entry.secret, password)

    def _dummy_hash(self) -> tuple[str, str]:
        """A hash of a random secret with the scheme and cost most entries use."""
        with self._dummy_lock:
            if self._dummy is None:
                self._dummy = self._make_dummy()
            return self._dummy

    def _make_dummy(self) -> tuple[str, str]:
        counts = Counter(e.scheme for e in self._entries.values())
        if not counts:
            return "ARGON2ID", argon2.PasswordHasher().hash(secrets.token_hex(16))
        scheme = counts.most_common(1)[0][0]
        model = next(e.secret for e in self._entries.values() if e.scheme == scheme)
        junk = secrets.token_hex(16)
        if scheme == "ARGON2ID":
            hasher = argon2.PasswordHasher.from_parameters(argon2.extract_parameters(model))
            return scheme, hasher.hash(junk)
        if scheme == "BLF-CRYPT":
            rounds = int(model[4:6])
            return scheme, bcrypt.hashpw(junk.encode(), bcrypt.gensalt(rounds)).decode()
        return scheme, junk
