"""SPF, DKIM and DMARC on a running mx listener (`postier serve`), DNS from a loopback responder.

Messages are signed by an independent implementation (Perl's Mail::DKIM, tests/dkim_sign.pl)
with a key made by opendkim-genkey and published by tests/dnsserver.py. Loopback is in
`exempt_networks` by default (not checked), so these servers clear that list. Each case uses a
domain of its own: the server caches DNS answers for their TTL.
"""

from __future__ import annotations

import http.client
import re
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.dnsserver import DnsServer
from tests.mailauth_dns import txt
from tests.mailauth_sign import genkey, key_record, sign
from tests.server import PostierServer, free_port, make_server

HOSTNAME = "mx.test"  # make_server's -H
RCPT = "alice@example.org"
SPF_LOOPBACK = "v=spf1 ip4:127.0.0.0/8 -all"


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return genkey(tmp_path_factory.mktemp("dkim"), "sel", "good.test")


def _zone(key: Path) -> dict:
    dkim_key = txt(key_record(key))
    zone: dict = {}

    def domain(name: str, spf: str | None, dmarc: str | None, dkim: bool = False) -> None:
        if spf is not None:
            zone[name] = {"TXT": [txt(spf)]}
        if dmarc is not None:
            zone[f"_dmarc.{name}"] = dmarc if dmarc == "SERVFAIL" else {"TXT": [txt(dmarc)]}
        if dkim:
            zone[f"sel._domainkey.{name}"] = {"TXT": [dkim_key]}

    domain("good.test", SPF_LOOPBACK, "v=DMARC1; p=reject", dkim=True)
    domain("bank.test", "v=spf1 -all", "v=DMARC1; p=reject")
    domain("bank2.test", "v=spf1 -all", "v=DMARC1; p=reject")
    domain("evil.test", SPF_LOOPBACK, None)
    domain("flaky.test", "v=spf1 -all", "SERVFAIL")
    domain("flakysigned.test", SPF_LOOPBACK, "SERVFAIL", dkim=True)
    domain("quarantine.test", "v=spf1 -all", "v=DMARC1; p=quarantine")
    domain("spffail.test", "v=spf1 -all", None)
    domain("helo.test", "v=spf1 ip4:127.0.0.1 -all", None)
    return zone


@pytest.fixture(scope="module")
def dns(key: Path) -> Iterator[DnsServer]:
    with DnsServer(_zone(key)) as server:
        yield server


def _start(tmp: Path, dns: DnsServer, *extra: str) -> PostierServer:
    tmp.mkdir(parents=True, exist_ok=True)
    conf = tmp / "postier.toml"
    conf.write_text("exempt_networks = []\n")
    args = ["-c", str(conf), "--dns-server", f"127.0.0.1:{dns.port}", *extra]
    return make_server(tmp, extra=args).start()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, dns: DnsServer) -> Iterator[PostierServer]:
    srv = _start(tmp_path_factory.mktemp("reject"), dns)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def lenient(tmp_path_factory: pytest.TempPathFactory, dns: DnsServer) -> Iterator[PostierServer]:
    """With --no-dmarc-reject, and metrics on `extra_ports["metrics"]`."""
    port = free_port()
    tmp = tmp_path_factory.mktemp("lenient")
    srv = _start(tmp, dns, "--no-dmarc-reject", "--metrics", f"127.0.0.1:{port}")
    srv.extra_ports["metrics"] = port
    try:
        yield srv
    finally:
        srv.stop()


def message(from_: str, subject: str, extra_headers: str = "") -> bytes:
    return (
        f"{extra_headers}From: {from_}\nTo: {RCPT}\nSubject: {subject}\n"
        f"Date: Wed, 02 Dec 2026 07:00:00 +0000\nMessage-ID: <{subject}@test>\n\n"
        "Hello,\n\nA body line with trailing spaces   \n"
    ).encode()


def send(
    server: PostierServer, mail_from: str, data: bytes, helo: str = "client.test"
) -> tuple[int, bytes]:
    """Send `data` (LF) from `mail_from`; the end-of-data reply (code, text)."""
    with smtplib.SMTP("127.0.0.1", server.mx_port, local_hostname=helo, timeout=30) as smtp:
        smtp.ehlo(helo)
        code, text = smtp.mail(mail_from)
        assert code == 250, text
        code, text = smtp.rcpt(RCPT)
        assert code == 250, text
        code, text = smtp.data(data.replace(b"\n", b"\r\n"))
    return code, text


def stored(server: PostierServer, subject: str) -> bytes | None:
    """The delivered copy with `subject`, or None."""
    for path in server.maildir_files("alice"):
        data = path.read_bytes()
        if f"\nSubject: {subject}\n".encode() in data:
            return data
    return None


def results_fields(data: bytes) -> list[bytes]:
    """Every Authentication-Results field of the header section, unfolded."""
    head = data.split(b"\n\n", 1)[0]
    unfolded = re.sub(rb"\n[ \t]+", b" ", head)
    return [line for line in unfolded.split(b"\n") if line.lower().startswith(b"authentication-")]


def trace_order(data: bytes) -> list[bytes]:
    head = data.split(b"\n\n", 1)[0]
    names = [line.split(b":", 1)[0].lower() for line in head.split(b"\n") if line[:1] not in b" \t"]
    return names[:3]


def signed(key: Path, from_: str, subject: str, domain: str, extra: str = "") -> bytes:
    return sign(message(from_, subject, extra), key, "sel", domain)


# ---- the verdicts in the header ---------------------------------------------------------------


def test_signed_message_gets_one_header_above_received(server: PostierServer, key: Path) -> None:
    data = signed(key, "Alice <alice@good.test>", "good", "good.test")
    code, text = send(server, "alice@good.test", data)
    assert code == 250, text
    copy = stored(server, "good")
    assert copy is not None
    fields = results_fields(copy)
    assert len(fields) == 1, fields
    field = fields[0].decode()
    assert field.startswith(f"Authentication-Results: {HOSTNAME};")
    assert "spf=pass smtp.mailfrom=alice@good.test" in field
    assert "dkim=pass" in field and "header.d=good.test" in field and "header.s=sel" in field
    assert "dmarc=pass" in field and "header.from=good.test" in field
    assert trace_order(copy) == [b"return-path", b"authentication-results", b"received"]
    log = server.log()
    assert re.search(r"event=mailauth .*spf=pass .*dkim=pass .*dmarc=pass .*dis=none", log), log


def test_forged_from_under_p_reject_gets_550_and_nothing_stored(server: PostierServer) -> None:
    data = message("The Bank <security@bank.test>", "forged")
    code, text = send(server, "phisher@evil.test", data)
    assert code == 550 and text.startswith(b"5.7.1"), (code, text)
    assert b"bank.test" in text
    assert stored(server, "forged") is None
    assert not list((server.mail_root / ".postier-tmp").glob("*.spool"))
    log = server.log()
    assert re.search(r"event=mailauth .*dmarc=fail dis=reject from_domain=bank.test", log), log
    assert re.search(r"event=message-refused .*check=mailauth .*bank.test", log), log


def test_no_dmarc_reject_stores_the_failure(lenient: PostierServer) -> None:
    data = message("The Bank <security@bank2.test>", "forged-kept")
    code, text = send(lenient, "phisher@evil.test", data)
    assert code == 250, text
    copy = stored(lenient, "forged-kept")
    assert copy is not None
    (field,) = results_fields(copy)
    assert b"dmarc=fail" in field and b"header.from=bank2.test" in field
    assert re.search(r"event=mailauth .*dis=reject .*action=deliver", lenient.log())


def test_verdicts_are_counted(lenient: PostierServer) -> None:
    code, text = send(lenient, "s@spffail.test", message("S <s@spffail.test>", "counted"))
    assert code == 250, text
    conn = http.client.HTTPConnection("127.0.0.1", lenient.extra_ports["metrics"], timeout=30)
    try:
        conn.request("GET", "/metrics")
        page = conn.getresponse().read().decode()
    finally:
        conn.close()
    values = {
        (s.name, s.labels.get("method"), s.labels.get("result")): s.value
        for family in text_string_to_metric_families(page)
        for s in family.samples
    }
    assert values[("postier_auth_verdicts_total", "spf", "fail")] >= 1
    assert values[("postier_auth_verdicts_total", "dmarc", "none")] >= 1


def test_dmarc_servfail_is_not_rejected(server: PostierServer, key: Path) -> None:
    """p=reject cannot be known: a message without a pass is asked to retry, never refused."""
    code, text = send(server, "x@flaky.test", message("X <x@flaky.test>", "flaky"))
    assert code == 451 and text.startswith(b"4.7."), (code, text)
    assert stored(server, "flaky") is None
    # A message that passes for its From domain passes under any record: delivered.
    data = signed(key, "Y <y@flakysigned.test>", "flaky-signed", "flakysigned.test")
    code, text = send(server, "y@flakysigned.test", data)
    assert code == 250, text
    (field,) = results_fields(stored(server, "flaky-signed") or b"")
    assert b"dmarc=temperror" in field and b"dkim=pass" in field


def test_dmarc_servfail_with_no_dmarc_reject_delivers(lenient: PostierServer) -> None:
    code, text = send(lenient, "x@flaky.test", message("X <x@flaky.test>", "flaky-lenient"))
    assert code == 250, text
    (field,) = results_fields(stored(lenient, "flaky-lenient") or b"")
    assert b"dmarc=temperror" in field


def test_quarantine_is_delivered_with_the_verdict(server: PostierServer) -> None:
    code, text = send(server, "q@evil.test", message("Q <q@quarantine.test>", "quarantine"))
    assert code == 250, text
    (field,) = results_fields(stored(server, "quarantine") or b"")
    assert b"dmarc=fail" in field and b"header.from=quarantine.test" in field
    assert re.search(r"event=mailauth .*dis=quarantine .*action=deliver", server.log())


def test_spf_fail_without_dmarc_is_recorded_not_rejected(server: PostierServer) -> None:
    data = message("S <s@spffail.test>", "spffail")
    code, text = send(server, "s@spffail.test", data)
    assert code == 250, text
    (field,) = results_fields(stored(server, "spffail") or b"")
    assert re.search(rb"spf=fail \(.*\) smtp.mailfrom=s@spffail.test;", field), field
    assert b"dmarc=none" in field


def test_null_sender_is_checked_by_helo(server: PostierServer) -> None:
    data = message("MAILER-DAEMON <postmaster@helo.test>", "bounce")
    code, text = send(server, "", data, helo="helo.test")
    assert code == 250, text
    (field,) = results_fields(stored(server, "bounce") or b"")
    assert b"spf=pass smtp.helo=helo.test" in field


# ---- incoming Authentication-Results ----------------------------------------------------------


def test_results_claiming_our_name_are_removed(server: PostierServer, key: Path) -> None:
    forged = (
        f"Authentication-Results: {HOSTNAME.upper()}; dkim=pass header.d=bank.test\n"
        "Authentication-Results: relay.other.test; spf=pass\n"
        f"Authentication-Results: {HOSTNAME};\n  dmarc=pass\n  header.from=bank.test\n"
    )
    data = signed(key, "Alice <alice@good.test>", "carried", "good.test", forged)
    code, text = send(server, "alice@good.test", data)
    assert code == 250, text
    copy = stored(server, "carried") or b""
    fields = results_fields(copy)
    ours = [
        f for f in fields if f.lower().startswith(f"authentication-results: {HOSTNAME};".encode())
    ]
    assert len(ours) == 1 and re.search(rb"dmarc=pass .*header.from=good.test", ours[0]), fields
    assert b"header.d=bank.test" not in copy and b"header.from=bank.test" not in copy
    assert [f for f in fields if b"relay.other.test" in f] == [
        b"Authentication-Results: relay.other.test; spf=pass"
    ]
    # The signature covered none of them: DKIM still passes after the removal.
    assert b"dkim=pass" in ours[0]


def test_exempt_loopback_is_not_checked(tmp_path: Path, dns: DnsServer) -> None:
    """The default exempt_networks (loopback): no look-ups, no header, forged fields removed."""
    srv = make_server(tmp_path, extra=["--dns-server", f"127.0.0.1:{dns.port}"]).start()
    try:
        before = len(dns.queries)
        extra = f"Authentication-Results: {HOSTNAME}; dmarc=pass\n"
        code, text = send(srv, "phisher@evil.test", message("B <b@bank.test>", "local", extra))
        assert code == 250, text
        copy = stored(srv, "local") or b""
        assert results_fields(copy) == []
        assert not [q for q in dns.queries[before:] if q[1] == "TXT"]
    finally:
        srv.stop()
