"""The DSN extension's parameters (RFC 3461): RET and ENVID on MAIL, NOTIFY and ORCPT on RCPT.

Parsing is strict and says exactly what is wrong (a client that sends a bad xtext wants to
know which character), because a value we accept travels on: it is written to the queue
entry, passed to the next hop and printed in the reports. Values are kept decoded (plain
text); `mail_params`/`rcpt_params` encode them again for a next hop that speaks DSN.

An absent NOTIFY is not the same as `NOTIFY=FAILURE,DELAY`: RFC 3461 §4.1 lets the MTA
choose then, and a next hop must see it absent too. `RcptDsn.notify` is therefore () when
the client gave none, and the accessors `wants_*` apply our default (failure and delay).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from postier.protocol.replies import Reply

# The xtext codec lives in `postier.protocol.address`, which needs idna. It is imported where
# it is used: the value types below reach `postier sendmail` (through `delivery.base`),
# which any local user runs and which must not need more than the standard library.

__all__ = [
    "NO_MAIL_DSN",
    "NO_RCPT_DSN",
    "DsnError",
    "MailDsn",
    "RcptDsn",
    "mail_params",
    "parse_mail_dsn",
    "parse_rcpt_dsn",
    "rcpt_params",
    "xtext_problem",
]

NOTIFY_VALUES = frozenset({"NEVER", "SUCCESS", "FAILURE", "DELAY"})
MAX_ENVID = 100  # RFC 3461 §4.4: at most 100 characters, as sent (xtext)
MAX_ORCPT_ADDRESS = 500  # RFC 3461 §4.2: the encoded address; generous for SMTPUTF8
_ADDR_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_XCHAR_OK = re.compile(r"[\x21-\x2a\x2c-\x3c\x3e-\x7e]")
_HEX = frozenset("0123456789ABCDEFabcdef")


class DsnError(ValueError):
    """A DSN parameter the client got wrong; `reply` is the 501 to send."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.reply = Reply(501, "5.5.4", text)


@dataclass(frozen=True, slots=True)
class MailDsn:
    """MAIL's DSN parameters: `ret` is "FULL", "HDRS" or "" (absent), `envid` decoded."""

    ret: str = ""
    envid: str = ""


@dataclass(frozen=True, slots=True)
class RcptDsn:
    """RCPT's DSN parameters: `notify` in the client's order, () when absent; `orcpt` is
    `addr-type;address` with the address decoded, "" when absent."""

    notify: tuple[str, ...] = ()
    orcpt: str = ""

    @property
    def notify_text(self) -> str:
        """How the queue entry keeps NOTIFY: comma-separated, "" when absent."""
        return ",".join(self.notify)

    @classmethod
    def from_text(cls, notify: str, orcpt: str = "") -> RcptDsn:
        """The inverse of `notify_text` (a queue entry's value)."""
        return cls(tuple(v for v in notify.upper().split(",") if v), orcpt)


NO_MAIL_DSN = MailDsn()
NO_RCPT_DSN = RcptDsn()


def wants_failure(notify: str) -> bool:
    """Report a failure for this NOTIFY text (as `RcptDsn.notify_text`)? Default: yes."""
    return not notify or "FAILURE" in notify.upper().split(",")


def wants_delay(notify: str) -> bool:
    """Warn about a delay for this NOTIFY text? Default (absent): yes, as before DSN."""
    return not notify or "DELAY" in notify.upper().split(",")


def wants_success(notify: str) -> bool:
    """Report a success (delivered or relayed)? Only when asked for."""
    return "SUCCESS" in notify.upper().split(",")


def xtext_problem(value: str) -> str | None:
    """What is wrong with `value` as xtext (RFC 3461 §4), or None when it is valid."""
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "+":
            pair = value[i + 1 : i + 3]
            if len(pair) < 2:
                return f"'+' at position {i + 1} needs two hex digits"
            bad = next((c for c in pair if c not in _HEX), None)
            if bad is not None:
                return f"bad hexchar {bad!r} after '+' at position {i + 1}"
            i += 3
            continue
        if not _XCHAR_OK.fullmatch(ch):
            return f"character {ch!r} at position {i + 1} must be written as +{ord(ch):02X}"
        i += 1
    from postier.protocol.address import decode_xtext

    try:
        decode_xtext(value)
    except (ValueError, UnicodeDecodeError):
        return "the +HH escapes do not decode as UTF-8"
    return None


def _xtext(name: str, value: str | None) -> str:
    if value is None or value == "":
        raise DsnError(f"Syntax: {name}=<xtext>")
    problem = xtext_problem(value)
    if problem is not None:
        raise DsnError(f"{name}: invalid xtext: {problem}")
    from postier.protocol.address import decode_xtext

    return decode_xtext(value)


def parse_mail_dsn(params: dict[str, str | None]) -> MailDsn:
    """RET and ENVID from MAIL's parameters (others are not looked at); DsnError if bad."""
    ret = ""
    envid = ""
    if "RET" in params:
        value = (params["RET"] or "").upper()
        if value not in ("FULL", "HDRS"):
            raise DsnError("Syntax: RET=FULL or RET=HDRS")
        ret = value
    if "ENVID" in params:
        raw = params["ENVID"] or ""
        if len(raw) > MAX_ENVID:
            raise DsnError(f"ENVID longer than {MAX_ENVID} characters")
        envid = _xtext("ENVID", raw)
    return MailDsn(ret, envid)


def parse_rcpt_dsn(params: dict[str, str | None]) -> RcptDsn:
    """NOTIFY and ORCPT from RCPT's parameters (others are not looked at); DsnError if bad."""
    notify: tuple[str, ...] = ()
    orcpt = ""
    if "NOTIFY" in params:
        words = (params["NOTIFY"] or "").upper().split(",")
        unknown = [w for w in words if w not in NOTIFY_VALUES]
        if unknown:
            raise DsnError(
                f"NOTIFY: unknown value {unknown[0][:20]!r} (NEVER, or SUCCESS,FAILURE,DELAY)"
            )
        if len(set(words)) != len(words):
            raise DsnError("NOTIFY: a value is repeated")
        if "NEVER" in words and len(words) > 1:
            raise DsnError("NOTIFY=NEVER cannot be combined with other values")
        notify = tuple(words)
    if "ORCPT" in params:
        raw = params["ORCPT"] or ""
        addr_type, semi, encoded = raw.partition(";")
        if not semi or not _ADDR_TYPE.fullmatch(addr_type) or not encoded:
            raise DsnError("Syntax: ORCPT=addr-type;xtext (e.g. ORCPT=rfc822;user+40example.org)")
        if len(encoded) > MAX_ORCPT_ADDRESS:
            raise DsnError(f"ORCPT address longer than {MAX_ORCPT_ADDRESS} characters")
        orcpt = f"{addr_type};{_xtext('ORCPT', encoded)}"
    return RcptDsn(notify, orcpt)


def mail_params(ret: str, envid: str) -> dict[str, str | None]:
    """MAIL parameters that pass RET/ENVID on to a next hop that advertises DSN."""
    from postier.protocol.address import encode_xtext

    params: dict[str, str | None] = {}
    if ret:
        params["RET"] = ret
    if envid:
        params["ENVID"] = encode_xtext(envid)
    return params


def rcpt_params(notify: str, orcpt: str) -> dict[str, str | None]:
    """RCPT parameters that pass NOTIFY/ORCPT on to a next hop that advertises DSN."""
    from postier.protocol.address import encode_xtext

    params: dict[str, str | None] = {}
    if notify:
        params["NOTIFY"] = notify
    if orcpt:
        addr_type, _, address = orcpt.partition(";")
        params["ORCPT"] = f"{addr_type};{encode_xtext(address)}"
    return params
