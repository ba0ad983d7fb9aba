"""Refuse new mail (452 at MAIL) while the disk is nearly full (RFC 5321 §4.5.3.1.10).

Better a temporary refusal the sender retries than a 250 for mail we then fail to store.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from postier.checks.base import ACCEPT, Verdict, refuse
from postier.inbound.transaction import Transaction
from postier.protocol import replies as R


class FreeSpace:
    """Free bytes of the file system under `path`, read at most once a second.

    A statvfs per MAIL is measurable at hundreds of messages a second, and a second-old
    figure is precise enough.
    """

    def __init__(self, path: Path, minimum: int) -> None:
        self.path = path
        self.minimum = minimum
        self._checked_at = -10.0
        self._free = -1

    def low(self, extra: int = 0) -> bool:
        """True when storing `extra` more bytes would leave less than the minimum."""
        now = time.monotonic()
        if now - self._checked_at > 1.0:
            self._checked_at = now
            try:
                st = os.statvfs(self.path)
                self._free = st.f_bavail * st.f_frsize
            except OSError:
                self._free = -1  # unknown: never refuse on a guess
        return self._free >= 0 and self._free < self.minimum + extra


class LowDiskSpace:
    name = "low-disk"

    def __init__(self, free_space: FreeSpace) -> None:
        self.free_space = free_space

    async def at_mail(self, txn: Transaction) -> Verdict:
        if self.free_space.low(txn.size_hint or 0):
            return refuse(R.LOW_DISK, "low disk space")
        return ACCEPT
