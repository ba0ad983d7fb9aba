"""Remote delivery over SMTP: MX routing, opportunistic STARTTLS, per-recipient results.

The queue hands `SmtpRelay` the recipients of one domain; it answers with one result per
recipient, never an exception, so the queue's only job is: delivered → done, temporary →
retry later, permanent → bounce. Where each class comes from:

- routing (postier.dns): NXDOMAIN and null MX are permanent; DNS timeouts are temporary;
- every MX host and address failing (refused, timeout, 4xx/5xx greeting, lost connection) is
  temporary: the next attempt may find one up (Postfix does the same with 5xx greetings);
- the server's own replies to MAIL, RCPT, DATA and the final dot: 4xx temporary, 5xx
  permanent, recipient by recipient;
- what we know before sending: a message that needs SMTPUTF8 to a server without it (553
  5.6.7) or one larger than its SIZE limit (552 5.3.4) is permanent, as retrying cannot help.

The transaction itself (MAIL, RCPT, DATA, body, replies) and the connection wrapper are shared
with the LMTP backend and live in postier.delivery.client.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from postier.delivery.base import Recipient, RecipientResult, StoredMessage, result_from_error
from postier.delivery.client import (
    ClientStream,
    StaleConnection,
    Timeouts,
    outcome_fields,
    parse_hostport,
    run_transaction,
)
from postier.delivery.content import Preloaded, read_content
from postier.delivery.relay_tls import NextHopTls, host_failure
from postier.dns import Resolver, is_ip_address
from postier.errors import DeliveryError
from postier.log import event
from postier.outbound import requiretls
from postier.outbound.source import OutboundSource
from postier.outbound.tls_policy import (
    OPPORTUNISTIC,
    HostTls,
    Level,
    Source,
    TlsFailure,
    TlsPolicy,
)
from postier.protocol import client as proto
from postier.protocol.client import Capabilities, ClientProtocolError
from postier.tls import client_context

__all__ = ["RelaySession", "Smarthost", "SmtpRelay", "Timeouts"]

log = logging.getLogger("postier.delivery.smtp")


@dataclass(frozen=True, slots=True)
class Smarthost:
    """Send everything through this relay (port 587 unless given). TLS is required: STARTTLS,
    or implicit TLS (`implicit_tls`, the default on port 465). Credentials, when set, go over
    that TLS only (AUTH PLAIN, else LOGIN). `verify` checks the relay's certificate and name
    (against `ca_file`, else the system CAs): unlike an MX, a smarthost is chosen by the
    operator and receives our password, so it must prove who it is."""

    host: str
    port: int = 587
    username: str = ""
    password: str = field(default="", repr=False)
    verify: bool = True
    ca_file: str | None = None
    implicit_tls: bool = False

    @classmethod
    def parse(cls, text: str, **kwargs: Any) -> Smarthost:
        """From `--smarthost HOST[:PORT]` plus the config's credentials and TLS settings."""
        host, port = parse_hostport(text, 587)
        kwargs.setdefault("implicit_tls", port == 465)
        return cls(host, port, **kwargs)


class SmtpRelay:
    """Deliver to remote domains (or through a smarthost) over SMTP.

    `deliver()` is the backend interface; `session(domain)` keeps one connection open for
    several messages to the same domain (the queue's "many messages share a connection").
    """

    def __init__(
        self,
        hostname: str,
        *,
        resolver: Resolver | None = None,
        remote_port: int = 25,
        smarthost: Smarthost | None = None,
        timeouts: Timeouts | None = None,
        tls_context: ssl.SSLContext | None = None,
        tls_policy: TlsPolicy | None = None,
        ca_file: str | None = None,
    ) -> None:
        self.hostname = hostname  # our name in EHLO
        self.resolver = resolver or Resolver()
        self.remote_port = remote_port
        self.smarthost = smarthost
        self.timeouts = timeouts or Timeouts()
        if tls_context is None:
            if smarthost is not None:
                tls_context = client_context(verify=smarthost.verify, ca_file=smarthost.ca_file)
            else:
                tls_context = client_context(verify=False)
        self.tls_context = tls_context  # the smarthost's, or opportunistic toward MX hosts
        # MX hosts under `verify` or MTA-STS: chain and MX name, against ca_file or the system.
        self.verify_context = client_context(verify=True, ca_file=ca_file)
        self.tls_policy = tls_policy or TlsPolicy()
        self.source = OutboundSource()  # families and source addresses (outbound.source)
        # Content of freshly queued messages, left by the queue's commit for the first attempt.
        self.preloaded = Preloaded()

    def session(self, domain: str) -> RelaySession:
        return RelaySession(self, domain)

    async def deliver(
        self, message: StoredMessage, recipients: Sequence[Recipient]
    ) -> list[RecipientResult]:
        """One attempt for `recipients` (grouped by domain if the caller mixed them)."""
        by_domain: dict[str, list[int]] = {}
        for i, r in enumerate(recipients):
            by_domain.setdefault(r.address.rpartition("@")[2].lower(), []).append(i)
        results: list[RecipientResult | None] = [None] * len(recipients)
        for domain, indexes in by_domain.items():
            async with self.session(domain) as s:
                group = await s.send(message, [recipients[i] for i in indexes])
            for i, res in zip(indexes, group, strict=True):
                results[i] = res
        return [r for r in results if r is not None]


class RelaySession(NextHopTls):
    """A connection to one destination, opened on the first `send()` and reused after.

    If no host could be reached, later sends in this session fail at once with the same
    error instead of trying every host again (RFC 5321 §4.5.4.1: no immediate retry).
    """

    def __init__(self, relay: SmtpRelay, domain: str) -> None:
        self.relay = relay
        self.domain = domain
        self.stream: ClientStream | None = None
        self.caps = Capabilities()
        self.host = ""
        self.address = ""
        self.port = 0
        self._failed: DeliveryError | None = None
        self.host_tls: HostTls = OPPORTUNISTIC  # what the connected host owed us
        self.tls_verified = False  # its certificate was checked (verify, MTA-STS or DANE)
        self.tls_failure = ""  # the last TLS failure on this destination, for the queue
        self.local_ip = ""  # our address on the current connection (TLS-RPT sending-mta-ip)
        self.relaxed = False  # the connection is for `TLS-Required: No` mail (RFC 8689 §5)
        self._probe = False  # the next transaction pipelines the reused connection's RSET

    @property
    def tls(self) -> bool:
        return self.stream is not None and self.stream.tls

    @property
    def peer(self) -> str:
        return f"{self.host}[{self.address}]:{self.port}"

    @property
    def connected(self) -> bool:
        """A connection stands (the scheduler tells "destination down" from "4xx" by it)."""
        return self.stream is not None

    async def __aenter__(self) -> RelaySession:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self.stream is not None:
            stream, self.stream = self.stream, None
            await stream.close(quit_timeout=min(self.relay.timeouts.command, 30.0))

    async def send(
        self, message: StoredMessage, recipients: Sequence[Recipient]
    ) -> list[RecipientResult]:
        """One delivery attempt of `message` to `recipients` (all in this session's domain)."""
        qid = message.queue_id
        # A small message in memory: left by its commit (first attempt), else read whole in
        # one thread-pool job. The TLS-Required check and the DATA below both use it (a large
        # one is read by each, in pieces).
        content = self.relay.preloaded.take(message.path)
        if content is None:
            content = await asyncio.to_thread(read_content, message)
        relaxed = await requiretls.relaxed_for(message, content)
        if relaxed != self.relaxed:  # a connection made under one stance never serves the other
            await self.close()
            self.relaxed, self._failed = relaxed, None
        refused = await self._prepare(qid, message, recipients)
        if refused is not None:
            return refused
        assert self.stream is not None
        try:
            results = await self._transaction(message, recipients, content)
        except StaleConnection:
            # The reused connection failed the RSET pipelined in front of MAIL: nothing was
            # sent on it. A new connection, as the RSET probe alone would have led to.
            self._drop_stream()
            refused = await self._prepare(qid, message, recipients)
            if refused is not None:
                return refused
            results = await self._transaction(message, recipients, content)
        results = self._with_tls(results)
        self._log(qid, results, connected=True)
        assert self.stream is not None
        if self.stream.broken:
            self.stream = None  # the next send reconnects
        return results

    async def _prepare(
        self, qid: str, message: StoredMessage, recipients: Sequence[Recipient]
    ) -> list[RecipientResult] | None:
        """A connection that may carry `message`; else every recipient's (logged) result."""
        try:
            self._probe = await self._ready(qid)
            refusal = requiretls.hop_refusal(message, self, self.domain)
            if refusal is not None:
                raise refusal
        except DeliveryError as exc:
            results = self._with_tls([result_from_error(r, exc) for r in recipients])
            self._log(qid, results, connected=self.stream is not None)
            return results
        return None

    async def _transaction(
        self, message: StoredMessage, recipients: Sequence[Recipient], content: bytes | None
    ) -> list[RecipientResult]:
        assert self.stream is not None
        probe, self._probe = self._probe, False
        return await run_transaction(
            self.stream,
            self.caps,
            message,
            recipients,
            self.relay.timeouts,
            peer=self.peer,
            content=content,
            reset=probe,
        )

    def _log(self, qid: str, results: list[RecipientResult], *, connected: bool) -> None:
        """The one line per attempt: where it went and what each recipient got."""
        event(
            "delivery",
            logger=log,
            qid=qid,
            backend="smtp",
            domain=self.domain,
            host=self.host if connected else None,
            addr=self.address if connected else None,
            port=self.port if connected else None,
            tls=self.tls_state(connected),
            policy=self.host_tls.source.value,
            **outcome_fields(results),
        )

    async def _ready(self, qid: str) -> bool:
        """Reuse the open connection (after an RSET probe) or open a new one.

        True when the reused connection still owes its probe: with PIPELINING the RSET goes
        in front of MAIL in the transaction's first write (RFC 2920 §3.1 allows it there),
        which saves a round trip per message; `run_transaction` raises `StaleConnection`
        when it fails. Without PIPELINING the RSET is a command of its own, here."""
        if self.stream is not None:
            try:
                if self.stream.usable():
                    if "PIPELINING" in self.caps:
                        return True
                    reply = await self.stream.command(proto.RSET, self.relay.timeouts.command)
                    if reply.code // 100 == 2:
                        return False
            except (OSError, ClientProtocolError):
                pass
            self._drop_stream()
        if self._failed is not None:
            raise self._failed
        try:
            await self._connect(qid)
        except DeliveryError as exc:
            self._failed = exc
            raise
        return False

    def _drop_stream(self) -> None:
        """Forget the connection without QUIT (it failed, or failed its probe)."""
        if self.stream is not None:
            self.stream.writer.close()
            self.stream = None

    async def _routes(self) -> tuple[list[str], int]:
        if self.relay.smarthost is not None:
            return [self.relay.smarthost.host], self.relay.smarthost.port
        return await self.relay.resolver.mx_hosts(self.domain), self.relay.remote_port

    async def _addresses(self, host: str, port: int) -> list[str]:
        """MX hosts go through our resolver; a smarthost is an operator's name, looked up
        like any other configured host (so /etc/hosts and `localhost` work), never bounced."""
        if self.relay.smarthost is None or is_ip_address(host):
            return await self.relay.resolver.addresses(host)
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise host_failure(f"smarthost {host}: {exc}", "4.4.3") from None
        return list(dict.fromkeys(str(info[4][0]) for info in infos))

    async def _connect(self, qid: str) -> None:
        hosts, port = await self._routes()
        domain_tls = await self._domain_tls()
        errors: list[DeliveryError] = []
        for host in hosts:
            try:
                host_tls = await self._host_tls(qid, domain_tls, host)
                addresses = self.relay.source.usable(host, await self._addresses(host, port))
            except DeliveryError as exc:
                event("route_failed", logger=log, qid=qid, host=host, reason=str(exc))
                errors.append(exc)
                continue
            for address in addresses:
                self.host, self.address, self.port = host, address, port
                try:
                    await self._open(qid, host_tls)
                    return
                except DeliveryError as exc:
                    event(
                        "connect_failed",
                        logger=log,
                        qid=qid,
                        host=host,
                        addr=address,
                        port=port,
                        reason=str(exc),
                    )
                    errors.append(exc)
        if errors and all(e.permanent for e in errors):
            raise errors[-1]
        last = next((e for e in reversed(errors) if not e.permanent), None)
        text = str(last) if last else "no host to try"
        raise DeliveryError(
            f"all hosts for {self.domain} failed; last: {text}",
            permanent=False,
            code=last.code if last else 451,
            enhanced=last.enhanced if last else "4.4.1",
        )

    async def _open(self, qid: str, host_tls: HostTls) -> None:
        """Connect to (host, address, port): greeting, EHLO, STARTTLS, AUTH."""
        relay, t = self.relay, self.relay.timeouts
        if self.relaxed and host_tls.source is not Source.SMARTHOST:
            host_tls = requiretls.relax(host_tls)
        self.host_tls, self.tls_verified = host_tls, False
        smart = relay.smarthost
        sni = None if is_ip_address(self.host) else self.host
        implicit = smart is not None and smart.implicit_tls
        try:
            stream = await ClientStream.open(
                self.address,
                self.port,
                t.connect,
                tls=relay.tls_context if implicit else None,
                server_hostname=sni or self.address,
                local_addr=relay.source.local_addr(self.address),
            )
        except TimeoutError:
            raise host_failure(f"connect to {self.peer}: timeout") from None
        except OSError as exc:
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise host_failure(f"connect to {self.peer}: {why}") from None
        try:
            self.local_ip = str((stream.writer.get_extra_info("sockname") or ("",))[0])
            greeting = await stream.read_reply(t.greeting)
            if greeting.code != 220:
                raise host_failure(f"{self.peer} greeted us with: {greeting}")
            caps = await self._hello(stream)
            if stream.tls:
                self.tls_verified = smart is not None and smart.verify
            elif host_tls.level is not Level.NONE:
                try:
                    caps = await self._starttls(stream, caps, host_tls, sni or self.address)
                except TlsFailure as failure:
                    stream.writer.close()
                    retry = self._after_tls_failure(qid, host_tls, failure)
                    return await self._open(qid, retry)
            if smart is not None and not stream.tls:
                raise host_failure(
                    f"smarthost {self.peer} offers no TLS, which is required", "4.7.10"
                )
            if smart is not None and smart.username:
                await self._auth(stream, caps, smart)
        except DeliveryError:
            stream.writer.close()
            raise
        except TimeoutError:
            stream.writer.close()
            raise host_failure(f"timeout talking to {self.peer}", "4.4.2") from None
        except (OSError, ClientProtocolError) as exc:
            stream.writer.close()
            raise host_failure(f"{self.peer}: {exc}", "4.4.2") from None
        self.stream, self.caps = stream, caps

    async def _hello(self, stream: ClientStream) -> Capabilities:
        t = self.relay.timeouts
        reply = await stream.command(proto.ehlo(self.relay.hostname), t.command)
        if reply.code // 100 == 2:
            return Capabilities.parse(reply)
        if reply.is_permanent:  # an old server without ESMTP
            reply = await stream.command(proto.helo(self.relay.hostname), t.command)
            if reply.code // 100 == 2:
                return Capabilities()
        raise host_failure(f"{self.peer} refused our EHLO/HELO: {reply}")

    async def _auth(self, stream: ClientStream, caps: Capabilities, smart: Smarthost) -> None:
        """AUTH PLAIN, else LOGIN. A refusal is temporary (a configuration problem to fix,
        not a reason to bounce mail), as Postfix's smtp_sasl_auth_soft_bounce does."""
        t = self.relay.timeouts
        if "PLAIN" in caps.auth:
            reply = await stream.command(
                proto.auth_plain(smart.username, smart.password), t.command
            )
        elif "LOGIN" in caps.auth:
            for line in proto.auth_login_steps(smart.username, smart.password):
                reply = await stream.command(line, t.command)
                if reply.code != 334:
                    break
        else:
            raise host_failure(
                f"smarthost {self.peer} offers no AUTH PLAIN or LOGIN "
                f"(it offers: {' '.join(sorted(caps.auth)) or 'none'})",
                "4.7.0",
            )
        if not 200 <= reply.code < 300:  # 235 per RFC 4954; any 2xx, as Postfix accepts
            raise host_failure(f"smarthost {self.peer} refused our credentials: {reply}", "4.7.8")
