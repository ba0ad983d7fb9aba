"""RFC 5321 paths and ESMTP parameters, with SMTPUTF8 (RFC 6531) and IDNA domains.

This runs for every MAIL and RCPT, so the common case (an ASCII dot-string at an ASCII host
name) is one compiled regular expression; the general parser and the diagnosis of errors run
only when that fails. Every rejection is an `AddressError` carrying the exact `Reply` to send,
so the server never builds reply text itself.

What the policy must know: the parser never interprets `%`, `!`, quoted `@` or source routes.
`<u%foreign@local>` is local part `u%foreign` at domain `local`; `<@local:u@foreign>` is
`u@foreign`. The domain returned is the one mail to that address would be routed by.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass

import idna

from postier.protocol.replies import Reply

__all__ = [
    "Address",
    "AddressError",
    "decode_xtext",
    "encode_xtext",
    "parse_params",
    "parse_path",
    "split_path_and_params",
]

MAX_LOCAL = 64  # RFC 5321 §4.5.3.1.1, octets
MAX_DOMAIN = 255  # §4.5.3.1.2
MAX_PATH = 256  # §4.5.3.1.3, including the angle brackets and any source route

# Non-ASCII characters allowed by RFC 6531 (UTF8-non-ascii), minus C1 controls and the lone
# surrogates that undecodable bytes become under the "surrogateescape" error handler.
_U = "\xa0-\ud7ff\ue000-\U0010ffff"
_ATEXT = "A-Za-z0-9!#$%&'*+/=?^_`{|}~\\-"
_DOT_ASCII = rf"[{_ATEXT}]++(?:\.[{_ATEXT}]++)*+"
_DOT_UTF8 = rf"[{_ATEXT}{_U}]++(?:\.[{_ATEXT}{_U}]++)*+"
# qtextSMTP is printable ASCII but `"` and `\`; quoted-pairSMTP is `\` and printable ASCII.
_QUOTED = rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_U}]|\\[\x20-\x7e])*+"'
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = rf"(?>{_LABEL})(?:\.(?>{_LABEL}))*+"
# A domain token for the structural parse only; its content is validated separately.
_DTOKEN = r'(?:\[[^\[\]]*\]|[^@<>\[\]",:\\ ]+)'

_FAST = re.compile(rf"<({_DOT_ASCII})@({_HOSTNAME})>")
_STRUCT = re.compile(
    rf"<(?:(?P<route>@{_DTOKEN}(?:,@{_DTOKEN})*+):)?"
    rf"(?P<local>{_DOT_UTF8}|{_QUOTED})@(?P<domain>{_DTOKEN})>"
)
_DOT_STRING = re.compile(_DOT_UTF8)
_HOST = re.compile(_HOSTNAME)
_ROUTE_SPLIT = re.compile(rf"@({_DTOKEN})")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_QUOTED_PAIR = re.compile(r"\\(.)")
_NEEDS_ESCAPE = re.compile(r'(["\\])')
_IPV4 = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}", re.ASCII)
_IPV6_CHARS = re.compile(r"[0-9A-Fa-f:.]+")
_GENERAL_LITERAL = re.compile(r"[A-Za-z0-9-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+")
# The source route at the start of a path, for the diagnosis of bad paths.
_ROUTE_PREFIX = re.compile(r"^@(?:\[[^\]]*\]|[^,:@\[])*(?:,@(?:\[[^\]]*\]|[^,:@\[])*)*:")
# Finds `>` outside a quoted string; the first branch consumes whole quoted strings.
_PATH_END = re.compile(r'<(?:"(?:[^"\\]|\\.)*+"|[^">])*+>', re.DOTALL)
_PARAM_ASCII = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*+)(?:=([\x21-\x3c\x3e-\x7e]++))?")
_PARAM_UTF8 = re.compile(rf"([A-Za-z0-9][A-Za-z0-9-]*+)(?:=([\x21-\x3c\x3e-\x7e{_U}]++))?")
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-Fa-f]{2})*+")
_XTEXT_HEX = re.compile(r"\+([0-9A-Fa-f]{2})")


class AddressError(Exception):
    """A path or parameter was rejected; `reply` is exactly what to send to the client."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


@dataclass(frozen=True, slots=True)
class Address:
    """A mailbox: `local` is the unquoted local part, `domain` lowercased.

    `domain` is "" only for the bare `postmaster` recipient (RFC 5321 §4.1.1.3). Address
    literals are stored canonically: `[192.0.2.1]` or `[IPv6:2001:db8::1]` (compressed).
    """

    local: str
    domain: str

    def __str__(self) -> str:
        """The wire form, quoting the local part only when it is not a valid dot-string.

        Control characters cannot be quoted in SMTP at all; parse_path never produces them.
        """
        local = self.local
        if not _DOT_STRING.fullmatch(local):
            local = '"' + _NEEDS_ESCAPE.sub(r"\\\1", local) + '"'
        return f"{local}@{self.domain}" if self.domain else local

    @property
    def needs_smtputf8(self) -> bool:
        """True when relaying this address requires the peer to offer SMTPUTF8."""
        return not (self.local.isascii() and self.domain.isascii())

    @property
    def is_address_literal(self) -> bool:
        return self.domain.startswith("[")

    @property
    def domain_ascii(self) -> str:
        """The domain in A-label form, for DNS and for comparing against configured domains."""
        return self.domain if self.domain.isascii() else _to_alabels(self.domain)

    @property
    def literal_ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        """The IP address of an address-literal domain, else None."""
        if not self.is_address_literal:
            return None
        text = self.domain[1:-1]
        return ipaddress.ip_address(text[5:] if text[:5].lower() == "ipv6:" else text)


@functools.lru_cache(maxsize=1024)
def _to_alabels(domain: str) -> str:
    # strict=True: only "." separates labels, so the stored domain and its A-label agree.
    return idna.encode(domain, strict=True).decode("ascii")


def _syntax(sender: bool, detail: str) -> AddressError:
    kind = "sender" if sender else "recipient"
    return AddressError(Reply(501, "5.1.7" if sender else "5.1.3", f"Bad {kind} address: {detail}"))


def _bad_brackets() -> AddressError:
    return AddressError(Reply(501, "5.5.4", "Syntax error: path must be enclosed in <>"))


def _octets(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def split_path_and_params(arg: str) -> tuple[str, str]:
    """Split what follows `MAIL FROM:` / `RCPT TO:` into (`<path>`, parameter text).

    Spaces after the colon are tolerated because many clients send one. A `>` inside a
    quoted local part does not end the path; parameters must follow the path after a space.
    """
    text = arg.lstrip(" \t")
    m = _PATH_END.match(text)
    if m is None:
        # An unbalanced quote: cut at the first `>` so parse_path can say what is wrong.
        end = text.find(">") if text.startswith("<") else -1
        if end < 0:
            raise _bad_brackets()
        path, rest = text[: end + 1], text[end + 1 :]
    else:
        path, rest = m.group(), text[m.end() :]
    if rest and rest[0] not in " \t":
        raise AddressError(Reply(501, "5.5.4", "Syntax error: expected a space after the path"))
    return path, rest.strip(" \t")


def parse_path(
    path_text: str, *, utf8: bool, null_ok: bool, bare_postmaster_ok: bool, sender: bool
) -> Address | None:
    """Parse an RFC 5321 reverse- or forward-path, `<...>` included; None for `<>`.

    `utf8` says whether the client declared SMTPUTF8; `sender` only chooses the enhanced
    code (5.1.7 for a bad sender, 5.1.3 for a bad recipient) and the wording.
    """
    if len(path_text) <= MAX_PATH and (m := _FAST.fullmatch(path_text)):
        local, domain = m.group(1, 2)
        if len(local) <= MAX_LOCAL and not domain.rpartition(".")[2].isdigit():
            return Address(local, domain.lower())
    if len(path_text) < 2 or path_text[0] != "<" or path_text[-1] != ">":
        raise _bad_brackets()
    if _CONTROL.search(path_text):
        raise _syntax(sender, "control characters are not allowed")
    if not utf8 and not path_text.isascii():
        raise AddressError(Reply(553, "5.6.7", "Non-ASCII address requires the SMTPUTF8 parameter"))
    inner = path_text[1:-1]
    if not inner:
        if null_ok:
            return None
        raise _syntax(sender, "the null path <> is not allowed here")
    if "@" not in inner:
        if bare_postmaster_ok and inner.lower() == "postmaster":
            return Address("postmaster", "")
        raise _syntax(sender, "a domain is required (user@domain)")
    m = _STRUCT.fullmatch(path_text)
    if m is None:
        raise _syntax(sender, _diagnose(inner))
    raw_local, raw_domain = m.group("local", "domain")
    if _octets(raw_local) > MAX_LOCAL:
        raise _syntax(sender, f"local part longer than {MAX_LOCAL} octets")
    if _octets(raw_domain) > MAX_DOMAIN:
        raise _syntax(sender, f"domain longer than {MAX_DOMAIN} octets")
    if _octets(path_text) > MAX_PATH:
        raise _syntax(sender, f"path longer than {MAX_PATH} octets")
    route = m.group("route")
    if route:
        # RFC 5321 §4.1.2: a source route must be accepted, and is ignored; check its form.
        for hop in _ROUTE_SPLIT.findall(route):
            _check_domain(hop, sender)
    local = raw_local
    if local[0] == '"':
        local = _QUOTED_PAIR.sub(r"\1", local[1:-1])
        if not local:
            raise _syntax(sender, "empty local part")
    return Address(local, _check_domain(raw_domain, sender))


def _check_domain(text: str, sender: bool) -> str:
    """Validate a domain or address literal; return its stored (lowercased/canonical) form."""
    if text[0] == "[":
        return _check_literal(text[1:-1], sender)
    domain = text.lower()
    if domain.rpartition(".")[2].isdigit():
        raise _syntax(sender, f"{text!r} is not a domain name (use [brackets] for an IP)")
    if domain.isascii():
        if not _HOST.fullmatch(domain):
            raise _syntax(sender, f"invalid domain {text!r}")
        return domain
    if "" in domain.split("."):
        raise _syntax(sender, f"invalid domain {text!r}")
    try:
        _to_alabels(domain)
    except (UnicodeError, ValueError) as exc:
        raise _syntax(sender, f"invalid internationalized domain: {exc}") from None
    return domain


def _check_literal(body: str, sender: bool) -> str:
    """Accept IPv4 and IPv6 address literals (RFC 5321 §4.1.3); store them canonically."""
    try:
        if body[:5].lower() == "ipv6:":
            if not _IPV6_CHARS.fullmatch(body, 5):  # ipaddress would accept a %scope
                raise ValueError(body)
            return f"[IPv6:{ipaddress.IPv6Address(body[5:]).compressed}]"
        if _IPV4.fullmatch(body):
            return f"[{ipaddress.IPv4Address(body)}]"
    except ValueError:
        raise _syntax(sender, f"invalid IP address literal [{body}]") from None
    if _GENERAL_LITERAL.fullmatch(body):
        raise _syntax(sender, f"unsupported address literal [{body}]")
    raise _syntax(sender, f"invalid address literal [{body}]")


def _diagnose(inner: str) -> str:
    """Name the most likely mistake in a path that failed the grammar (error path only)."""
    unquoted = _ROUTE_PREFIX.sub("", re.sub(r'"(?:[^"\\]|\\.)*"', '""', inner), count=1)
    if unquoted.count('"') % 2:
        return "unbalanced quote"
    ats = unquoted.count("@")
    if ats > 1:
        return "more than one @ outside quotes"
    if ats == 0:
        return "a domain is required (user@domain)"
    local, _, domain = unquoted.rpartition("@")
    if not domain:
        return "missing domain after @"
    if not local:
        return "missing local part before @"
    if local.startswith(".") or local.endswith(".") or ".." in local:
        return "empty atom in the local part (misplaced dot)"
    return "invalid syntax (RFC 5321 §4.1.2)"


def parse_params(params_text: str, *, utf8: bool = False) -> dict[str, str | None]:
    """Parse space-separated `KEYWORD[=value]` ESMTP parameters; keys are upper-cased.

    With `utf8` (SMTPUTF8 declared), values may contain UTF-8 as RFC 6531 §3.3 allows.
    """
    pattern = _PARAM_UTF8 if utf8 else _PARAM_ASCII
    params: dict[str, str | None] = {}
    for word in params_text.split(" "):
        if not word:
            continue
        m = pattern.fullmatch(word)
        if m is None:
            raise AddressError(Reply(501, "5.5.4", f"Malformed parameter {word[:40]!r}"))
        key = m.group(1).upper()
        if key in params:
            raise AddressError(Reply(501, "5.5.4", f"Duplicate parameter {key}"))
        params[key] = m.group(2)
    return params


def decode_xtext(s: str) -> str:
    """Decode RFC 3461 xtext (`+HH` escapes), as in ORCPT and ENVID; ValueError if invalid.

    Lowercase hex digits are accepted although the RFC asks for uppercase: being liberal
    there costs nothing. The decoded octets must be UTF-8.
    """
    if not _XTEXT.fullmatch(s):
        raise ValueError(f"invalid xtext: {s[:40]!r}")
    if "+" not in s:
        return s
    raw = _XTEXT_HEX.sub(lambda m: chr(int(m.group(1), 16)), s)
    return raw.encode("latin-1").decode("utf-8")


def encode_xtext(s: str) -> str:
    """Encode text as RFC 3461 xtext, for passing ORCPT/ENVID on when relaying."""
    out = []
    for byte in s.encode("utf-8"):
        if 0x21 <= byte <= 0x7E and byte not in (0x2B, 0x3D):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)
