"""Which checks each listener runs, in order. The order is this data, nothing else."""

from __future__ import annotations

from postier.checks.base import Check, CheckChain
from postier.checks.defences import content_checks, door_checks
from postier.checks.disk import FreeSpace, LowDiskSpace
from postier.checks.hops import HopCount
from postier.checks.protection import Protection
from postier.checks.sender import SenderOwnership
from postier.checks.sending_limits import SendingLimits
from postier.checks.submission import SubmissionHeaders
from postier.net.roles import Role
from postier.policy import Policy


def checks_for_role(
    role: Role,
    *,
    policy: Policy,
    free_space: FreeSpace,
    hostname: str,
    mailauth: Check | None = None,
    protection: Protection | None = None,
    sending_limits: SendingLimits | None = None,
) -> CheckChain:
    """The chain of one listener role.

    Sender ownership comes before the disk check: a sender that may never send is told so
    (553) rather than asked to retry (452).
    """
    checks: list[Check] = []
    if protection is not None:  # rate limits, DNSBL, greylist: before anything else
        checks += door_checks(role, protection)
    if role.offers_auth:
        checks.append(SenderOwnership(policy))
    checks.append(LowDiskSpace(free_space))
    if role.offers_auth and sending_limits is not None:
        checks.append(sending_limits)  # after the disk check: a 452 uses no allowance
    if role.offers_auth:
        checks.append(SubmissionHeaders(hostname))
    checks.append(HopCount())  # a mail loop, on every listener: before the costly checks
    if role.name == "mx" and mailauth is not None:
        checks.append(mailauth)  # SPF/DKIM/DMARC (checks/mailauth.py), then rspamd
    if protection is not None:  # rspamd: the last end-of-data check
        checks += content_checks(role, protection, hostname)
    return CheckChain(checks)
