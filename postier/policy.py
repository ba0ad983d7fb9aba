"""Who may send what to whom: local users, aliases, postmaster, and the listener roles.

Roles:
- `mx`: accepts mail only for local domains and known local users. Never relays.
- `local` (loopback only) and authenticated `submission`/`submissions`: may also relay to
  remote domains.

Mailbox names come from the users file (validated once at load), never from protocol bytes:
an RCPT local part is only ever used as a key into the users map.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from postier import log
from postier.delivery.base import Recipient
from postier.delivery.paths import validate_mailbox_name
from postier.errors import ConfigError
from postier.outbound.backup_mx import RelayDomains
from postier.protocol import replies as R
from postier.protocol.address import Address
from postier.protocol.replies import Reply

if TYPE_CHECKING:  # srslib is only imported where an SRS secret is configured
    from postier.outbound.srs import Srs

_LOG = logging.getLogger("postier.policy")

MAX_ALIAS_DEPTH = 10
NULL_SENDER_ON_SUBMISSION = Reply(553, "5.7.1", "Null sender not allowed for submission")


@dataclass(frozen=True, slots=True)
class LocalUser:
    address: str  # canonical "local@domain" (lower-case), or "local" for every local domain
    mailbox: str


@dataclass(frozen=True, slots=True)
class LocalTarget:
    """A recipient that ends in a local mailbox."""

    address: str  # the envelope recipient as accepted
    user: LocalUser

    def recipient(self) -> Recipient:
        """The delivery backends' view of this target."""
        return Recipient(address=self.address, mailbox=self.user.mailbox, user=self.user.address)


@dataclass(frozen=True, slots=True)
class RemoteTarget:
    address: Address  # a recipient to relay (or an alias target at a remote domain)
    forwarded_by: str = ""  # the local domain whose alias forwards here (SRS rewrites)


@dataclass(frozen=True, slots=True)
class Rejection:
    reply: Reply
    reason: str


Decision = list[LocalTarget | RemoteTarget] | Rejection


def _entries(path: Path, what: str) -> Iterator[tuple[int, str, str]]:
    """(line number, line without comment, raw line) for each non-empty line of a map file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what} file: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: {what} file is not UTF-8") from None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if line:
            yield lineno, line, raw


def load_users(path: Path, domains: Iterable[str]) -> dict[str, LocalUser]:
    """Lines `address [mailbox]`; `#` comments. A bare local part is a user at every domain."""
    users: dict[str, LocalUser] = {}
    domain_set = set(domains)
    for lineno, line, raw in _entries(path, "users"):
        parts = line.split()
        if len(parts) > 2:
            raise ConfigError(f"{path}:{lineno}: expected 'address [mailbox]', got {raw.strip()!r}")
        address = parts[0].lower()
        local, _, domain = address.rpartition("@") if "@" in address else (address, "", "")
        if not local and domain and len(parts) == 2:
            # `@example.org alice`: the catch-all of that domain, under the key "@domain";
            # its canonical address names the mailbox so that {user} templates still work.
            try:
                validate_mailbox_name(parts[1])
            except ValueError as exc:
                raise ConfigError(f"{path}:{lineno}: {exc}") from None
            users[address] = LocalUser(address=f"{parts[1].lower()}@{domain}", mailbox=parts[1])
            continue
        if not local:
            raise ConfigError(
                f"{path}:{lineno}: {parts[0]!r} has an empty local part "
                "(a catch-all is '@domain mailbox')"
            )
        if domain and domain not in domain_set:
            _LOG.warning(
                "event=config-warning %s",
                log.fields(file=f"{path}:{lineno}", problem=f"domain {domain} is not local"),
            )
        mailbox = parts[1] if len(parts) == 2 else local
        try:
            validate_mailbox_name(mailbox)
        except ValueError as exc:
            raise ConfigError(f"{path}:{lineno}: {exc}") from None
        users[address] = LocalUser(address=address, mailbox=mailbox)
    return users


def load_aliases(path: Path) -> dict[str, list[str]]:
    """Lines `alias: target, target`; `#` comments. Keys and targets are lower-cased."""
    aliases: dict[str, list[str]] = {}
    for lineno, line, raw in _entries(path, "aliases"):
        name, sep, rest = line.partition(":")
        name = name.strip().lower()
        targets = [t.strip().lower() for t in rest.split(",") if t.strip()]
        if not sep or not name or " " in name or not targets:
            raise ConfigError(f"{path}:{lineno}: expected 'alias: target, target', got {raw!r}")
        for t in targets:
            if any(ord(c) < 32 for c in t) or " " in t:
                raise ConfigError(f"{path}:{lineno}: bad target {t!r}")
        aliases.setdefault(name, []).extend(targets)
    return aliases


class Policy:
    def __init__(
        self,
        domains: Iterable[str],
        users: dict[str, LocalUser],
        aliases: dict[str, list[str]] | None = None,
        recipient_delimiter: str = "",  # the daemon passes Config's, "+" by default
        relay: RelayDomains | None = None,
        srs: Srs | None = None,
    ) -> None:
        self.domains = frozenset(d.lower() for d in domains)
        self.relay = relay or RelayDomains(())  # we are a backup MX for these
        self.srs = srs  # SRS: rewrite forwarded senders, take bounces back (outbound.srs)
        self.users = users
        self.aliases = aliases or {}
        self.delimiter = recipient_delimiter
        self.postmaster_targets = self._postmaster_targets()

    def _postmaster_targets(self) -> list[str]:
        if "postmaster" in self.aliases:
            return self.aliases["postmaster"]
        for d in sorted(self.domains):
            if f"postmaster@{d}" in self.aliases:
                return self.aliases[f"postmaster@{d}"]
        if "postmaster" in self.users:
            return ["postmaster"]
        if self.users:
            first = next(iter(self.users.values()))
            _LOG.warning(
                "event=config-warning %s",
                log.fields(
                    problem="no postmaster alias; postmaster mail goes to the first local user",
                    user=first.address,
                ),
            )
            return [first.address]
        _LOG.warning('event=config-warning problem="no local users: postmaster mail bounces"')
        return []

    def is_local_domain(self, domain: str) -> bool:
        return domain.lower() in self.domains

    def local_domain_of(self, address: Address) -> str | None:
        """The configured local domain this address belongs to (U-label or A-label), or None.

        Address literals never match: mail to `user@[192.0.2.1]` is not ours by accident.
        """
        if address.is_address_literal:
            return None
        if address.domain in self.domains:
            return address.domain
        try:
            ascii_domain = address.domain_ascii
        except ValueError:
            return None
        return ascii_domain if ascii_domain in self.domains else None

    def _find_user(self, local: str, domain: str) -> LocalUser | None:
        key_full = f"{local}@{domain}"
        user = self.users.get(key_full) or self.users.get(local)
        base = self._base(local)
        if user is None and base is not None:
            user = self.users.get(f"{base}@{domain}") or self.users.get(base)
        return user

    def _base(self, local: str) -> str | None:
        """`alice` for `alice+tag` (recipient_delimiter); None when there is no tag."""
        if not self.delimiter or self.delimiter not in local:
            return None
        base = local.split(self.delimiter, 1)[0]
        return base or None  # "+tag" alone is not a sub-address of anyone

    def _alias_targets(self, local: str, domain: str) -> list[str]:
        """Alias targets for the address itself, else for its base (`team+x` → `team`)."""
        targets = self.aliases.get(f"{local}@{domain}") or self.aliases.get(local)
        if targets:
            return targets
        base = self._base(local)
        if base is None or self._has_user(local, domain):  # a user `team+x` wins over `team:`
            return []
        return self.aliases.get(f"{base}@{domain}") or self.aliases.get(base) or []

    def _has_user(self, local: str, domain: str) -> bool:
        return f"{local}@{domain}" in self.users or local in self.users

    def knows(self, local: str, domain: str) -> bool:
        """Is `local@domain` a user or an alias of its own (sub-addresses too), as opposed
        to a name only the catch-all would take? What VRFY may confirm."""
        local, domain = local.lower(), domain.lower()
        if local == "postmaster":
            return bool(self.postmaster_targets)
        if self._alias_targets(local, domain):
            return True
        return self._find_user(local, domain) is not None

    def catch_all(self, domain: str) -> LocalUser | None:
        """The users-file line `@domain mailbox`, if any: who gets mail for unknown names."""
        return self.users.get(f"@{domain}")

    def resolve_local(
        self, local: str, domain: str, depth: int = 0
    ) -> list[LocalTarget | RemoteTarget] | None:
        """Expand an address at a local domain through aliases to users; None if unknown."""
        local = local.lower()
        domain = domain.lower()
        if depth > MAX_ALIAS_DEPTH:
            return None
        if local == "postmaster":
            targets = self.postmaster_targets
        else:
            targets = self._alias_targets(local, domain)
        if targets:
            out: list[LocalTarget | RemoteTarget] = []
            for t in targets:
                t_local, _, t_domain = t.rpartition("@") if "@" in t else (t, "", domain)
                if t_domain and t_domain not in self.domains:
                    out.append(RemoteTarget(Address(t_local, t_domain), forwarded_by=domain))
                    continue
                if t_local == local and t_domain == domain:
                    user = self._find_user(t_local, t_domain)
                    if user:
                        out.append(LocalTarget(f"{local}@{domain}", user))
                    continue
                sub = self.resolve_local(t_local, t_domain, depth + 1)
                if sub:
                    out.extend(sub)
            return out or None
        # Known users and aliases (above) win; the catch-all takes only what nobody else has.
        user = self._find_user(local, domain) or self.catch_all(domain)
        if user is None:
            return None
        return [LocalTarget(f"{local}@{domain}", user)]

    def check_sender(self, sender: Address | None, *, user: str) -> Rejection | None:
        """May the authenticated `user` send as `sender`? None when it may.

        A login `local@domain` owns exactly that address; a seed-style bare login `local`
        owns `local@` every local domain. Submission never takes the null sender: bounces
        are the server's job (RFC 6409 §4.1 leaves it to policy; we refuse it).
        """
        if sender is None:
            return Rejection(NULL_SENDER_ON_SUBMISSION, "null sender on submission")
        owner_local, at, owner_domain = user.lower().rpartition("@")
        if not at:
            owner_local, owner_domain = owner_domain, ""
        if sender.local.lower() == owner_local and (
            sender.domain == owner_domain if at else self.local_domain_of(sender) is not None
        ):
            return None
        return Rejection(
            Reply(553, "5.7.1", f"Sender address not owned by {user}"), "sender not owned"
        )

    def check_recipient(self, rcpt: Address, *, may_relay: bool) -> Decision:
        if rcpt.domain == "" and rcpt.local.lower() == "postmaster":
            targets = self.resolve_local(
                "postmaster", sorted(self.domains)[0] if self.domains else ""
            )
            if not targets:
                return Rejection(R.NO_SUCH_USER, "no postmaster configured")
            return targets
        domain = self.local_domain_of(rcpt)
        if domain is not None and self.srs is not None and self.srs.is_srs(rcpt.local):
            back = self.srs.reverse(f"{rcpt.local}@{domain}")
            if isinstance(back, Reply):
                return Rejection(back, "forged or expired SRS address")
            b_local, _, b_domain = back.rpartition("@")
            back_rcpt = Address(b_local, b_domain)
            if self.local_domain_of(back_rcpt) is not None:
                return self.check_recipient(back_rcpt, may_relay=False)
            return [RemoteTarget(back_rcpt, forwarded_by=domain)]
        if domain is not None:
            targets = self.resolve_local(rcpt.local, domain)
            if not targets:
                return Rejection(R.NO_SUCH_USER, "unknown local user")
            return targets
        if self.relay.covers(rcpt.domain):
            refused = self.relay.refusal(str(rcpt))
            return [RemoteTarget(rcpt)] if refused is None else Rejection(refused, "relay rcpt")
        if may_relay:
            return [RemoteTarget(rcpt)]
        return Rejection(R.RELAY_DENIED, "relay denied")
