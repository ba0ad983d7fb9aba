"""The daemon's outbound side: queue store, scheduler, SMTP relay and maildrop pickup.

Exactly one process runs the scheduler and the maildrop pickup (the queue holds a lock so a
second daemon cannot send the same mail twice). Sessions in other worker processes commit to
the store and leave a flush request that the scheduler polls.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from concurrent.futures import Executor

from postier import log
from postier.config import Config
from postier.delivery.base import (
    Recipient,
    RecipientResult,
    Status,
    StoredMessage,
    permanent,
)
from postier.errors import ConfigError
from postier.policy import LocalTarget, Policy
from postier.protocol.address import Address
from postier.queue.store import EntryExists, QueueStore

_LOG = logging.getLogger("postier.outbound")


def make_relay(config: Config) -> object:
    from postier.delivery.smtp import Smarthost, SmtpRelay
    from postier.dns import Resolver, parse_dns_server

    resolver = Resolver()
    if config.dns_server:
        try:
            ip, port = parse_dns_server(config.dns_server)
        except ValueError as exc:
            raise ConfigError(f"--dns-server: {config.dns_server!r}: {exc}") from None
        resolver = Resolver(ip, port)
    smarthost = None
    if config.smarthost:
        try:
            smarthost = Smarthost.parse(
                config.smarthost,
                username=config.smarthost_user,
                password=config.smarthost_password,
                ca_file=str(config.tls_ca_file) if config.tls_ca_file else None,
            )
        except ValueError as exc:
            raise ConfigError(f"--smarthost: {config.smarthost!r}: {exc}") from None
    from postier.outbound.setup import make_tls_policy

    ca_file = str(config.tls_ca_file) if config.tls_ca_file else None
    return SmtpRelay(
        config.hostname,
        resolver=resolver,
        remote_port=config.remote_port,
        smarthost=smarthost,
        tls_policy=make_tls_policy(config, resolver),
        ca_file=ca_file,
    )


class Outbound:
    def __init__(self, config: Config, policy: Policy, backend: object, executor: Executor) -> None:
        self.config = config
        self.policy = policy
        self.backend = backend
        self.executor = executor
        self.store = QueueStore(config.queue_dir)
        self.relay = make_relay(config)
        self.scheduler: object | None = None
        self._maildrop_task: asyncio.Task[None] | None = None
        self._stop: asyncio.Event | None = None  # created on the loop in start()

    # ---- used by sessions (Router) -------------------------------------------------------
    def commit(self, message: StoredMessage, addresses: Sequence[Address | str]) -> None:
        """Blocking (thread pool): make the message durable in the queue."""
        self.store.commit(message, message.sender, [str(a) for a in addresses])

    def notify(self, queue_id: str) -> None:
        """A committed entry is ready: wake the scheduler, here or in another worker."""
        if self.scheduler is not None:
            self.scheduler.enqueue(queue_id)  # type: ignore[attr-defined]
        else:
            self.store.request_flush(queue_id)

    # ---- the scheduler's local delivery (bounces, retries of local recipients) -----------
    async def local_deliver(
        self, message: StoredMessage, recipients: Sequence[Recipient]
    ) -> list[RecipientResult]:
        results: list[RecipientResult] = []
        loop = asyncio.get_running_loop()
        for r in recipients:
            local, _, domain = r.address.rpartition("@")
            targets = self.policy.resolve_local(local, domain) if local else None
            locals_ = [t for t in targets or [] if isinstance(t, LocalTarget)]
            if not targets or len(locals_) != len(targets):
                results.append(
                    permanent(r, "No such local user (or alias to a remote address)", 550, "5.1.1")
                )
                continue
            rcpts = [t.recipient() for t in locals_]
            deliver = self.backend.deliver  # type: ignore[attr-defined]
            if asyncio.iscoroutinefunction(deliver):
                sub = await deliver(message, rcpts)
            else:
                sub = await loop.run_in_executor(self.executor, deliver, message, rcpts)
            worst = max(
                sub, key=lambda x: (x.status is Status.TEMPORARY, x.status is Status.PERMANENT)
            )
            results.append(RecipientResult(r, worst.status, worst.code, worst.enhanced, worst.text))
        return results

    # ---- maildrop (postier sendmail) -------------------------------------------------------
    async def _accept_dropped(self, message: StoredMessage, recipients: list[str]) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(
                self.executor, self.store.commit, message, message.sender, recipients
            )
        except EntryExists:
            pass
        self.notify(message.queue_id)

    # ---- life cycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Recover the queue and start delivering (call in exactly one process)."""
        from postier.queue.maildrop import Maildrop
        from postier.queue.scheduler import Scheduler

        cfg = self.config
        relay = self.relay
        scheduler = Scheduler(
            self.store,
            lambda domain: relay,
            hostname=cfg.hostname,
            schedule=cfg.retry_schedule,
            max_age=cfg.max_queue_age,
            delay_warning_after=cfg.delay_warning_after,
            per_destination_limit=cfg.per_destination_limit,
            executor=self.executor,
            local_deliver=self.local_deliver,
            is_local=lambda d: self.policy.is_local_domain(d),
        )
        self.scheduler = scheduler
        found = await scheduler.start()
        log.event("queue-started", logger=_LOG, dir=str(cfg.queue_dir), entries=found)
        self._stop = asyncio.Event()
        maildrop = Maildrop(
            cfg.queue_dir,
            hostname=cfg.hostname,
            max_size=cfg.max_message_size,
            executor=self.executor,
        )
        self._maildrop_task = asyncio.get_running_loop().create_task(
            maildrop.run(self._accept_dropped, stop=self._stop)
        )

    async def stop(self, grace: float) -> None:
        if self._stop is not None:
            self._stop.set()
        if self._maildrop_task is not None:
            try:
                await asyncio.wait_for(self._maildrop_task, timeout=grace)
            except (TimeoutError, asyncio.CancelledError):
                self._maildrop_task.cancel()
        if self.scheduler is not None:
            await self.scheduler.stop(grace)  # type: ignore[attr-defined]
        close = getattr(self.relay, "close", None)
        if close is not None and asyncio.iscoroutinefunction(close):
            await close()
