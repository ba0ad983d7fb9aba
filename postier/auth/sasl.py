"""SASL server mechanisms PLAIN (RFC 4616) and LOGIN, sans-I/O.

No sockets, no asyncio, no password checking: the session feeds client lines in and gets
back what to do next, so every reply code is testable by calling functions. The caller:

    step = sasl.start(mechanism, initial_response)      # from `AUTH <mech> [ir]`
    while isinstance(step, sasl.Challenge):
        send(f"334 {step.b64_text}")
        step = step.exchange.step(read_line())          # line without CRLF
    if isinstance(step, sasl.Credentials): verify in the thread pool, then 235 or 535
    else: send step.reply (a Failure)

Failures with code 535 are wrong credentials in the making and should count towards the
per-session limit and the per-IP throttle; 501/504 are protocol errors.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass, field

from postier.protocol.replies import (
    AUTH_BAD_BASE64,
    AUTH_CANCELLED,
    AUTH_FAILED,
    AUTH_MECH_UNKNOWN,
    Reply,
)

MECHANISMS = ("PLAIN", "LOGIN")

USERNAME_CHALLENGE = "VXNlcm5hbWU6"  # base64("Username:")
PASSWORD_CHALLENGE = "UGFzc3dvcmQ6"  # base64("Password:")

# Identities end up in logs and Received: headers; control characters have no business there.
_BAD_ID = re.compile(r"[\x00-\x1f\x7f]")
_BAD_PASSWORD = re.compile(r"[\x00\r\n]")


@dataclass(frozen=True, slots=True)
class Challenge:
    """Send ``334 <b64_text>`` and pass the client's next line to ``exchange.step``."""

    b64_text: str
    exchange: Exchange = field(compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Credentials:
    """The exchange is complete; the caller verifies username/password (authzid == username
    or empty, already checked)."""

    authzid: str
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Failure:
    """The exchange is over without credentials. `reason` is for the log, not the client."""

    code: int
    enhanced: str
    text: str
    reason: str = ""

    @classmethod
    def of(cls, reply: Reply, reason: str = "") -> Failure:
        return cls(reply.code, reply.enhanced or "", reply.lines[0], reason)

    @property
    def reply(self) -> Reply:
        return Reply(self.code, self.enhanced, self.text)


Step = Challenge | Credentials | Failure


class Exchange:
    """One mechanism's state. `step()` after the exchange is over keeps returning Failure."""

    first_challenge = ""

    def __init__(self) -> None:
        self.done = False

    def first(self, initial_response: str | None) -> Step:
        """Handle the optional initial response of the AUTH command itself."""
        if initial_response is None:
            return Challenge(self.first_challenge, self)
        data = _decode(initial_response, initial=True)
        if isinstance(data, Failure):
            return self._finish(data)
        return self._receive(data)

    def step(self, client_line: str) -> Step:
        """Feed one client line (base64 or ``*``, without CRLF)."""
        if self.done:
            return self._finish(Failure.of(AUTH_FAILED, "exchange already finished"))
        data = _decode(client_line, initial=False)
        if isinstance(data, Failure):
            return self._finish(data)
        return self._receive(data)

    def _receive(self, data: bytes) -> Step:  # pragma: no cover - abstract
        raise NotImplementedError

    def _finish(self, result: Credentials | Failure) -> Credentials | Failure:
        self.done = True
        return result


def start(mechanism: str, initial_response: str | None = None) -> Step:
    """Begin `AUTH <mechanism> [initial_response]`; mechanism names are case-insensitive."""
    mech = mechanism.upper()
    if mech == "PLAIN":
        return PlainExchange().first(initial_response)
    if mech == "LOGIN":
        return LoginExchange().first(initial_response)
    return Failure.of(AUTH_MECH_UNKNOWN, "unknown mechanism")


class PlainExchange(Exchange):
    """RFC 4616: one message ``authzid NUL authcid NUL passwd``; empty first challenge."""

    def _receive(self, data: bytes) -> Step:
        parts = data.split(b"\x00")
        if len(parts) != 3:
            return self._finish(Failure.of(AUTH_FAILED, "malformed PLAIN message"))
        fields = _utf8(parts)
        if fields is None:
            return self._finish(Failure.of(AUTH_FAILED, "PLAIN message is not UTF-8"))
        authzid, authcid, password = fields
        if authzid and authzid != authcid:
            return self._finish(Failure.of(AUTH_FAILED, "authorization identity differs"))
        return self._finish(_credentials(authzid, authcid, password))


class LoginExchange(Exchange):
    """The LOGIN mechanism (draft-murchison-sasl-login): username, then password.

    An initial response is the username, so the next challenge asks for the password.
    """

    first_challenge = USERNAME_CHALLENGE

    def __init__(self) -> None:
        super().__init__()
        self._username: str | None = None

    def _receive(self, data: bytes) -> Step:
        fields = _utf8([data])
        if fields is None:
            return self._finish(Failure.of(AUTH_FAILED, "LOGIN response is not UTF-8"))
        if self._username is None:
            self._username = fields[0]
            return Challenge(PASSWORD_CHALLENGE, self)
        return self._finish(_credentials("", self._username, fields[0]))


def _decode(line: str, *, initial: bool) -> bytes | Failure:
    """Base64 to bytes; ``*`` cancels; ``=`` is the empty initial response (RFC 4954)."""
    line = line.strip(" \t")
    if line == "*":
        return Failure.of(AUTH_CANCELLED, "client cancelled")
    if initial and line == "=":
        return b""
    # Length check too: Python's decoder otherwise accepts stray padding such as "QUJD=".
    if len(line) % 4 == 0:
        try:
            return binascii.a2b_base64(line.encode("ascii"), strict_mode=True)
        except (binascii.Error, UnicodeEncodeError, ValueError):
            pass
    return Failure.of(AUTH_BAD_BASE64, "undecodable base64")


def _utf8(parts: list[bytes]) -> list[str] | None:
    try:
        return [p.decode("utf-8") for p in parts]
    except UnicodeDecodeError:
        return None


def _credentials(authzid: str, username: str, password: str) -> Credentials | Failure:
    """Final checks shared by both mechanisms: non-empty, no control characters."""
    if not username or not password:
        return Failure.of(AUTH_FAILED, "empty username or password")
    if _BAD_ID.search(username) or _BAD_ID.search(authzid):
        return Failure.of(AUTH_FAILED, "control character in identity")
    if _BAD_PASSWORD.search(password):
        return Failure.of(AUTH_FAILED, "NUL, CR or LF in password")
    return Credentials(authzid, username, password)
