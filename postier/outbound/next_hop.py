"""Where the queue sends a domain's mail: a transport route, our backup-MX rule, or the MX.

The scheduler asks `NextHops.backend_for(domain)` once per destination. The answer is:

- a domain with a route (`postier.outbound.routes`): that route's backend (SMTP to a fixed
  host or to another name's MX hosts, LMTP, or an `error:` refusal);
- a relay domain (we are its backup MX): its MX hosts more preferred than our hostname, never
  ourselves or a less preferred host (RFC 5321 §5.1), so a backup never loops mail back;
- any other domain: the usual SMTP relay (MX look-up, or the smarthost).

Routes apply to local domains as well (per-domain Dovecot backends): `RoutedLocal` wraps the
local backend so a session's end of data and the queue's retries take the same route.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection, Sequence
from concurrent.futures import Executor

from postier.delivery.base import (
    LocalDelivery,
    NetworkBackend,
    NetworkDelivery,
    Recipient,
    RecipientResult,
    Status,
    StoredMessage,
    temporary,
)
from postier.delivery.lmtp import LmtpBackend
from postier.delivery.smtp import RelaySession, SmtpRelay
from postier.dns import DnsTemporaryError, Resolver, to_ascii_domain
from postier.errors import DeliveryError
from postier.log import event
from postier.outbound.routes import Route, RouteTable
from postier.outbound.tls_policy import OPPORTUNISTIC, DomainTls, HostTls, Source, static_level

_LOG = logging.getLogger("postier.outbound.next_hop")

# A domain → (hosts to try in order, port). Raises DeliveryError (temporary or permanent).
HopFinder = Callable[[str], Awaitable[tuple[list[str], int]]]


class HopSession(RelaySession):
    """An SMTP relay session whose hosts come from a `HopFinder` instead of the MX records.

    `tls_domain` names whose TLS policy applies: the recipient domain (backup MX: its own MX
    hosts), the route's host (`smtp:host`: that name's MX hosts, so its MTA-STS and DANE),
    or None for `smtp:[host]`, a host the operator chose: the `tls_policy` table's level for
    the recipient domain, else opportunistic (the recipient domain's MTA-STS or DANE would
    name MX hosts that this route does not use).
    """

    def __init__(
        self, relay: SmtpRelay, domain: str, hops: HopFinder, tls_domain: str | None
    ) -> None:
        super().__init__(relay, domain)
        self._hops = hops
        self._tls_domain = tls_domain

    async def _routes(self) -> tuple[list[str], int]:
        return await self._hops(self.domain)

    async def _domain_tls(self) -> DomainTls:
        if self._tls_domain is None:
            level = static_level(self.relay.tls_policy.table, self.domain)
            host_tls = OPPORTUNISTIC if level is None else HostTls(level, Source.TLS_POLICY)
            return DomainTls.fixed(self.domain, host_tls)
        if self._tls_domain == self.domain:
            return await super()._domain_tls()
        return await self.relay.tls_policy.for_domain(self._tls_domain)


class HopRelay:
    """`SmtpRelay`'s connections (TLS policy, timeouts, EHLO name) with other next hops."""

    def __init__(
        self, relay: SmtpRelay, hops: HopFinder, tls_domain: Callable[[str], str | None]
    ) -> None:
        self.relay = relay
        self.hops = hops
        self.tls_domain = tls_domain  # recipient domain → whose TLS policy (HopSession)

    def session(self, domain: str) -> HopSession:
        return HopSession(self.relay, domain, self.hops, self.tls_domain(domain))

    async def deliver(
        self, message: StoredMessage, recipients: Sequence[Recipient]
    ) -> list[RecipientResult]:
        domain = recipients[0].address.rpartition("@")[2].lower() if recipients else ""
        async with self.session(domain) as s:
            return await s.send(message, recipients)


class ErrorRoute:
    """An `error:` route: every recipient gets the route's status, no connection made."""

    def __init__(self, route: Route) -> None:
        self.route = route

    async def deliver(
        self, message: StoredMessage, recipients: Sequence[Recipient]
    ) -> list[RecipientResult]:
        status = Status.PERMANENT if self.route.permanent else Status.TEMPORARY
        event(
            "delivery",
            logger=_LOG,
            qid=message.queue_id,
            backend="error",
            route=str(self.route),
            rcpts=len(recipients),
        )
        return [
            RecipientResult(r, status, self.route.code, self.route.enhanced, self.route.text)
            for r in recipients
        ]


class NextHops:
    """The backend for each destination domain (see the module docstring)."""

    def __init__(
        self,
        relay: SmtpRelay,
        resolver: Resolver,
        *,
        hostname: str,
        routes: RouteTable | None = None,
        relay_domains: Collection[str] = (),
    ) -> None:
        self.relay = relay
        self.resolver = resolver
        self.hostname = hostname.lower().rstrip(".")
        self.routes = routes or RouteTable()
        self.relay_domains = frozenset(d.lower().rstrip(".") for d in relay_domains)
        self._backends: dict[str, NetworkBackend] = {}
        self._backup = HopRelay(relay, self.backup_hops, lambda domain: domain)

    def route(self, domain: str) -> Route | None:
        return self.routes.lookup(domain)

    def backend_for(self, domain: str) -> NetworkBackend:
        route = self.routes.lookup(domain)
        if route is not None:
            return self._for_route(route)
        if domain.lower().rstrip(".") in self.relay_domains:
            return self._backup
        return self.relay

    def _for_route(self, route: Route) -> NetworkBackend:
        key = str(route)
        backend = self._backends.get(key)
        if backend is None:
            backend = self._make(route)
            self._backends[key] = backend
        return backend

    def _make(self, route: Route) -> NetworkBackend:
        if route.kind == "lmtp":
            return LmtpBackend(route.target, hostname=self.relay.hostname)
        if route.kind == "error":
            return ErrorRoute(route)

        async def fixed(domain: str) -> tuple[list[str], int]:
            port = route.port or self.relay.remote_port
            if not route.mx:
                return [route.host], port
            return await self.resolver.mx_hosts(route.host), port

        if route.mx:
            return HopRelay(self.relay, fixed, lambda domain: route.host)
        return HopRelay(self.relay, fixed, lambda domain: None)

    async def backup_hops(self, domain: str) -> tuple[list[str], int]:
        """The MX hosts of `domain` more preferred than our hostname (RFC 5321 §5.1).

        We are a backup: when our own name is the best (or only) MX left, delivering would be
        a loop or local delivery, which a relay domain never gets. That is a configuration
        or DNS mistake the operator can fix, so the mail waits (temporary) rather than
        bouncing; the queue lifetime bounds the wait.
        """
        try:
            records = await self.resolver.lookup(to_ascii_domain(domain), "MX")
        except DnsTemporaryError as exc:
            raise DeliveryError(str(exc), permanent=False, code=451, enhanced="4.4.3") from None
        except ValueError as exc:
            raise DeliveryError(str(exc), permanent=True, code=553, enhanced="5.1.2") from None
        prefs: list[tuple[int, str]] = []
        for r in records:
            host = r.exchange.to_text(omit_final_dot=True).lower()  # type: ignore[attr-defined]
            prefs.append((int(r.preference), host))  # type: ignore[attr-defined]
        ours = [p for p, h in prefs if h == self.hostname]
        limit = min(ours) if ours else None
        better = sorted((p, h) for p, h in prefs if h and (limit is None or p < limit))
        hosts = list(dict.fromkeys(h for _, h in better if h != self.hostname))
        if not hosts:
            raise DeliveryError(
                f"{domain}: no MX host more preferred than ours ({self.hostname}); "
                "mail for a relay domain is never delivered locally",
                permanent=False,
                code=451,
                enhanced="4.4.6",
            )
        return hosts, self.relay.remote_port

    def over_smtp(self, domain: str) -> bool:
        """Does the queue send this domain's mail with the SMTP relay (MX, smarthost, an
        `smtp:` route or backup MX), rather than LMTP, an `error:` route or locally?"""
        backend = self.backend_for(domain)
        return backend is self.relay or isinstance(backend, HopRelay)

    def is_routed_local(self, domain: str) -> bool:
        """A local domain whose mail leaves over SMTP: the queue must not deliver it here."""
        route = self.routes.lookup(domain)
        return route is not None and route.kind == "smtp"


class RoutedLocal:
    """The local backend, with routes applied per recipient domain (a `NetworkBackend`).

    `lmtp:` and `error:` routes are taken at once; an `smtp:` route answers "temporary" so
    the router puts the recipient in the queue, whose scheduler sends it along the route
    (a session never waits on a remote server before its 250).
    """

    def __init__(self, local: LocalDelivery, hops: NextHops, executor: Executor) -> None:
        self.local = local
        self.hops = hops
        self.executor = executor

    async def deliver(
        self, message: StoredMessage, recipients: Sequence[Recipient]
    ) -> list[RecipientResult]:
        groups: dict[Route | None, list[int]] = {}
        for i, r in enumerate(recipients):
            route = self.hops.route(r.address.rpartition("@")[2])
            groups.setdefault(route, []).append(i)
        results: list[RecipientResult | None] = [None] * len(recipients)
        for route, indexes in groups.items():
            rcpts = [recipients[i] for i in indexes]
            if route is None:
                group = await self.local.deliver(self.executor, message, rcpts)
            elif route.kind == "smtp":
                group = [temporary(r, f"queued for route {route}", 451, "4.4.0") for r in rcpts]
            else:
                group = await self.hops.backend_for(rcpts[0].address.rpartition("@")[2]).deliver(
                    message, rcpts
                )
            for i, res in zip(indexes, group, strict=True):
                results[i] = res
        return [r for r in results if r is not None]


def route_local(
    local: LocalDelivery, hops: NextHops, executor: Executor, local_domains: Collection[str]
) -> LocalDelivery:
    """The local backend to use: wrapped only when a route covers a local domain, so a
    deployment without such routes keeps its one-job file delivery."""
    if any(hops.route(d) is not None for d in local_domains):
        return NetworkDelivery(RoutedLocal(local, hops, executor))
    return local
