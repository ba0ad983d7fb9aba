"""REQUIRETLS (RFC 8689) on the relay side: who may carry such a message, and its opt-out.

Two per-message statements, opposite in meaning:

- the `REQUIRETLS` MAIL parameter (kept in the queue entry as `requiretls`): the sender asks
  that every hop be verified TLS. We relay it only to a next hop whose certificate was
  verified under MTA-STS or DANE (`HostTls.source`; the web PKI alone is not enough, since
  an attacker who strips the MX look-up picks the name that is checked) and that offers
  REQUIRETLS itself, and we pass the parameter on. Any other hop gets nothing: the
  recipient bounces with 5.7.30 (§5), because retrying cannot make a hop without a policy
  grow one;
- a `TLS-Required: No` header field (§5): the sender prefers delivery to secrecy, so the
  MTA-STS and DANE policies of the destination (and our `tls_policy` table) do not defer
  the message; failures are still logged and counted for TLS-RPT. The parameter wins when
  a message carries both (§4.1: a client that sets REQUIRETLS must not send the header;
  if one does anyway, the stricter statement is the one we can keep).

Local delivery never looks at either: the message does not leave this host.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Protocol

from postier.delivery.base import StoredMessage
from postier.errors import DeliveryError
from postier.outbound.tls_policy import OPPORTUNISTIC, HostTls, Level, Source, TlsFailure
from postier.protocol.client import Capabilities

__all__ = [
    "PARAMETER",
    "hop_refusal",
    "relax",
    "relaxed_for",
    "says_tls_required_no",
    "tls_required_no",
]

PARAMETER = "REQUIRETLS"
_HEADER = b"tls-required"
_MAX_HEADER_BYTES = 256 * 1024  # a header section beyond this is not worth reading for it
_VERIFIED_BY = (Source.MTA_STS, Source.DANE)


class Hop(Protocol):
    """What `hop_refusal` needs of the relay session (postier.delivery.smtp.RelaySession)."""

    host_tls: HostTls
    tls_verified: bool
    caps: Capabilities

    @property
    def tls(self) -> bool: ...

    @property
    def peer(self) -> str: ...


def tls_required_no(message: StoredMessage) -> bool:
    """Blocking: does the message's header section carry `TLS-Required: No` (§5)?"""
    try:
        with open(message.path, "rb") as f:
            f.seek(message.content_offset)
            head = f.read(_MAX_HEADER_BYTES)
    except OSError:
        return False  # the delivery itself reports the unreadable file
    return says_tls_required_no(head)


def says_tls_required_no(content: bytes) -> bool:
    """`tls_required_no` on the message's content (or its start) already read."""
    end = content.find(b"\n\n", 0, _MAX_HEADER_BYTES)
    head = content[: end + 1] if end >= 0 else content[:_MAX_HEADER_BYTES]
    if b"tls-required" not in head.lower():  # nearly every message: no field by that name
        return False
    fields: list[bytes] = []
    for line in head.split(b"\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line  # a folded field continues
        elif line:
            fields.append(line)
    for field in fields:
        name, sep, value = field.partition(b":")
        if sep and name.strip().lower() == _HEADER:
            return value.strip().lower() == b"no"
    return False


async def relaxed_for(message: StoredMessage, content: bytes | None = None) -> bool:
    """True when the policies of the destination must not defer this message: it says
    `TLS-Required: No` and did not ask for REQUIRETLS. `content` is the message's content
    when the caller has read it already (then no file is read here)."""
    if message.requiretls:
        return False
    if content is not None:
        return says_tls_required_no(content)
    return await asyncio.to_thread(tls_required_no, message)


def relax(host_tls: HostTls) -> HostTls:
    """The same policy, reported and logged as before, but never deferring the message."""
    return dataclasses.replace(host_tls, enforce=False)


def relaxed_host(failure: TlsFailure) -> HostTls:
    """A host a policy refused before connecting (an MX outside an enforced MTA-STS
    policy, a TLSA look-up that failed): tried with opportunistic TLS instead."""
    base = failure.host_tls or OPPORTUNISTIC
    return dataclasses.replace(base, level=Level.MAY, enforce=False, noted=None)


def hop_refusal(message: StoredMessage, hop: Hop, domain: str) -> DeliveryError | None:
    """None when `hop` may carry `message`; else the permanent 5.7.30 failure saying why."""
    if not message.requiretls:
        return None
    if hop.host_tls.source not in _VERIFIED_BY:
        why = f"{domain} has no MTA-STS or DANE policy to verify {hop.peer} by"
    elif not (hop.tls and hop.tls_verified):
        why = f"TLS to {hop.peer} was not verified by {hop.host_tls.source.value}"
    elif PARAMETER not in hop.caps:
        why = f"{hop.peer} does not offer REQUIRETLS"
    else:
        return None
    return DeliveryError(f"REQUIRETLS: {why}", permanent=True, code=550, enhanced="5.7.30")
