"""The mx check's decisions alone, on verdicts made by hand (the server tests send real mail)."""

from __future__ import annotations

import pytest

from postier.checks.mailauth import MessageAuthentication, foreign_results_filter
from postier.dns import Resolver
from postier.mailauth import AuthVerdicts, DkimResult, DmarcResult, SpfResult


def check(dmarc_reject: bool = True) -> MessageAuthentication:
    # Never asked: _refusal decides on verdicts alone.
    resolver = Resolver("127.0.0.1", 9, timeout=0.1)
    return MessageAuthentication(
        resolver, hostname="mx.test", dmarc_reject=dmarc_reject, executor=None
    )


def verdicts(
    dmarc: DmarcResult, spf: str = "fail", dkim: tuple[DkimResult, ...] = ()
) -> AuthVerdicts:
    return AuthVerdicts(
        SpfResult(spf, "mailfrom", "example.net", "a@example.net"), list(dkim), dmarc
    )


REJECT = DmarcResult("fail", "example.net", "reject", "reject", "no aligned pass")
UNKNOWN = DmarcResult("temperror", "example.net", "", "temperror", "SERVFAIL")


def test_reject_is_550_and_names_the_domain() -> None:
    refusal = check()._refusal(verdicts(REJECT))
    assert refusal is not None and refusal.reply is not None
    assert (refusal.reply.code, refusal.reply.enhanced) == (550, "5.7.1")
    assert "example.net" in refusal.reason


@pytest.mark.parametrize("disposition", ["none", "quarantine"])
def test_milder_policies_deliver(disposition: str) -> None:
    dmarc = DmarcResult("fail", "example.net", disposition, disposition, "no aligned pass")
    assert check()._refusal(verdicts(dmarc)) is None


def test_temperror_is_451_unless_the_from_domain_passes_itself() -> None:
    refusal = check()._refusal(verdicts(UNKNOWN))
    assert refusal is not None and refusal.reply is not None and refusal.reply.code == 451
    assert check()._refusal(verdicts(UNKNOWN, spf="pass")) is None
    signed = (DkimResult("pass", "example.net", "sel"),)
    assert check()._refusal(verdicts(UNKNOWN, dkim=signed)) is None
    # A pass for a parent domain aligns only under relaxed alignment: the record decides.
    parent = (DkimResult("pass", "net", "sel"),)
    assert check()._refusal(verdicts(UNKNOWN, dkim=parent)) is not None


def test_no_dmarc_reject_never_refuses() -> None:
    assert check(dmarc_reject=False)._refusal(verdicts(REJECT)) is None
    assert check(dmarc_reject=False)._refusal(verdicts(UNKNOWN)) is None


def test_filter_drops_only_results_claiming_our_name() -> None:
    drop = foreign_results_filter("mx.test")
    assert drop(b"authentication-results", b"Authentication-Results: MX.test.; spf=pass")
    assert drop(b"authentication-results", b'Authentication-Results:  "mx.test" ; none')
    assert not drop(b"authentication-results", b"Authentication-Results: mx.test.evil; none")
    assert not drop(b"authentication-results", b"Authentication-Results: other.test; none")
    assert not drop(b"received", b"Received: by mx.test; now")
