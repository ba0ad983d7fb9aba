"""SRS (the Sender Rewriting Scheme): forwarding that keeps passing SPF.

When an alias forwards mail to a remote address, we send it from our address, not the
original sender's: the receiver checks SPF against the envelope sender's domain, and the
original domain does not list us. The sender becomes `SRS0=HHHH=TT=orig.domain=user@ours`
(or SRS1 when it already was an SRS address), whose hash (an HMAC with our secret) and day
stamp let us take a bounce back and pass it on to the original sender, while nobody can
forge such an address to make us a relay.

The scheme itself (SRS0/SRS1, HMAC-SHA1 truncated to 4 base64 characters, a base-32 day
stamp valid 21 days, the libsrs2 defaults) is `srslib`'s; this module adds the secret file
and postier's replies. Only the envelope changes: the forwarded message's bytes are the
ones we received, so its DKIM signatures still verify.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import srslib

from postier.errors import ConfigError
from postier.protocol.replies import Reply

# RFC 3463 5.1.1 "bad destination mailbox": the bounce address does not (or no longer) exist.
FORGED_OR_EXPIRED = Reply(550, "5.1.1", "Invalid or expired SRS bounce address")
VALIDITY_DAYS = 21  # libsrs2's and postsrsd's default


def load_secret(path: Path) -> bytes:
    """The secret's first line; ConfigError (exit 2) when the file is missing, empty or
    readable by others (anyone who reads it can make us relay to any address)."""
    try:
        st = path.stat()
        text = path.read_bytes().splitlines()
    except OSError as exc:
        raise ConfigError(f"srs_secret_file: {path}: {exc.strerror}") from None
    if st.st_mode & 0o077:
        raise ConfigError(f"srs_secret_file: {path}: mode {st.st_mode & 0o777:o}, must be 0600")
    if not text or not text[0].strip():
        raise ConfigError(f"srs_secret_file: {path}: empty")
    return text[0].strip()


class Srs:
    """Rewrite senders of forwarded mail, and check the bounce addresses that come back."""

    def __init__(self, secret: bytes | str, clock: Callable[[], float] = time.time) -> None:
        self._srs = srslib.SRS(secret, validity_days=VALIDITY_DAYS)
        self._srs._time_fn = clock  # srslib's own hook for the day stamp (tests: expiry)

    @classmethod
    def from_file(cls, path: Path) -> Srs:
        return cls(load_secret(path))

    def forward(self, sender: str, domain: str) -> str:
        """`sender` rewritten to our `domain`; the null sender stays null (a bounce being
        forwarded must not become bounceable)."""
        if not sender:
            return sender
        try:
            return self._srs.forward(sender, domain)
        except srslib.Error:  # e.g. a sender without a domain: nothing to protect
            return sender

    @staticmethod
    def is_srs(local: str) -> bool:
        return srslib.SRS.is_srs_address(f"{local}@x", strict=False)

    def reverse(self, address: str) -> str | Reply:
        """Where a bounce to our SRS `address` goes: the original sender (SRS0), or the
        first forwarder's SRS0 address (SRS1); FORGED_OR_EXPIRED when hash or stamp fail."""
        try:
            return self._srs.reverse(address)
        except srslib.Error:
            return FORGED_OR_EXPIRED
