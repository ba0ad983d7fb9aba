"""Which address a message's `Delivered-To:` names: the full address a mail for a user
arrived by, when that says more than the user's own address (`alice+lists@example.org`, or
the name a catch-all took), for the user's filters and mail client.

Two limits, both deliberate:
- It is written when the message has exactly one local mailbox. A message for several local
  mailboxes is one spool file that every Maildir shares through hard links (one inode, one
  content); a different header in each would cost one full copy per mailbox, and one header
  cannot be right for all of them, so such a message carries none rather than a wrong one.
- It is written only when it carries information: for mail to a user's own address the
  stored file keeps the plain layout (Return-Path, then our Received) that tools and tests
  of that layout read.
"""

from __future__ import annotations

from collections.abc import Sequence

from postier.policy import LocalTarget


def delivered_to_for(local: Sequence[LocalTarget]) -> str:
    """The full address for `Delivered-To:`, or "" when none is written (see above).

    `Transaction.local` holds one target per mailbox: the first address that reached it.
    """
    if len(local) != 1:
        return ""
    target = local[0]
    own_local, at, own_domain = target.user.address.rpartition("@")
    if not at:  # a bare-name user ("dave"): theirs at every local domain
        own_local, own_domain = own_domain, ""
    local_part, _, domain = target.address.rpartition("@")
    if local_part.lower() == own_local and (not own_domain or domain.lower() == own_domain):
        return ""
    return target.address
