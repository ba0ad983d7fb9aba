"""What every session of one daemon process shares.

Nothing here imports the session: the sessions are known only as `LiveSession`, which is
what shutdown needs, so `net/` has no import circle.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from postier.checks.base import CheckChain
from postier.checks.chain import checks_for_role
from postier.checks.disk import FreeSpace
from postier.checks.mailauth import MessageAuthentication, foreign_results_filter
from postier.checks.protection import Protection
from postier.checks.sending_limits import sending_limits
from postier.config import Config
from postier.inbound.handler import InboundHandler, InboundSettings, ProtocolState
from postier.inbound.peer import Peer
from postier.net.limits import ConnectionTracker
from postier.net.rdns import ReverseNames
from postier.net.roles import Role
from postier.policy import Policy
from postier.protocol.state import ServerConfig
from postier.router import Router

if TYPE_CHECKING:
    from postier.auth.passwd import PasswordFile
    from postier.auth.throttle import FailureThrottle
    from postier.dns import Resolver
    from postier.net.outbound import Outbound
    from postier.tls import CertificateStore


class LiveSession(Protocol):
    """A connection being served, as shutdown sees it."""

    transport: asyncio.Transport | None

    def wake(self) -> None: ...


# pyspf threads per worker: each waits on DNS, so they are apart from the spool I/O pool.
SPF_THREADS = 8


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
    sessions: set[LiveSession] = field(default_factory=set)
    spool_dir: Path = Path(".")
    outbound: Outbound | None = None
    _free_space: FreeSpace | None = None
    _chains: dict[str, CheckChain] = field(default_factory=dict)
    _settings: dict[str, InboundSettings] = field(default_factory=dict)  # per role name
    _protection: Protection | None = None  # shared state of the inbound defences
    reverse_names: ReverseNames = field(default_factory=ReverseNames)
    resolver: Resolver | None = None  # the worker's one resolver (see dns_resolver())
    spf_executor: ThreadPoolExecutor | None = None  # made on first use, kept across reloads
    # Stamps of the reloadable files, taken just before build_context read them (ops.reload).
    loaded_stamps: dict[Path, tuple[int, int, int] | None] = field(default_factory=dict)
    # Password hashing (ARGON2ID: ~64 MiB and ~170 ms of CPU each) runs at most this many at
    # a time per worker; more would only trade memory for nothing on a machine this size.
    hash_slots: asyncio.Semaphore | None = None

    def password_slots(self) -> asyncio.Semaphore:
        if self.hash_slots is None:
            self.hash_slots = asyncio.Semaphore(max(1, (os.cpu_count() or 1)))
        return self.hash_slots

    def begin_shutdown(self) -> None:
        """Stop taking work: idle sessions close now, busy ones after their transaction."""
        self.shutting_down = True
        for s in list(self.sessions):
            s.wake()

    def protocol_config(self, role: Role) -> ServerConfig:
        """What the protocol state machine of a listener of `role` needs to know."""
        cfg = self.config
        return ServerConfig(
            hostname=cfg.hostname,
            max_message_size=cfg.max_message_size,
            max_recipients=cfg.max_recipients,
            max_errors=cfg.max_errors,
            starttls_available=self.tls is not None and not role.implicit_tls,
            implicit_tls=role.implicit_tls,
            auth_mechanisms=("PLAIN", "LOGIN") if role.offers_auth and self.passwords else (),
            auth_requires_tls=True,
            auth_required_for_mail=role.requires_auth,
            report_transaction_end=True,
            vrfy_truthful=role.name == "local" or (role.name == "mx" and cfg.vrfy_mx),
            expn_allowed=role.name == "local" and cfg.expn_local,
        )

    def inbound_handler(self, role: Role, peer: Peer, protocol: ProtocolState) -> InboundHandler:
        """The application side of one new connection on a listener of `role`."""
        return InboundHandler(
            peer,
            protocol,
            self.inbound_settings(role),
            self.policy,
            self.checks(role),
            self.router,
            self.executor,
        )

    def inbound_settings(self, role: Role) -> InboundSettings:
        """A listener role's settings, made once per worker and shared by its sessions (they
        are frozen): built per connection, they and mx's header filter (a closure, a
        frozenset) were about 580 bytes of every idle connection."""
        settings = self._settings.get(role.name)
        if settings is None:
            settings = self._settings[role.name] = InboundSettings(
                hostname=self.config.hostname,
                spool_dir=self.spool_dir,
                relay_without_auth=role.relay_without_auth,
                received_auth_user=self.config.received_auth_user,
                drop_field=(
                    foreign_results_filter(self.config.hostname) if role.name == "mx" else None
                ),
            )
        return settings

    def replace_policy(self, policy: Policy) -> None:
        """Swap in a reloaded policy everywhere it is held: new sessions, the queue's local
        delivery, and the check chains (rebuilt on next use, since checks hold the policy).
        Sessions already open keep the policy they started with."""
        self.policy = policy
        self._chains.clear()
        if self.outbound is not None:
            self.outbound.policy = policy

    def checks(self, role: Role) -> CheckChain:
        """The check chain of a listener role, built once per worker (checks keep no
        per-session state)."""
        chain = self._chains.get(role.name)
        if chain is None:
            if self._free_space is None:
                self._free_space = FreeSpace(self.config.mail_root, self.config.min_free_space)
            if self._protection is None:
                self._protection = Protection.from_config(self.config, self.dns_resolver())
            chain = checks_for_role(
                role,
                policy=self.policy,
                free_space=self._free_space,
                hostname=self.config.hostname,
                mailauth=self._mailauth() if role.name == "mx" else None,
                protection=self._protection,
                sending_limits=sending_limits(
                    self.config.queue_dir,
                    self.config.max_messages_per_hour,
                    self.config.max_recipients_per_hour,
                ),
            )
            self._chains[role.name] = chain
        return chain

    def dns_resolver(self) -> Resolver:
        """The worker's resolver, with its TTL cache: routing's own when the relay has one,
        so SPF, DKIM and DMARC ask the same `--dns-server` with the same settings."""
        if self.resolver is None:
            from postier.net.outbound import make_resolver

            relay = self.outbound.relay if self.outbound is not None else None
            self.resolver = getattr(relay, "resolver", None) or make_resolver(self.config)
        return self.resolver

    def _spf_pool(self) -> ThreadPoolExecutor:
        if self.spf_executor is None:
            self.spf_executor = ThreadPoolExecutor(SPF_THREADS, thread_name_prefix="postier-spf")
        return self.spf_executor

    def _mailauth(self) -> MessageAuthentication:
        return MessageAuthentication(
            self.dns_resolver(),
            hostname=self.config.hostname,
            dmarc_reject=self.config.dmarc_reject,
            executor=self.executor,
            spf_executor=self._spf_pool(),
            is_exempt=self.connections.is_exempt,
        )
