"""VRFY and EXPN answered from the users and aliases maps (RFC 5321 §3.5, §7.3).

The protocol only lets these commands through where telling the truth is safe: the local
listener, an authenticated session, or mx with `vrfy_mx = true` (a lab setting: it tells
any stranger which users exist); elsewhere it answers 252 or 502 alone. Here the answer is:

- `250 <local@domain>` for a known user or alias (sub-addresses included: `alice+tag`);
- `550 5.1.1` for a name nobody has;
- `252` when the truth is not a single mailbox: a bare name known at several local domains,
  a name only the domain's catch-all would take, or an address at a remote domain.

EXPN (only with `expn_local = true` on local) lists what an address expands to.
"""

from __future__ import annotations

from postier.policy import LocalTarget, Policy
from postier.protocol import replies as R
from postier.protocol.address import Address, AddressError, parse_path
from postier.protocol.replies import Reply

UNKNOWN = Reply(550, "5.1.1", "No such user here")
CATCH_ALL = Reply(252, "2.1.5", "Cannot VRFY this name, but mail to it is accepted")
AMBIGUOUS = Reply(252, "2.1.5", "Ambiguous name: known at several domains; give user@domain")
NOT_LOCAL = Reply(252, "2.1.5", "Not a local domain; cannot VRFY remote users")


def _mailbox_of(query: str) -> tuple[str, str | None] | None:
    """(local part, domain or None for a bare name) from `<a@b>`, `Name <a@b>`, `a@b` or
    `alice`; None when it is none of these (a full name alone cannot be looked up)."""
    text = query.strip()
    if "<" in text:
        start = text.rfind("<")
        end = text.find(">", start)
        if end < 0:
            return None
        text = text[start + 1 : end]
    if not text or any(c.isspace() for c in text):
        return None
    if "@" not in text:
        return text.lower(), None
    try:
        address = parse_path(
            f"<{text}>", utf8=True, null_ok=False, bare_postmaster_ok=False, sender=False
        )
    except AddressError:
        return None
    assert address is not None
    return address.local.lower(), address.domain


def _known_addresses(policy: Policy, local: str, domain: str | None) -> list[str] | Reply:
    """The full addresses the query names, or the reply that says why there is none."""
    if domain is not None:
        local_domain = policy.local_domain_of(Address(local, domain))
        if local_domain is None:
            return NOT_LOCAL
        domains = [local_domain]
    else:
        domains = sorted(policy.domains)
    found = [f"{local}@{d}" for d in domains if policy.knows(local, d)]
    if found:
        return found
    if any(policy.catch_all(d) is not None for d in domains):
        return CATCH_ALL
    return UNKNOWN


def answer_vrfy(policy: Policy, query: str) -> Reply:
    """The reply to `VRFY query` on a listener where the truth may be told."""
    mailbox = _mailbox_of(query)
    if mailbox is None:
        return R.VRFY_CANNOT
    found = _known_addresses(policy, *mailbox)
    if isinstance(found, Reply):
        return found
    if len(found) > 1:
        return AMBIGUOUS
    return Reply(250, "2.1.5", f"<{found[0]}>")


def answer_expn(policy: Policy, query: str) -> Reply:
    """The reply to `EXPN query`: one `<address>` line per final recipient."""
    mailbox = _mailbox_of(query)
    if mailbox is None:
        return UNKNOWN
    found = _known_addresses(policy, *mailbox)
    if isinstance(found, Reply):
        return found
    if len(found) > 1:
        return AMBIGUOUS
    local, _, domain = found[0].rpartition("@")
    targets = policy.resolve_local(local, domain) or []
    lines = []
    for t in targets:
        address = t.address if isinstance(t, LocalTarget) else str(t.address)
        if f"<{address}>" not in lines:
            lines.append(f"<{address}>")
    if not lines:
        return UNKNOWN
    return Reply(250, "2.1.5", tuple(lines))
