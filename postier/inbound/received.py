"""Trace headers we prepend: Return-Path and Received (RFC 5321 §4.4, RFC 3848)."""

from __future__ import annotations

from email.utils import formatdate


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
        lines.append(f"\tfor <{recipients[0]}>; {formatdate(localtime=True)}")
    else:
        lines.append(f"{by};")
        lines.append(f"\t{formatdate(localtime=True)}")
    return ("\n".join(lines) + "\n").encode("utf-8")
