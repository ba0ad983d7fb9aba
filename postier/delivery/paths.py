"""Where a recipient's mail lives on disk, decided once and safely.

docs/architecture.md: mailbox paths come from the users map, never from raw protocol bytes, and the
mailbox name is validated once. Every file backend resolves its target through `mailbox_path`,
so a name such as `../../etc/passwd`, `.ssh` or one with a control character can never become
a path, whatever the users file or an alias expansion produced.

Path templates (issue 6, item 3) let an operator keep mail in the users' homes, e.g.
`/home/{user}/Maildir` (exim's layout) instead of the default `<root>/<mailbox>`. The fields:

- `{user}`    the local part of the user's canonical address (the mailbox name when unknown)
- `{domain}`  the domain of that address
- `{mailbox}` the mailbox name from the users map
- `{root}`    the configured mail root (trusted configuration, not validated)

Each substituted value is validated like a mailbox name. A relative result is taken under the
root. The template itself is configuration: it may not use format specs or attribute access.
"""

from __future__ import annotations

import functools
import os
import pwd
import string
from collections.abc import Sequence
from pathlib import Path

from postier.delivery.base import Recipient

MAX_NAME_BYTES = 255  # NAME_MAX on Linux file systems: one path component
TEMPLATE_FIELDS = frozenset({"user", "domain", "mailbox", "root"})


def validate_mailbox_name(name: str) -> str:
    """Return `name` if it is safe as one path component, else raise ValueError saying why."""
    if not name:
        raise ValueError("mailbox name is empty")
    if "/" in name or "\\" in name:
        raise ValueError(f"mailbox name {name!r} contains a path separator")
    if name.startswith("."):  # also rules out "." and "..": hidden files and parent dirs
        raise ValueError(f"mailbox name {name!r} starts with a dot")
    if ".." in name:
        raise ValueError(f"mailbox name {name!r} contains '..'")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in name):
        raise ValueError(f"mailbox name {name!r} contains a control character")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from undecodable bytes
        raise ValueError(f"mailbox name {name!r} is not valid UTF-8") from None
    if len(encoded) > MAX_NAME_BYTES:
        raise ValueError(f"mailbox name is {len(encoded)} bytes, over {MAX_NAME_BYTES}")
    return name


@functools.lru_cache(maxsize=64)
def template_fields(template: str) -> frozenset[str]:
    """Return the field names a template uses; raise ValueError for anything but plain fields."""
    used: set[str] = set()
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"mailbox path template {template!r}: {exc}") from None
    for _literal, field, spec, conversion in parsed:
        if field is None:
            continue
        if field not in TEMPLATE_FIELDS or spec or conversion:
            allowed = ", ".join("{" + f + "}" for f in sorted(TEMPLATE_FIELDS))
            raise ValueError(
                f"mailbox path template {template!r}: unknown field {{{field}}}; use {allowed}"
            )
        used.add(field)
    return frozenset(used)


def split_user(user: str, mailbox: str) -> tuple[str, str]:
    """Split a canonical address into (local part, domain); fall back to the mailbox name."""
    if not user:
        return mailbox, ""
    local, sep, domain = user.rpartition("@")
    return (local, domain.lower()) if sep else (user, "")


def mailbox_path(root: Path, mailbox: str, template: str | None = None, user: str = "") -> Path:
    """Return the validated filesystem path for `mailbox` (a file for mbox, else a directory).

    Raises ValueError when a name is unsafe or the template needs a value we do not have.
    """
    if template is None:
        return Path(root) / validate_mailbox_name(mailbox)
    fields = template_fields(template)
    local, domain = split_user(user, mailbox)
    values = {"root": os.fspath(root)}
    if "mailbox" in fields:
        values["mailbox"] = validate_mailbox_name(mailbox)
    if "user" in fields:
        values["user"] = validate_mailbox_name(local)
    if "domain" in fields:
        if not domain:
            raise ValueError(f"mailbox path template {template!r} needs {{domain}}; no domain")
        values["domain"] = validate_mailbox_name(domain)
    result = Path(template.format_map(values))
    return result if result.is_absolute() else Path(root) / result


def owner_for(template: str | None, user: str, mailbox: str = "") -> tuple[int, int] | None:
    """Return (uid, gid) the mail files should belong to, or None to leave them as they are.

    Only when postier runs as root and the template names a system user through {user}: then
    /home/alice/Maildir must belong to alice, or her IMAP server and MUA cannot open it.
    Without a template the mailboxes stay with the postier user (the spool layout).
    """
    if template is None or os.geteuid() != 0 or "user" not in template_fields(template):
        return None
    local, _domain = split_user(user, mailbox)
    try:
        entry = pwd.getpwnam(validate_mailbox_name(local))
    except (KeyError, ValueError):
        return None
    return entry.pw_uid, entry.pw_gid


def mailbox_name(address: str, mailbox: str) -> str:
    """The users map's name for the address, else its local part (docs/configuration.md)."""
    return mailbox or address.rpartition("@")[0] or address


def group_by_path(
    root: Path, template: str | None, recipients: Sequence[Recipient]
) -> tuple[dict[Path, list[int]], dict[int, str]]:
    """Resolve each recipient to its mailbox path, grouping those that share one.

    Returns ({path: [indexes into recipients]}, {index: why it has no valid path}). Grouping is
    what makes two aliases of one user, or one user named twice, get one copy per mailbox.
    """
    groups: dict[Path, list[int]] = {}
    errors: dict[int, str] = {}
    for index, rcpt in enumerate(recipients):
        name = mailbox_name(rcpt.address, rcpt.mailbox)
        try:
            path = mailbox_path(root, name, template, rcpt.user)
        except ValueError as exc:
            errors[index] = str(exc)
            continue
        groups.setdefault(path, []).append(index)
    return groups, errors
