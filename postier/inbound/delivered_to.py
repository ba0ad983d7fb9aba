"""Which address a message's `Delivered-To:` names (what Dovecot's Sieve and MUAs read to
see the full address, `alice+tag@example.org`, a mail for alice arrived by).

The header is per mailbox, but a message for several local mailboxes is one spool file that
every Maildir shares through hard links (one inode, one content). Writing a different header
into each would mean one full copy per mailbox. We keep the links: the header is written only
when the message has exactly one local mailbox, which is the common case (and the one where
the address matters: a sub-address or a catch-all name); a message for several local
mailboxes carries none rather than a wrong one for all but one of them.
"""

from __future__ import annotations

from collections.abc import Sequence

from postier.policy import LocalTarget


def delivered_to_for(local: Sequence[LocalTarget]) -> str:
    """The full address for `Delivered-To:`, or "" when none is written (see above).

    `Transaction.local` holds one target per mailbox: the first address that reached it.
    """
    return local[0].address if len(local) == 1 else ""
