"""What every session of one daemon process shares."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from postier.config import Config
from postier.net.limits import ConnectionTracker
from postier.policy import Policy
from postier.router import Router

if TYPE_CHECKING:
    from postier.auth.passwd import PasswordFile
    from postier.auth.throttle import FailureThrottle
    from postier.net.outbound import Outbound
    from postier.net.session import SmtpSession
    from postier.tls import CertificateStore


@dataclass(slots=True)
class ServerContext:
    config: Config
    policy: Policy
    router: Router
    executor: ThreadPoolExecutor
    connections: ConnectionTracker
    tls: CertificateStore | None = None
    passwords: PasswordFile | None = None
    throttle: FailureThrottle | None = None
    shutting_down: bool = False
    sessions: set[SmtpSession] = field(default_factory=set)
    spool_dir: Path = Path(".")
    outbound: Outbound | None = None

    def begin_shutdown(self) -> None:
        """Stop taking work: idle sessions close now, busy ones after their transaction."""
        self.shutting_down = True
        for s in list(self.sessions):
            s.wake()

    def low_on_disk(self, extra: int = 0) -> bool:
        try:
            st = os.statvfs(self.config.mail_root)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize < self.config.min_free_space + extra
