"""Trace headers we prepend: Return-Path and Received (RFC 5321 §4.4, RFC 3848)."""

from __future__ import annotations

import time
from email.utils import formatdate

_date_second = -1
_date_text = ""


def _date() -> str:
    """RFC 5322 date of now in local time; formatted once per second (every message
    asks, and formatdate is a good part of the cost of our Received header)."""
    global _date_second, _date_text
    second = int(time.time())
    if second != _date_second:
        _date_text = formatdate(second, localtime=True)
        _date_second = second
    return _date_text


def with_protocol(*, esmtp: bool, tls: bool, auth: bool, smtputf8: bool) -> str:
    """RFC 3848 / RFC 6531 `with` keyword: SMTP, ESMTP, ESMTPS, ESMTPA, ESMTPSA, UTF8SMTP..."""
    if not esmtp:
        return "SMTP"
    base = "UTF8SMTP" if smtputf8 else "ESMTP"
    return base + ("S" if tls else "") + ("A" if auth else "")


def trace_headers(
    *,
    sender: str,
    helo: str,
    rdns: str,
    ip: str,
    hostname: str,
    protocol: str,
    queue_id: str,
    recipients: list[str],
    tls_info: str = "",
    auth_user: str = "",
) -> bytes:
    """`Return-Path:` then `Received:`, LF-terminated (the spool format).

    Every value here was validated by the protocol layer (no CR, LF or NUL can reach it).
    """
    ip_literal = f"IPv6:{ip}" if ":" in ip else ip
    lines = [f"Return-Path: <{sender}>", f"Received: from {helo} ({rdns} [{ip_literal}])"]
    if tls_info:
        lines.append(f"\t(using {tls_info})")
    if auth_user:
        lines.append(f"\t(authenticated as {auth_user})")
    by = f"\tby {hostname} (postier) with {protocol} id {queue_id}"
    if len(recipients) == 1:
        lines.append(by)
        lines.append(f"\tfor <{recipients[0]}>; {_date()}")
    else:
        lines.append(f"{by};")
        lines.append(f"\t{_date()}")
    return ("\n".join(lines) + "\n").encode("utf-8")
