"""Listener roles: what a connection on each kind of listener may do."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Role:
    name: str
    relay_without_auth: bool  # may send to remote domains without AUTH
    implicit_tls: bool  # TLS from the first byte (RFC 8314)
    offers_auth: bool
    requires_auth: bool  # MAIL needs a successful AUTH first


MX = Role(
    "mx", relay_without_auth=False, implicit_tls=False, offers_auth=False, requires_auth=False
)
LOCAL = Role(
    "local", relay_without_auth=True, implicit_tls=False, offers_auth=False, requires_auth=False
)
SUBMISSION = Role(
    "submission", relay_without_auth=False, implicit_tls=False, offers_auth=True, requires_auth=True
)
SUBMISSIONS = Role(
    "submissions", relay_without_auth=False, implicit_tls=True, offers_auth=True, requires_auth=True
)

ROLES = {r.name: r for r in (MX, LOCAL, SUBMISSION, SUBMISSIONS)}
