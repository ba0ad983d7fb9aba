"""One small exception tree.

Kept tiny on purpose: each error carries what the caller needs to act on it (a reply for the
peer, a permanence flag for the queue, a key for the operator), never a bare message to parse.
"""

from __future__ import annotations


class PostierError(Exception):
    """Base of every error postier raises on purpose."""


class ConfigError(PostierError):
    """A setting is wrong. The message names the file, key or flag and what is wrong."""


class DeliveryError(PostierError):
    """A delivery attempt failed; `permanent` decides between retry and bounce."""

    def __init__(self, message: str, *, permanent: bool, code: int = 0, enhanced: str = "") -> None:
        super().__init__(message)
        self.permanent = permanent
        self.code = code or (550 if permanent else 451)
        self.enhanced = enhanced or ("5.0.0" if permanent else "4.0.0")
