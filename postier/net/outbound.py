"""The daemon's outbound side: queue store, scheduler, SMTP relay and maildrop pickup.

Exactly one process runs the scheduler and the maildrop pickup (the queue holds a lock so a
second daemon cannot send the same mail twice). Sessions in other worker processes commit to
the store and tell the scheduler with a datagram on its wake-up socket, or, when that cannot
be sent, a flush request that it polls (postier.queue.wakeup).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import TYPE_CHECKING

from postier import log
from postier.config import Config
from postier.delivery.base import (
    LocalDelivery,
    Recipient,
    RecipientResult,
    Status,
    StoredMessage,
    delivered,
    permanent,
)
from postier.delivery.content import WHOLE, read_body
from postier.dkim.signer import DkimSigner
from postier.errors import ConfigError
from postier.outbound.tlsrpt_send import start_tls_reports
from postier.policy import LocalTarget, Policy, RemoteTarget
from postier.protocol.address import Address
from postier.queue.bounce import DsnRecipient, queue_delivered_report
from postier.queue.ids import new_queue_id
from postier.queue.store import EntryExists, QueueEntry, QueueStore
from postier.queue.wakeup import WakeupListener, WakeupSender

if TYPE_CHECKING:
    from postier.delivery.smtp import SmtpRelay
    from postier.dns import Resolver
    from postier.queue.scheduler import Scheduler

_LOG = logging.getLogger("postier.outbound")

_COMMITTED_MAX = 10_000  # entries committed and not yet announced (see Outbound.notify)


def make_resolver(config: Config) -> Resolver:
    """The resolver `--dns-server` asks for (the system's without it)."""
    from postier.dns import Resolver, parse_dns_server

    if not config.dns_server:
        return Resolver()
    try:
        ip, port = parse_dns_server(config.dns_server)
    except ValueError as exc:
        raise ConfigError(f"--dns-server: {config.dns_server!r}: {exc}") from None
    return Resolver(ip, port)


def make_relay(config: Config) -> SmtpRelay:
    from postier.delivery.smtp import Smarthost, SmtpRelay

    resolver = make_resolver(config)
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
    from postier.outbound.source import OutboundSource, parse_binds

    ca_file = str(config.tls_ca_file) if config.tls_ca_file else None
    relay = SmtpRelay(
        config.hostname,
        resolver=resolver,
        remote_port=config.remote_port,
        smarthost=smarthost,
        tls_policy=make_tls_policy(config, resolver),
        ca_file=ca_file,
    )
    family = config.outbound_family
    relay.source = OutboundSource(family, parse_binds(config.outbound_bind, family, "bind"))
    return relay


class Outbound:
    def __init__(
        self, config: Config, policy: Policy, backend: LocalDelivery, executor: Executor
    ) -> None:
        self.config = config
        self.policy = policy
        self.backend = backend
        self.executor = executor
        self.store = QueueStore(config.queue_dir)
        # Loaded here, before privileges drop and workers fork (a refused key: exit 2).
        self.dkim: DkimSigner | None = None
        if config.dkim_keys is not None:
            self.dkim = DkimSigner(config.dkim_keys, policy.is_local_domain)
        self.relay = make_relay(config)
        from postier.outbound.next_hop import NextHops, route_local
        from postier.outbound.routes import RouteTable

        self.next_hops = NextHops(
            self.relay,
            self.relay.resolver,
            hostname=config.hostname,
            routes=RouteTable.from_config(config.routes),
            relay_domains=config.relay_domain,
        )
        self.backend = route_local(backend, self.next_hops, executor, policy.domains)
        self.scheduler: Scheduler | None = None
        # Entries `commit` wrote (in the thread pool), until `notify` (on the loop) passes
        # them on; single dict operations are atomic, so no lock.
        # With the envelope as written (JSON; None when it was not kept) for the datagram.
        self._committed: dict[str, tuple[QueueEntry, bytes | None, bytes | None]] = {}
        self._wakeup = WakeupSender(self.store.flush_dir)  # workers without the scheduler
        self._wakeup_listener: WakeupListener | None = None
        self._maildrop_task: asyncio.Task[None] | None = None
        self._reports_task: asyncio.Task[None] | None = None  # TLS-RPT, once a day
        self._stop: asyncio.Event | None = None  # created on the loop in start()

    # ---- used by sessions (Router) -------------------------------------------------------
    def commit(self, message: StoredMessage, addresses: Sequence[Address | str]) -> None:
        """Blocking (thread pool): make the message durable in the queue.

        Every message enters the queue here (sessions through the router, `postier sendmail`
        through the maildrop pickup), so `headers_at_commit` is where a change to its bytes
        belongs: signing happens once, at commit, never per delivery attempt.

        A second call for the same message (its local recipients that failed, after its
        remote ones were committed) adds the recipients to that entry.
        """
        recipients = [str(a) for a in addresses]
        envelope: bytes | None = None
        # The queued content (the signature fields, then the spool's content) when the
        # spool writer still had it in memory; None for an entry that existed already.
        known: bytes | None = None
        try:
            prepend = self.headers_at_commit(message)
            entry, envelope = self.store.commit_envelope(
                message, message.sender, recipients, prepend=prepend
            )
            if message.content is not None:
                known = prepend + message.content if prepend else message.content
        except EntryExists:
            entry = self.store.add_recipients(message.queue_id, recipients, message.recipient_dsn)
        # For the first relay attempt, which then needs no file read
        # (postier.delivery.content.Preloaded): the bytes at hand, else read back now, while
        # the file is hot and we are in the thread pool anyway.
        content = None
        if any(self._over_smtp(r.domain) for r in entry.pending()):
            if known is not None and len(known) <= WHOLE:
                content = known
            else:
                content = read_body(self.store.body_file(entry.queue_id),
                                    entry.content_offset, entry.size)  # fmt: skip
        if len(self._committed) >= _COMMITTED_MAX:  # commits never announced: a bounded leak
            self._committed.clear()
        self._committed[entry.queue_id] = (entry, envelope, content)

    def _is_delivered_here(self, domain: str) -> bool:
        """A local domain, unless an smtp: route sends its mail on (the scheduler's rule)."""
        return self.policy.is_local_domain(domain) and not self.next_hops.is_routed_local(domain)

    def _over_smtp(self, domain: str) -> bool:
        return not self._is_delivered_here(domain) and self.next_hops.over_smtp(domain)

    def headers_at_commit(self, message: StoredMessage) -> bytes:
        """Header lines to put on top of the message as it is queued (spool format, LF): the
        DKIM-Signature fields of the From domain's keys, for mail from a trusted sender,
        computed from the spool file before `QueueStore.commit`'s fsync."""
        if not message.dkim_sign or self.dkim is None:
            return b""
        return self.dkim.signature_for_file(
            message.path, message.content_offset, queue_id=message.queue_id
        )

    def sign_own(self, data: bytes, content_offset: int) -> bytes:
        """Our own bounces and delay warnings, signed for the hostname's domain."""
        return self.dkim.sign_bytes(data, content_offset, own=True) if self.dkim else data

    def report_delivered(
        self, message: StoredMessage, recipients: Sequence[DsnRecipient]
    ) -> str | None:
        """Blocking: a "delivered" DSN (NOTIFY=SUCCESS) for a message delivered at end of
        data, committed to the queue; its id, or None for the null sender."""
        return queue_delivered_report(
            self.store,
            message,
            recipients,
            hostname=self.config.hostname,
            now=time.time(),
            sign=self.sign_own,
        )

    def queue_own(self, data: bytes, content_offset: int, recipients: list[str]) -> str:
        """Blocking: commit a message postier wrote (a TLS-RPT report) from <>, signed with
        the hostname's keys as our bounces are; the scheduler is told (at its next poll of
        the flush requests). Returns its id."""
        signed = self.sign_own(data, content_offset)
        entry = self.store.commit_bytes(
            signed, "", recipients, arrival=time.time(), content_offset=content_offset
        )
        # A flush request, safe from this thread (the scheduler's own wake-up is not).
        self.store.request_flush(entry.queue_id)
        return entry.queue_id

    def notify(self, queue_id: str) -> None:
        """A committed entry is ready: wake the scheduler, here or in another worker (on the
        event loop; a datagram, else a flush request file: `postier.queue.wakeup`).

        An entry `commit` made in this process goes to the scheduler as it was written, and
        a small message's content to the relay, so that the first attempt reads neither back
        from the files."""
        entry, envelope, content = self._committed.pop(queue_id, (None, None, None))
        if self.scheduler is not None:
            self._schedule(queue_id, entry, content)
            return
        if envelope is None and entry is not None:
            envelope = entry.to_json()
        if not self._wakeup.send(queue_id, envelope, content):
            self.store.request_flush(queue_id)

    def _schedule(self, queue_id: str, entry: QueueEntry | None, content: bytes | None) -> None:
        if content is not None:
            self.relay.preloaded.put(self.store.body_file(queue_id), content)
        assert self.scheduler is not None
        self.scheduler.enqueue(queue_id, entry)

    def _woken(self, queue_id: str, envelope: bytes | None, content: bytes | None) -> None:
        """A datagram from another worker (`postier.queue.wakeup`): its commit, told."""
        entry = None
        if envelope is not None:
            try:
                entry = QueueEntry.from_json(envelope)
            except ValueError:  # read from the file at dispatch instead
                entry, content = None, None
        self._schedule(queue_id, entry, content)

    def forward(self, message: StoredMessage, targets: Sequence[RemoteTarget]) -> list[str]:
        """Blocking (thread pool): queue alias targets at remote domains, one entry per
        forwarding domain, from that domain's SRS address (`outbound.srs`) when a secret is
        set. The bytes are the received ones, not signed again: the original DKIM holds.

        The new entries are announced through the queue's flush requests, which are safe
        from any thread and process; the scheduler polls them every second."""
        by_domain: dict[str, list[str]] = {}
        for t in targets:
            by_domain.setdefault(t.forwarded_by, []).append(str(t.address))
        srs = self.policy.srs
        # A sender of ours passes SPF from here already (as postsrsd's excluded domains).
        ours = self.policy.is_local_domain(message.sender.rpartition("@")[2])
        ids: list[str] = []
        for domain, rcpts in by_domain.items():
            rewrite = srs is not None and not ours
            sender = srs.forward(message.sender, domain) if srs and rewrite else message.sender
            copy = dataclasses.replace(
                message, queue_id=new_queue_id(), sender=sender, dkim_sign=False
            )
            self.store.commit(copy, sender, rcpts)
            self.store.request_flush(copy.queue_id)
            log.event("forwarded", logger=_LOG, qid=message.queue_id, fwd_qid=copy.queue_id,
                      sender=f"<{sender}>", to=",".join(rcpts), srs=rewrite)  # fmt: skip
            ids.append(copy.queue_id)
        return ids

    # ---- the scheduler's local delivery (bounces, retries of local recipients) -----------
    async def local_deliver(
        self, message: StoredMessage, recipients: Sequence[Recipient]
    ) -> list[RecipientResult]:
        results: list[RecipientResult] = []
        for r in recipients:
            local, _, domain = r.address.rpartition("@")
            targets = self.policy.resolve_local(local, domain) if local else None
            if not targets:
                results.append(permanent(r, "No such local user", 550, "5.1.1"))
                continue
            locals_ = [t for t in targets if isinstance(t, LocalTarget)]
            remotes = [t for t in targets if isinstance(t, RemoteTarget)]
            worst = delivered(r, "Forwarded")
            if locals_:
                sub = await self.backend.deliver(
                    self.executor, message, [t.recipient() for t in locals_]
                )
                worst = max(
                    sub, key=lambda x: (x.status is Status.TEMPORARY, x.status is Status.PERMANENT)
                )
            # Forward only once no retry of this recipient will come (no duplicates); an
            # alias reached in a retry forwards like one reached in a session.
            if remotes and worst.status is not Status.TEMPORARY:
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(self.executor, self.forward, message, remotes)
            results.append(RecipientResult(r, worst.status, worst.code, worst.enhanced, worst.text))
        return results

    # ---- maildrop (postier sendmail) -------------------------------------------------------
    async def _accept_dropped(self, message: StoredMessage, recipients: list[str]) -> None:
        loop = asyncio.get_running_loop()
        # Picked up twice (a crash after the commit): the entry is there, nothing changes.
        # `postier sendmail` runs as a local user: vouched for, as the local listener is.
        signed = dataclasses.replace(message, dkim_sign=True)
        await loop.run_in_executor(self.executor, self.commit, signed, recipients)
        self.notify(message.queue_id)

    # ---- life cycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Recover the queue and start delivering (call in exactly one process)."""
        from postier.queue.maildrop import Maildrop
        from postier.queue.scheduler import Scheduler

        cfg = self.config
        scheduler = Scheduler(
            self.store,
            self.next_hops.backend_for,
            hostname=cfg.hostname,
            schedule=cfg.retry_schedule,
            max_age=cfg.max_queue_age,
            delay_warning_after=cfg.delay_warning_after,
            per_destination_limit=cfg.per_destination_limit,
            executor=self.executor,
            local_deliver=self.local_deliver,
            # A local domain with an smtp: route leaves through the queue's relay.
            is_local=self._is_delivered_here,
            sign_own=self.sign_own,
        )
        self.scheduler = scheduler
        found = await scheduler.start()
        # Other workers' commits, told at once (the flush requests stay the fallback).
        self._wakeup_listener = WakeupListener(self.store.flush_dir, self._woken)
        try:
            self._wakeup_listener.start()
        except OSError as exc:
            log.event("queue-wakeup-unavailable", logging.WARNING, _LOG, error=str(exc))
            self._wakeup_listener = None
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
        self._reports_task = start_tls_reports(cfg, self.queue_own, self._stop)

    async def stop(self, grace: float) -> None:
        if self._stop is not None:
            self._stop.set()
        if self._wakeup_listener is not None:
            self._wakeup_listener.close()  # other workers fall back to flush requests
            self._wakeup_listener = None
        for task in (self._maildrop_task, self._reports_task):
            if task is not None:
                try:
                    await asyncio.wait_for(task, timeout=grace)
                except (TimeoutError, asyncio.CancelledError):
                    task.cancel()
        if self.scheduler is not None:
            await self.scheduler.stop(grace)
