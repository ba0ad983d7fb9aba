"""The client at the other end of one connection, as the inbound side knows it."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from postier import log

_LOG = logging.getLogger("postier.session")


@dataclass(slots=True)
class Peer:
    """Filled by the transport: the address at connect, the rDNS name and TLS later."""

    session_id: str
    ip: str
    port: int
    listener: str  # the role name: mx, local, submission, submissions
    rdns: str | None = None  # None until the reverse look-up ends ("unknown" if it failed)
    tls_info: str = ""  # protocol and cipher once TLS is up

    def log(self, name: str, level: int = logging.INFO, **kv: object) -> None:
        """One log line about this connection, tagged with its session id."""
        log.event(name, level, _LOG, session=self.session_id, **kv)
