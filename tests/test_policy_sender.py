"""Policy.check_sender: which sender addresses an authenticated user may use."""

from __future__ import annotations

import pytest

from postier.policy import Policy
from postier.protocol.address import Address

POLICY = Policy(["example.org", "example.net"], {})


@pytest.mark.parametrize(
    ("user", "sender", "owned"),
    [
        ("alice@example.org", "alice@example.org", True),
        ("Alice@Example.org", "ALICE@example.org", True),  # logins and local parts: any case
        ("alice@example.org", "alice@example.net", False),  # another domain, even a local one
        ("alice@example.org", "bob@example.org", False),
        ("dave", "dave@example.org", True),  # a bare login owns itself at every local domain
        ("dave", "dave@example.net", True),
        ("dave", "dave@elsewhere.test", False),
        ("dave", "eve@example.org", False),
    ],
)
def test_ownership(user: str, sender: str, owned: bool) -> None:
    local, _, domain = sender.partition("@")
    rejection = POLICY.check_sender(Address(local, domain), user=user)
    assert (rejection is None) is owned
    if rejection is not None:
        assert rejection.reply.code == 553 and user in str(rejection.reply.text)


def test_null_sender_is_refused_for_submission() -> None:
    rejection = POLICY.check_sender(None, user="alice@example.org")
    assert rejection is not None and rejection.reply.code == 553
