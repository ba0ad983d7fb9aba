"""What `postier doctor` reports: one problem, one line, with the exact fix.

A problem names the check, the thing checked, what is wrong and what to do about it, so that a
person can grep the output (`PROBLEM spf`) and act on each line without reading the others.
"""

from __future__ import annotations

from dataclasses import dataclass

from postier.ops.doctor_dns import DnsFailure


@dataclass(frozen=True, slots=True)
class Problem:
    check: str  # mx, address, ptr, spf, dkim, dmarc, mta-sts, tls-rpt, certificate, tlsa, dns
    subject: str  # the domain, host name or address the problem is about
    what: str
    fix: str

    def line(self) -> str:
        return f"PROBLEM {self.check} {self.subject}: {self.what}. Fix: {self.fix}"


def dns_problem(failure: DnsFailure, server: str) -> Problem:
    """A look-up that did not answer: say so, and never guess that the record is missing."""
    return Problem(
        "dns",
        f"{failure.name} {failure.rdtype}",
        f"{failure.reason} (asked {server}), so doctor cannot tell whether this record is right",
        f"make sure the name servers of {failure.name} answer (and that --dns-server is the "
        "right resolver), then run postier doctor again",
    )
