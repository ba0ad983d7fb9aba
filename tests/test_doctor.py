"""`postier doctor` against a loopback DNS responder whose zone has one problem at a time.

The correct zone is what `postier doctor --records` prints (see tests/doctorenv.py). Every case
below breaks exactly one thing and expects exactly one PROBLEM line, naming the right check,
and nothing else; the cases that are not problems (an authorised external rua, a consistent
MTA-STS record) expect none. A real postier server answers the certificate check throughout.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from tests.dnsserver import Zone
from tests.doctorenv import DOMAIN, HOST, DoctorWorld, doctor_world, run_doctor

V6_PTR = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.ip6.arpa"
V4_PTR = "1.0.0.127.in-addr.arpa"
OURS = "ip4:127.0.0.1 ip6:::1"


@pytest.fixture(scope="module")
def world() -> Iterator[DoctorWorld]:
    with doctor_world() as w:
        yield w


def _set(name: str, rtype: str, *values: object) -> Callable[[Zone], None]:
    def change(zone: Zone) -> None:
        zone.setdefault(name, {})[rtype] = list(values)

    return change


def _drop(name: str, rtype: str | None = None) -> Callable[[Zone], None]:
    def change(zone: Zone) -> None:
        if rtype is None:
            del zone[name]
        else:
            del zone[name][rtype]

    return change


def _many_includes(zone: Zone) -> None:
    terms = [f"include:i{n}.{DOMAIN} " for n in range(11)]
    strings = ['"v=spf1 ' + OURS + ' "', '"' + "".join(terms[:6]) + '"', '"' + "".join(terms[6:])]
    zone[DOMAIN]["TXT"] = [" ".join(strings) + '~all"']  # strings of at most 255 octets
    for n in range(11):
        zone[f"i{n}.{DOMAIN}"] = {"TXT": ['"v=spf1 -all"']}


# (case id, change to the zone, expected start of the one PROBLEM line, text it must contain)
PROBLEMS = [
    ("mx-missing", _drop(DOMAIN, "MX"), f"PROBLEM mx {DOMAIN}:", "no MX record"),
    ("mx-elsewhere", _set(DOMAIN, "MX", (10, "mail.elsewhere.test.")), f"PROBLEM mx {DOMAIN}:",
     "not our host name"),
    ("aaaa-missing", _drop(HOST, "AAAA"), f"PROBLEM address {HOST}:", "no AAAA record for our "
     "IPv6 address ::1"),
    ("a-not-ours", _set(HOST, "A", "127.0.0.1", "127.0.0.2"), f"PROBLEM address {HOST}:",
     "127.0.0.2 is not one of our addresses"),
    ("ptr6-missing", _drop(V6_PTR), "PROBLEM ptr ::1:", "IPv6 address has no PTR"),
    ("ptr4-wrong", _set(V4_PTR, "PTR", "host.provider.test."), "PROBLEM ptr 127.0.0.1:",
     "names host.provider.test, not our host name"),
    ("spf-missing", _drop(DOMAIN, "TXT"), f"PROBLEM spf {DOMAIN}:", "no SPF record"),
    ("spf-two", _set(DOMAIN, "TXT", f'"v=spf1 {OURS} ~all"', '"v=spf1 mx -all"'),
     f"PROBLEM spf {DOMAIN}:", "2 SPF records"),
    ("spf-plus-all", _set(DOMAIN, "TXT", f'"v=spf1 {OURS} +all"'), f"PROBLEM spf {DOMAIN}:",
     "+all"),
    ("spf-not-v6", _set(DOMAIN, "TXT", '"v=spf1 ip4:127.0.0.1 ~all"'), f"PROBLEM spf {DOMAIN}:",
     'our address ::1 gets "softfail"'),
    ("spf-lookups", _many_includes, f"PROBLEM spf {DOMAIN}:", "more than 10 DNS look-ups"),
    ("spf-void", _set(DOMAIN, "TXT", f'"v=spf1 {OURS} a:nx1.{DOMAIN} a:nx2.{DOMAIN} '
                                     f'a:nx3.{DOMAIN} ~all"'),
     f"PROBLEM spf {DOMAIN}:", "refers to names that do not exist"),
    ("spf-syntax", _set(DOMAIN, "TXT", f'"v=spf1 {OURS} bogus:thing ~all"'),
     f"PROBLEM spf {DOMAIN}:", "is broken"),
    ("dkim-missing", _drop(f"s1._domainkey.{DOMAIN}"), f"PROBLEM dkim s1._domainkey.{DOMAIN}:",
     "no DKIM key record"),
    ("dkim-other-key", _set(f"s1._domainkey.{DOMAIN}", "TXT", '"v=DKIM1; k=rsa; p=MIIBIjANBg"'),
     f"PROBLEM dkim s1._domainkey.{DOMAIN}:", "not the key we sign with"),
    ("dkim-revoked", _set(f"s1._domainkey.{DOMAIN}", "TXT", '"v=DKIM1; p="'),
     f"PROBLEM dkim s1._domainkey.{DOMAIN}:", "revokes the key"),
    ("dmarc-missing", _drop(f"_dmarc.{DOMAIN}"), f"PROBLEM dmarc _dmarc.{DOMAIN}:",
     "no DMARC record"),
    ("dmarc-none", _set(f"_dmarc.{DOMAIN}", "TXT", f'"v=DMARC1; p=none; rua=mailto:d@{DOMAIN}"'),
     f"PROBLEM dmarc _dmarc.{DOMAIN}:", "p=none"),
    ("dmarc-rua-outside", _set(f"_dmarc.{DOMAIN}", "TXT",
                               '"v=DMARC1; p=reject; rua=mailto:reports@other.test"'),
     f"PROBLEM dmarc _dmarc.{DOMAIN}:", "has not agreed"),
    ("mta-sts-no-id", lambda z: (_set(f"_mta-sts.{DOMAIN}", "TXT", '"v=STSv1;"')(z),
                                 _set(f"mta-sts.{DOMAIN}", "A", "127.0.0.1")(z)),
     f"PROBLEM mta-sts _mta-sts.{DOMAIN}:", "needs id="),
    ("mta-sts-no-host", _set(f"_mta-sts.{DOMAIN}", "TXT", '"v=STSv1; id=20261202"'),
     f"PROBLEM mta-sts _mta-sts.{DOMAIN}:", f"mta-sts.{DOMAIN} has no address"),
    ("tls-rpt-bad-rua", _set(f"_smtp._tls.{DOMAIN}", "TXT", f'"v=TLSRPTv1; rua=tls@{DOMAIN}"'),
     f"PROBLEM tls-rpt _smtp._tls.{DOMAIN}:", "mailto: or https:"),
    ("tlsa-stale", _set(f"_25._tcp.{HOST}", "TLSA", "3 1 1 " + "00" * 32),
     f"PROBLEM tlsa _25._tcp.{HOST}:", "no TLSA record matches the key we serve"),
    ("dns-timeout", lambda z: z.__setitem__(f"_dmarc.{DOMAIN}", "TIMEOUT"),
     f"PROBLEM dns _dmarc.{DOMAIN} TXT:", "cannot tell whether"),
    ("dns-servfail", lambda z: z[DOMAIN].__setitem__("TXT", "SERVFAIL"),
     f"PROBLEM dns {DOMAIN} TXT:", "SERVFAIL"),
]  # fmt: skip


def test_correct_zone_has_no_problem(world: DoctorWorld) -> None:
    code, problems, out = world.check()
    assert problems == [], out
    assert code == 0
    assert out.splitlines()[-1].startswith("doctor: no problems found for example.test")


@pytest.mark.parametrize(
    ("change", "start", "text"), [p[1:] for p in PROBLEMS], ids=[p[0] for p in PROBLEMS]
)
def test_each_problem_reported_once_and_alone(
    world: DoctorWorld, change: Callable[[Zone], None], start: str, text: str
) -> None:
    zone = world.zone()
    change(zone)
    code, problems, out = world.check(zone)
    assert code == 1, out
    assert len(problems) == 1, out
    assert problems[0].startswith(start), out
    assert text in problems[0], out
    assert ". Fix: " in problems[0]
    assert out.splitlines()[-1] == (
        f"doctor: 1 problem found for {DOMAIN} (host {HOST}, addresses 127.0.0.1, ::1)"
    )


def test_dns_failure_is_never_reported_as_missing(world: DoctorWorld) -> None:
    zone = world.zone()
    zone[f"s1._domainkey.{DOMAIN}"] = "SERVFAIL"
    _code, problems, out = world.check(zone)
    assert [p.split(":")[0] for p in problems] == [f"PROBLEM dns s1._domainkey.{DOMAIN} TXT"]
    assert "no DKIM key record" not in out


def test_authorised_external_rua_and_consistent_mta_sts_are_fine(world: DoctorWorld) -> None:
    zone = world.zone()
    zone[f"_dmarc.{DOMAIN}"]["TXT"] = ['"v=DMARC1; p=reject; rua=mailto:reports@other.test"']
    zone[f"{DOMAIN}._report._dmarc.other.test"] = {"TXT": ['"v=DMARC1"']}
    zone[f"_mta-sts.{DOMAIN}"] = {"TXT": ['"v=STSv1; id=20261202T1"']}
    zone[f"mta-sts.{DOMAIN}"] = {"A": ["127.0.0.1"]}
    code, problems, out = world.check(zone)
    assert (code, problems) == (0, []), out


def test_unknown_public_address_is_one_config_problem(world: DoctorWorld) -> None:
    """Without public_ip and with only a loopback mx listener, doctor says what to set."""
    world.dns.zone = dict(world.good_zone)
    args = [a for a in world.config_args() if a not in ("--public-ip", "127.0.0.1", "::1")]
    code, out, err = run_doctor(*args, "--dns-server", f"127.0.0.1:{world.dns.port}",
                                "--tls-ca-file", str(world.ca_file))  # fmt: skip
    problems = [line for line in out.splitlines() if line.startswith("PROBLEM")]
    assert code == 1, err
    assert problems == [
        "PROBLEM config public_ip: public_ip is not set and no mx listener binds a public "
        'address, so doctor cannot tell our addresses. Fix: set public_ip = ["ADDRESS", ...] '
        "in the config or pass --public-ip ADDRESS"
    ], out


def test_fix_of_a_problem_is_accepted(world: DoctorWorld) -> None:
    """Publishing the record a fix names makes the problem go away (SPF shown)."""
    zone = world.zone()
    zone[DOMAIN]["TXT"] = ['"v=spf1 ip4:127.0.0.1 -all"']
    _code, problems, _out = world.check(zone)
    record = problems[0].split("publish: ")[1]
    value = record.split(" IN TXT ", 1)[1]
    zone[DOMAIN]["TXT"] = [value]
    code, problems, out = world.check(zone)
    assert (code, problems) == (0, []), out


def test_command_line_exit_codes(world: DoctorWorld) -> None:
    """The real command: 0 when clean, 1 with a problem, 2 on bad usage."""
    world.dns.zone = {k: v for k, v in world.good_zone.items()}
    base = [sys.executable, "-m", "postier", "doctor", *world.config_args(),
            "--tls-ca-file", str(world.ca_file), "--dns-timeout", "1"]  # fmt: skip
    dns = ["--dns-server", f"127.0.0.1:{world.dns.port}"]
    ok = subprocess.run([*base, *dns], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "PROBLEM" not in ok.stdout
    broken = subprocess.run([*base, *dns, "other.test"], capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert broken.returncode == 1
    assert "PROBLEM mx other.test: no MX record" in broken.stdout
    bad = subprocess.run([*base, "--dns-server", "not-an-ip"], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("postier doctor: --dns-server:")
