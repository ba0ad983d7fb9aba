"""The TLS half of a relay session: what the next hop's TLS policy demands, and what
happens when it fails.

Kept apart from postier.delivery.smtp (connections, routing, AUTH) because it is the part
the policy work (tls_policy levels, MTA-STS, DANE, REQUIRETLS, TLS-RPT counts) changes, and
it reads and sets only the session's TLS state, declared below.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import replace
from typing import Protocol

from postier.delivery.base import RecipientResult
from postier.delivery.client import ClientStream, Timeouts
from postier.errors import DeliveryError
from postier.log import event
from postier.outbound import dane, requiretls
from postier.outbound.tls_policy import (
    DomainTls,
    HostTls,
    Level,
    Source,
    TlsFailure,
    TlsPolicy,
)
from postier.protocol import client as proto
from postier.protocol.client import Capabilities, ClientProtocolError
from postier.tls import peer_chain

log = logging.getLogger("postier.delivery.smtp")


def host_failure(text: str, enhanced: str = "4.4.1") -> DeliveryError:
    """A temporary failure toward this host: the queue tries again (or the next MX)."""
    return DeliveryError(text, permanent=False, code=451, enhanced=enhanced)


class SmarthostTls(Protocol):
    verify: bool  # verify its certificate (else encrypt only)


class RelayTlsSettings(Protocol):
    """What the TLS half needs of the relay (`SmtpRelay` has it)."""

    smarthost: SmarthostTls | None
    tls_policy: TlsPolicy
    timeouts: Timeouts
    tls_context: ssl.SSLContext  # encrypt only
    verify_context: ssl.SSLContext  # certificate and name checked


class NextHopTls:
    """Mixed into `RelaySession`: the policy decisions and the STARTTLS step."""

    relay: RelayTlsSettings
    domain: str
    stream: ClientStream | None
    host: str
    host_tls: HostTls
    tls_verified: bool
    tls_failure: str
    local_ip: str
    relaxed: bool
    # properties of RelaySession: is the connection under TLS, and the host's name for logs
    tls: bool
    peer: str

    def tls_state(self, connected: bool = True) -> str:
        """`verified`, `encrypted` or `none`: the `tls=` field of the delivery log line."""
        if not connected or not self.tls:
            return "none"
        return "verified" if self.tls_verified else "encrypted"

    def _with_tls(self, results: list[RecipientResult]) -> list[RecipientResult]:
        """Stamp each result with the policy that applied and the last TLS failure, so the
        queue can show them per recipient (`postier queue show`)."""
        policy = self.host_tls.source.value
        return [replace(r, tls_policy=policy, tls_failure=self.tls_failure) for r in results]

    async def _domain_tls(self) -> DomainTls:
        """A smarthost is always `verify` (or `encrypt` when so configured); MX hosts get
        what the policy decides for the domain (tls_policy table, DANE, MTA-STS, `may`)."""
        smart = self.relay.smarthost
        if smart is not None:
            level = Level.VERIFY if smart.verify else Level.ENCRYPT
            return DomainTls.fixed(self.domain, HostTls(level, Source.SMARTHOST))
        try:
            return await self.relay.tls_policy.for_domain(self.domain)
        except DeliveryError:
            raise
        except Exception as exc:  # a bug must defer the message, neither crash nor downgrade
            log.exception("TLS policy decision for %s failed", self.domain)
            raise host_failure(
                f"TLS policy decision for {self.domain} failed: {exc!r}", "4.7.5"
            ) from None

    async def _host_tls(self, qid: str, domain_tls: DomainTls, host: str) -> HostTls:
        """The requirement for one MX host; DeliveryError when the policy refuses the host
        (an MX outside an enforced MTA-STS policy) or its TLSA look-up failed."""
        try:
            host_tls = await domain_tls.for_host(host)
            if host_tls.noted is not None:  # MTA-STS testing: report, log and go on
                self._note_failure(qid, host, host_tls.noted)
            return host_tls
        except TlsFailure as failure:
            if self.relaxed:  # TLS-Required: No: counted and logged, then tried anyway
                self._note_failure(qid, host, failure)
                return requiretls.relaxed_host(failure)
            if failure.host_tls is not None:
                self.host_tls = failure.host_tls
            self._record_failure("tls_refused", qid, host, failure)
            raise host_failure(str(failure), failure.enhanced) from None
        except DeliveryError:
            raise
        except Exception as exc:  # as in _domain_tls: defer, never crash nor downgrade
            log.exception("TLS policy decision for %s failed", host)
            raise host_failure(f"TLS policy decision for {host} failed: {exc!r}", "4.7.5") from None

    def _note_failure(self, qid: str, host: str, failure: TlsFailure) -> None:
        """A failure the policy lets pass (MTA-STS testing, `TLS-Required: No`)."""
        self._record_failure("tls_failed", qid, host, failure, action="continue")

    def _record_failure(
        self, name: str, qid: str, host: str, failure: TlsFailure, **extra: object
    ) -> None:
        """Keep the failure for the queue, count it for TLS-RPT, and log it."""
        self.tls_failure = f"{failure.result_type}: {failure}"
        if failure.host_tls is not None:
            self.relay.tls_policy.record_failure(failure.host_tls, failure, host, "")
        event(
            name,
            logging.WARNING,
            log,
            qid=qid,
            domain=self.domain,
            host=host,
            policy=failure.source,
            result=failure.result_type,
            reason=str(failure),
            **extra,
        )

    async def _starttls(
        self, stream: ClientStream, caps: Capabilities, host_tls: HostTls, sni: str
    ) -> Capabilities:
        """STARTTLS as `host_tls` asks, then the checks the handshake cannot do (DANE).

        Returns the capabilities said again over TLS (what was said in plaintext is
        forgotten), or the plaintext ones when a `may` host offers no STARTTLS. Raises
        TlsFailure, with its TLS-RPT result type, when the host falls short.
        """
        relay, t = self.relay, self.relay.timeouts
        smart = host_tls.source is Source.SMARTHOST
        if "STARTTLS" not in caps and not smart:
            if host_tls.level is Level.MAY:
                return caps
            raise TlsFailure("starttls-not-supported", f"{self.peer} does not offer STARTTLS")
        verify = host_tls.level is Level.VERIFY and not smart
        context = relay.verify_context if verify else relay.tls_context
        try:
            reply = await stream.command(proto.STARTTLS, t.command)
            if reply.code != 220:
                if host_tls.level is Level.MAY:
                    event(
                        "starttls_refused",
                        logger=log,
                        domain=self.domain,
                        host=self.host,
                        addr=self.address,
                        reply=str(reply),
                    )
                    return caps
                raise TlsFailure("starttls-not-supported", f"{self.peer} refused STARTTLS: {reply}")
            await stream.starttls(context, sni, t.command)
        except ssl.SSLCertVerificationError as exc:
            raise TlsFailure.from_verification(exc, self.peer) from None
        except (OSError, ClientProtocolError) as exc:
            why = "timeout" if isinstance(exc, TimeoutError) else str(exc) or repr(exc)
            raise TlsFailure(
                "validation-failure", f"TLS handshake with {self.peer}: {why}", enhanced="4.7.5"
            ) from None
        if host_tls.level is Level.DANE and not smart:
            dane.check(host_tls.tlsa, peer_chain(stream), self.host)  # TlsFailure: no match
        if smart:
            self.tls_verified = relay.smarthost is not None and relay.smarthost.verify
        else:
            self.tls_verified = host_tls.level in (Level.VERIFY, Level.DANE)
        relay.tls_policy.record_success(host_tls, self.host, self.address, sending_ip=self.local_ip)
        return await self._hello(stream)

    def _after_tls_failure(self, qid: str, host_tls: HostTls, failure: TlsFailure) -> HostTls:
        """Defer when the level requires TLS; else the level to reconnect with.

        `may` falls back to plaintext (RFC 7435: plaintext beats no delivery); MTA-STS
        `testing` reports the failure and goes on with opportunistic TLS (RFC 8461 §5).
        """
        self.tls_failure = f"{failure.result_type}: {failure}"
        self.relay.tls_policy.record_failure(
            host_tls, failure, self.host, self.address, sending_ip=self.local_ip
        )
        if host_tls.source is Source.SMARTHOST:
            raise host_failure(
                f"TLS with smarthost {self.peer} failed: {failure}", failure.enhanced
            )
        about: dict[str, object] = {  # what both lines below say, in this order
            "host": self.host,
            "addr": self.address,
            "port": self.port,
            "policy": host_tls.source.value,
            "result": failure.result_type,
            "reason": str(failure),
        }
        if host_tls.required:
            event("tls_refused", logging.WARNING, log, qid=qid, domain=self.domain, **about)
            raise host_failure(
                f"TLS required by {host_tls.source.value} policy for {self.host}: {failure}",
                failure.enhanced,
            )
        fallback = Level.NONE if host_tls.level is Level.MAY else Level.MAY
        action = "plaintext" if fallback is Level.NONE else "may"
        event("tls_failed", logging.WARNING, log, qid=qid, **about, action=action)
        return HostTls(fallback, host_tls.source, enforce=False)
