"""Which inbound defences (issue 16) a listener runs, in the issue's order.

At the door, mx only: client rate limits, then DNSBL, then (after the recipient policy, which
the inbound handler applies between the MAIL and RCPT stages) greylisting. After the data,
on the listeners of `rspamd_listeners`: rspamd, last of the end-of-data checks, so the
SPF/DKIM/DMARC verdict is written before rspamd sees the message.
"""

from __future__ import annotations

from postier.checks.base import Check
from postier.checks.client_limits import ClientRateLimits
from postier.checks.dnsbl_check import DnsblCheck
from postier.checks.greylist import Greylisting
from postier.checks.protection import Protection
from postier.checks.rspamd import RspamdCheck
from postier.net.roles import MX, Role


def door_checks(role: Role, protection: Protection) -> list[Check]:
    if role.name != MX.name:
        return []
    checks: list[Check] = []
    if protection.rate is not None:
        checks.append(ClientRateLimits(protection, protection.rate))
    if protection.dnsbl is not None:
        checks.append(DnsblCheck(protection, protection.dnsbl))
    if protection.greylist is not None:
        checks.append(Greylisting(protection, protection.greylist))
    return checks


def content_checks(role: Role, protection: Protection, hostname: str) -> list[Check]:
    cfg = protection.config
    if protection.rspamd is None or role.name not in cfg.rspamd_listeners:
        return []
    return [RspamdCheck(protection.rspamd, hostname=hostname, fail_open=cfg.rspamd_fail_open)]
