"""The Authentication-Results header field (RFC 8601) and recognising our own in incoming mail.

Why values are quoted carefully: the field is read by filters (Sieve, rspamd, mail clients)
that parse it, and the values come from the peer (the MAIL FROM address, d=, s=, b=). A value
that is not an RFC 2045 token or a plain address goes out as a quoted-string, and comments
carry only our own text with parentheses and control characters removed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from postier.mailauth.dkim_verify import DkimResult
from postier.mailauth.dmarc import DmarcResult
from postier.mailauth.spf import SpfResult

_TOKEN = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~\x80-\U0010ffff]+")  # RFC 2045, UTF-8 allowed
_DOT_ATOM = re.compile(
    r"[!#$%&'*+\-/=?^_`{|}~0-9A-Za-z\x80-\U0010ffff]+(\.[!#$%&'*+\-/=?^_`{|}~0-9A-Za-z\x80-\U0010ffff]+)*"
)
_DOMAIN = re.compile(
    r"[0-9A-Za-z\x80-\U0010ffff]([0-9A-Za-z\-.\x80-\U0010ffff]*[0-9A-Za-z\x80-\U0010ffff])?"
)
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")
MAX_COMMENT = 120


def _quoted(text: str) -> str:
    text = _UNSAFE.sub("", text)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def pvalue(text: str) -> str:
    """`text` as an RFC 8601 pvalue: a token, local-part@domain, or a quoted-string."""
    if _TOKEN.fullmatch(text):
        return text
    local, at, domain = text.rpartition("@")
    if at and _DOMAIN.fullmatch(domain) and (not local or _DOT_ATOM.fullmatch(local)):
        return text
    return _quoted(text)


def comment(text: str) -> str:
    """` (text)` with what could end or nest the comment removed; empty text gives ""."""
    text = _UNSAFE.sub(" ", text).replace("(", "[").replace(")", "]").replace("\\", "/")
    text = " ".join(text.split())[:MAX_COMMENT]
    return f" ({text})" if text else ""


def _spf(spf: SpfResult) -> str:
    why = "" if spf.result == "pass" else comment(spf.reason)
    if spf.identity == "helo":
        return f"spf={spf.result}{why} smtp.helo={pvalue(spf.sender or spf.domain or '.')}"
    return f"spf={spf.result}{why} smtp.mailfrom={pvalue(spf.sender or spf.domain)}"


def _dkim(d: DkimResult) -> str:
    parts = [f"dkim={d.result}{'' if d.result == 'pass' else comment(d.reason)}"]
    if d.domain:
        parts.append(f"header.d={pvalue(d.domain)}")
    if d.selector:
        parts.append(f"header.s={pvalue(d.selector)}")
    if d.signature:
        parts.append(f"header.b={pvalue(d.signature)}")
    return " ".join(parts)


def _dmarc(d: DmarcResult) -> str:
    note = f"p={d.policy} dis={d.disposition}" if d.policy else d.reason
    text = f"dmarc={d.result}{comment(note)}"
    if d.from_domain:
        text += f" header.from={pvalue(d.from_domain)}"
    return text


def render(
    authserv_id: str, spf: SpfResult, dkim: Sequence[DkimResult], dmarc: DmarcResult
) -> bytes:
    """The whole field, LF line ends, one result per folded line."""
    results = [_spf(spf)]
    results.extend([_dkim(d) for d in dkim] or ["dkim=none"])
    results.append(_dmarc(dmarc))
    text = f"Authentication-Results: {pvalue(authserv_id)};\n\t" + ";\n\t".join(results) + "\n"
    return text.encode("utf-8")


def _skip_cfws(text: str, i: int) -> int:
    """Index of the first character after white space and (nested) comments from `i`."""
    depth = 0
    while i < len(text):
        c = text[i]
        if depth:
            if c == "\\":
                i += 1
            elif c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
        elif c == "(":
            depth = 1
        elif c not in " \t\r\n":
            break
        i += 1
    return i


def claims_authserv_id(header_value: bytes, authserv_id: str) -> bool:
    """True when an Authentication-Results value names `authserv_id` (RFC 8601 §5).

    Such a field in incoming mail is a forgery (or our own verdict from an earlier hop of the
    same host) and must be removed before ours is added. Case-insensitive, as for host names.
    """
    text = header_value.decode("utf-8", "replace")
    i = _skip_cfws(text, 0)
    if text[i : i + 1] == '"':
        m = re.match(r'"((?:[^"\\]|\\.)*)"', text[i:])
        if not m:
            return False
        found = re.sub(r"\\(.)", r"\1", m.group(1))
    else:
        m = re.match(r"[^\s;()]+", text[i:])
        if not m:
            return False
        found = m.group(0)
    return found.rstrip(".").lower() == authserv_id.rstrip(".").lower()
