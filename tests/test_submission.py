"""Issue 4 end to end: submission with AUTH on a real `postier serve`, with real clients.

Clients: raw sockets (every reply code of the SASL exchanges), smtplib (`starttls()`,
`SMTP_SSL`, `login()`), `swaks --auth PLAIN|LOGIN`, and `msmtp` (a real mail client's
submission code) through 587-style STARTTLS and 465-style implicit TLS.

Failed logins feed the per-IP throttle, which would slow every later test from the same
address; so each test that fails a login connects from its own loopback address
(127.0.0.N), and the successful ones use 127.0.0.1, which never fails.

Relaying: until the outbound queue is wired, a recipient the policy lets through to a remote
domain is answered `451 4.3.5 Relaying is not available`; `relay_allowed()` accepts that
or 250, so the tests check the policy (allowed vs `554 5.7.1` denied) either way. No test
sends DATA to a remote recipient.
"""

from __future__ import annotations

import base64
import os
import shutil
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from postier.auth.passwd import hash_password
from tests.test_tls_integration import (
    MESSAGE,
    SAFETY,
    Client,
    TlsServer,
    client_context,
    ehlo_keywords,
    log_offset,
    received_header,
    run_tool,
    send_message,
    start_tls_server,
    wait_log,
)

SWAKS = shutil.which("swaks")
MSMTP = shutil.which("msmtp")

ALICE, ALICE_PW = "alice@example.org", "alice-secret"  # {ARGON2ID}
BOB, BOB_PW = "bob@example.org", "bob-secret"  # {BLF-CRYPT}
CAROL, CAROL_PW = "carol@example.org", "carol pass phrase"  # set with `postier passwd`
DAVE, DAVE_PW = "dave", "dave-secret"  # a seed-style `login password` line ({PLAIN})


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def plain(user: str, password: str, authzid: str = "") -> str:
    return b64(f"{authzid}\0{user}\0{password}")


def relay_allowed(code: int, text: str) -> bool:
    """The policy let a remote recipient through (250 once the queue is wired; 451 4.3.5
    while it is not)."""
    return code == 250 or (code == 451 and "4.3.5" in text)


def _prepare(passwd: Path) -> None:
    with passwd.open("a") as f:
        f.write(f"{BOB}:{hash_password(BOB_PW, 'BLF-CRYPT')}\n")
        f.write(f"{DAVE} {DAVE_PW}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "postier", "passwd", str(passwd), CAROL],
        input=CAROL_PW.encode() + b"\n",
        capture_output=True,
        timeout=SAFETY,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"{CAROL}:{{ARGON2ID}}$argon2id$" in passwd.read_text()


@pytest.fixture(scope="module")
def sub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    t = start_tls_server(
        tmp_path_factory.mktemp("submission"),
        passwords={ALICE: ALICE_PW},
        sni_names=(),
        prepare=_prepare,
    )
    try:
        yield t
    finally:
        t.server.stop()


def tls_session(port: int, source: str | None = None) -> Client:
    """A submission session after STARTTLS and the second EHLO."""
    c = Client(port, source=source)
    assert c.reply()[0] == 220
    c.ehlo()
    c.starttls()
    code, text = c.ehlo()
    assert code == 250 and "AUTH" in ehlo_keywords(text), text
    return c


def logged_in(port: int, user: str = ALICE, password: str = ALICE_PW) -> Client:
    c = tls_session(port)
    assert c.cmd(f"AUTH PLAIN {plain(user, password)}")[0] == 235
    return c


# ---- what each listener offers ---------------------------------------------------------------
def test_submission_plaintext_offers_starttls_not_auth(sub: TlsServer) -> None:
    c = Client(sub.submission)
    assert c.reply()[0] == 220
    code, text = c.ehlo()
    keywords = ehlo_keywords(text)
    assert code == 250 and "STARTTLS" in keywords and "AUTH" not in keywords, text
    assert c.cmd(f"AUTH PLAIN {plain(ALICE, ALICE_PW)}") == (
        538,
        "538 5.7.11 Encryption required for requested authentication mechanism",
    )
    assert c.cmd("AUTH LOGIN")[0] == 538
    assert c.cmd(f"MAIL FROM:<{ALICE}>") == (530, "530 5.7.0 Authentication required")
    c.close()


def test_submission_after_starttls_offers_auth_and_requires_it(sub: TlsServer) -> None:
    c = tls_session(sub.submission)
    text = c.ehlo()[1]
    assert "AUTH PLAIN LOGIN" in text.replace("250-", "").replace("250 ", "")
    assert c.cmd(f"MAIL FROM:<{ALICE}>") == (530, "530 5.7.0 Authentication required")
    assert c.cmd(f"RCPT TO:<{BOB}>")[0] == 503
    c.close()


def test_submissions_offers_auth_at_once(sub: TlsServer) -> None:
    with smtplib.SMTP_SSL(
        "127.0.0.1", sub.submissions, timeout=SAFETY, context=client_context()
    ) as s:
        s.ehlo("client.test")
        assert s.has_extn("auth") and not s.has_extn("starttls")
        assert set(s.esmtp_features["auth"].split()) == {"PLAIN", "LOGIN"}
        assert s.mail(ALICE)[0] == 530


def test_mx_and_local_never_offer_auth(sub: TlsServer) -> None:
    for port in (sub.mx, sub.local):
        c = Client(port)
        c.reply()
        code, text = c.ehlo()
        assert "AUTH" not in ehlo_keywords(text)
        c.starttls()
        code, text = c.ehlo()
        assert code == 250 and "AUTH" not in ehlo_keywords(text), text
        assert c.cmd(f"AUTH PLAIN {plain(ALICE, ALICE_PW)}")[0] == 502
        c.close()


# ---- the SASL exchanges ----------------------------------------------------------------------
def _auth_plain_ir(c: Client, user: str, pw: str) -> tuple[int, str]:
    return c.cmd(f"AUTH PLAIN {plain(user, pw)}")


def _auth_plain(c: Client, user: str, pw: str) -> tuple[int, str]:
    assert c.cmd("AUTH PLAIN") == (334, "334 ")
    return c.cmd(plain(user, pw))


def _auth_login(c: Client, user: str, pw: str) -> tuple[int, str]:
    assert c.cmd("AUTH LOGIN") == (334, "334 VXNlcm5hbWU6")  # "Username:"
    assert c.cmd(b64(user)) == (334, "334 UGFzc3dvcmQ6")  # "Password:"
    return c.cmd(b64(pw))


def _auth_login_ir(c: Client, user: str, pw: str) -> tuple[int, str]:
    assert c.cmd(f"AUTH LOGIN {b64(user)}") == (334, "334 UGFzc3dvcmQ6")
    return c.cmd(b64(pw))


EXCHANGES = {
    "plain-ir": _auth_plain_ir,
    "plain": _auth_plain,
    "login": _auth_login,
    "login-ir": _auth_login_ir,
}


@pytest.mark.parametrize("how", sorted(EXCHANGES))
@pytest.mark.parametrize(
    ("user", "pw"),
    [(ALICE, ALICE_PW), (BOB, BOB_PW), (CAROL, CAROL_PW)],
    ids=["argon2id", "bcrypt", "cli"],
)
def test_auth_succeeds(sub: TlsServer, how: str, user: str, pw: str) -> None:
    c = tls_session(sub.submission)
    assert EXCHANGES[how](c, user, pw) == (235, "235 2.7.0 Authentication successful")
    # Authenticated: no second AUTH, no AUTH in EHLO any more, and MAIL from one's own address.
    assert c.cmd(f"AUTH PLAIN {plain(user, pw)}")[0] == 503
    assert c.cmd(f"MAIL FROM:<{user}>")[0] == 250
    assert c.cmd(f"RCPT TO:<{ALICE}>")[0] == 250
    c.close()


def test_auth_user_name_is_case_insensitive(sub: TlsServer) -> None:
    c = tls_session(sub.submission)
    assert c.cmd(f"AUTH PLAIN {plain('Alice@Example.ORG', ALICE_PW)}")[0] == 235
    assert c.cmd(f"MAIL FROM:<{ALICE}>")[0] == 250
    c.close()


@pytest.mark.parametrize("how", sorted(EXCHANGES))
def test_wrong_password_535(sub: TlsServer, how: str) -> None:
    source = f"127.0.0.{11 + sorted(EXCHANGES).index(how)}"
    c = tls_session(sub.submission, source=source)
    assert EXCHANGES[how](c, ALICE, "wrong") == (
        535,
        "535 5.7.8 Authentication credentials invalid",
    )
    c.close()


def test_unknown_user_535(sub: TlsServer) -> None:
    c = tls_session(sub.submission, source="127.0.0.15")
    assert _auth_plain_ir(c, "nobody@example.org", "x")[0] == 535
    c.close()


def test_cancel_with_star_501_then_auth_still_possible(sub: TlsServer) -> None:
    mark = log_offset(sub.server)
    c = tls_session(sub.submission, source="127.0.0.20")
    assert c.cmd("AUTH PLAIN")[0] == 334
    assert c.cmd("*")[0] == 501
    assert c.cmd("AUTH LOGIN")[0] == 334
    assert c.cmd("*")[0] == 501
    assert c.cmd("AUTH LOGIN")[0] == 334
    assert c.cmd(b64(ALICE))[0] == 334
    assert c.cmd("*")[0] == 501
    assert c.cmd(f"AUTH PLAIN {plain(ALICE, ALICE_PW)}")[0] == 235
    c.close()
    # Cancelling is not a wrong password: nothing was throttled.
    assert "event=auth-throttled" not in sub.server.log()[mark:]


@pytest.mark.parametrize(
    "steps",
    [
        ["AUTH PLAIN !!!not-base64"],
        ["AUTH PLAIN QUJD="],  # stray padding
        ["AUTH PLAIN", "%%%"],
        ["AUTH LOGIN", "bm90IGJhc2U2NA=x"],
        ["AUTH LOGIN", b64(ALICE), "***"],
    ],
    ids=["plain-ir", "plain-ir-padding", "plain", "login-user", "login-password"],
)
def test_bad_base64_501(sub: TlsServer, steps: list[str]) -> None:
    c = tls_session(sub.submission, source="127.0.0.21")
    for line in steps[:-1]:
        assert c.cmd(line)[0] == 334
    code, text = c.cmd(steps[-1])
    assert code == 501 and text.startswith("501 5.5.2"), text
    assert c.cmd("NOOP")[0] == 250  # back in command mode
    c.close()


def test_auth_protocol_errors(sub: TlsServer) -> None:
    c = Client(sub.submissions, implicit=True)
    c.reply()
    assert c.cmd(f"AUTH PLAIN {plain(ALICE, ALICE_PW)}")[0] == 503  # before EHLO
    c.ehlo()
    assert c.cmd("AUTH CRAM-MD5")[0] == 504
    assert c.cmd("AUTH")[0] == 501
    assert c.cmd(f"AUTH PLAIN {plain(ALICE, ALICE_PW)}")[0] == 235
    c.close()


def test_three_failures_421_and_close(sub: TlsServer) -> None:
    mark = log_offset(sub.server)
    c = tls_session(sub.submission, source="127.0.0.30")
    assert _auth_plain_ir(c, ALICE, "guess1")[0] == 535
    assert _auth_login(c, ALICE, "guess2")[0] == 535
    assert _auth_plain_ir(c, ALICE, "guess3")[0] == 535
    # Then, unasked (RFC 5321 §3.8), the 421 and the close.
    code, text = c.reply()
    assert (code, text[:9]) == (421, "421 4.7.0"), text
    assert c.closed() and c.buf == b""
    c.close()
    wait_log(sub.server, r"event=auth-cutoff .*ip=127\.0\.0\.30 .*failures=3", mark)
    wait_log(sub.server, r"event=disconnect .*ip=127\.0\.0\.30 .*too many auth failures", mark)


def test_failures_throttle_the_address_across_connections(sub: TlsServer) -> None:
    ip = "127.0.0.31"
    mark = log_offset(sub.server)
    c = tls_session(sub.submission, source=ip)
    assert _auth_plain_ir(c, ALICE, "wrong")[0] == 535
    c.cmd("QUIT")
    c.close()
    assert "event=auth-throttled" not in sub.server.log()[mark:]
    # A new connection from the same address: its AUTH is delayed, and the log says so.
    c = tls_session(sub.submission, source=ip)
    assert _auth_plain_ir(c, ALICE, ALICE_PW)[0] == 235
    c.close()
    line = wait_log(sub.server, rf"event=auth-throttled .*ip={ip}\b", mark)
    assert "delay=1.0" in line, line
    # The correct password cleared the record: the next AUTH is not delayed.
    mark = log_offset(sub.server)
    c = tls_session(sub.submission, source=ip)
    assert _auth_plain_ir(c, ALICE, ALICE_PW)[0] == 235
    c.close()
    wait_log(sub.server, rf"event=auth .*ip={ip}\b", mark)
    assert "event=auth-throttled session" not in sub.server.log()[mark:]


# ---- what an authenticated user may send -----------------------------------------------------
def test_sender_must_be_owned(sub: TlsServer) -> None:
    c = logged_in(sub.submission)
    code, text = c.cmd(f"MAIL FROM:<{BOB}>")
    assert (code, text[:9]) == (553, "553 5.7.1"), text
    code, text = c.cmd("MAIL FROM:<alice@other.example>")
    assert code == 553, text
    code, text = c.cmd("MAIL FROM:<>")
    assert (code, text[:9]) == (553, "553 5.7.1"), text
    assert c.cmd("MAIL FROM:<ALICE@example.ORG>")[0] == 250
    c.close()


def test_seed_style_login_owns_its_local_addresses(sub: TlsServer) -> None:
    """`-pass login_pass.txt` with `login password` lines: the login `dave` may send as
    dave@<a local domain>, and only as that."""
    c = tls_session(sub.submission)
    assert c.cmd(f"AUTH PLAIN {plain(DAVE, DAVE_PW)}")[0] == 235
    assert c.cmd("MAIL FROM:<carol@example.org>")[0] == 553
    assert c.cmd("MAIL FROM:<dave@other.example>")[0] == 553
    assert c.cmd("MAIL FROM:<dave@example.org>")[0] == 250
    c.close()


def test_relay_policy_per_listener(sub: TlsServer) -> None:
    remote = "someone@remote.example"
    # mx: never relays, even in TLS.
    c = Client(sub.mx)
    c.reply()
    c.ehlo()
    assert c.cmd("MAIL FROM:<x@remote.example>")[0] == 250
    assert c.cmd(f"RCPT TO:<{remote}>") == (554, "554 5.7.1 Relay access denied")
    assert c.cmd(f"RCPT TO:<{BOB}>")[0] == 250
    c.close()
    # submission without AUTH: refused before any recipient.
    c = tls_session(sub.submission)
    assert c.cmd(f"MAIL FROM:<{ALICE}>")[0] == 530
    assert c.cmd(f"RCPT TO:<{remote}>")[0] == 503
    c.close()
    # submission with AUTH: the policy lets it through.
    c = logged_in(sub.submission)
    assert c.cmd(f"MAIL FROM:<{ALICE}>")[0] == 250
    code, text = c.cmd(f"RCPT TO:<{remote}>")
    assert relay_allowed(code, text), text
    assert c.cmd(f"RCPT TO:<{BOB}>")[0] == 250
    assert c.cmd("RCPT TO:<nobody@example.org>")[0] == 550
    c.cmd("RSET")
    c.close()
    # submissions with AUTH, too.
    c = Client(sub.submissions, implicit=True)
    c.reply()
    c.ehlo()
    assert c.cmd(f"AUTH PLAIN {plain(ALICE, ALICE_PW)}")[0] == 235
    assert c.cmd(f"MAIL FROM:<{ALICE}>")[0] == 250
    assert relay_allowed(*c.cmd(f"RCPT TO:<{remote}>"))
    c.close()
    # local (loopback only): relays without AUTH.
    c = Client(sub.local)
    c.reply()
    c.ehlo()
    assert c.cmd("MAIL FROM:<daemon@localhost>")[0] == 250
    assert relay_allowed(*c.cmd(f"RCPT TO:<{remote}>"))
    c.close()


# ---- delivery with real clients --------------------------------------------------------------
def _new_file(srv: TlsServer, mailbox: str, before: set[Path]) -> Path:
    (new,) = set(srv.server.maildir_files(mailbox)) - before
    return new


def test_smtplib_login_starttls_delivers_with_esmtpsa(sub: TlsServer) -> None:
    before = set(sub.server.maildir_files("bob"))
    with smtplib.SMTP("127.0.0.1", sub.submission, timeout=SAFETY) as s:
        s.starttls(context=client_context())
        s.login(ALICE, ALICE_PW)
        s.sendmail(ALICE, [BOB], MESSAGE)
    header = received_header(_new_file(sub, "bob", before))
    assert " with ESMTPSA id " in header and "version=TLS" in header, header


def test_smtplib_login_implicit_tls_delivers_with_esmtpsa(sub: TlsServer) -> None:
    before = set(sub.server.maildir_files("alice"))
    with smtplib.SMTP_SSL(
        "127.0.0.1", sub.submissions, timeout=SAFETY, context=client_context()
    ) as s:
        s.login(BOB, BOB_PW)
        s.sendmail(BOB, [ALICE], MESSAGE)
    header = received_header(_new_file(sub, "alice", before))
    assert " with ESMTPSA id " in header and "version=TLS" in header, header


def test_raw_submission_delivers(sub: TlsServer) -> None:
    before = set(sub.server.maildir_files("carol-box"))
    c = logged_in(sub.submission, CAROL, CAROL_PW)
    assert send_message(c, CAROL, CAROL)[0] == 250
    assert c.cmd("QUIT")[0] == 221
    c.close()
    assert _new_file(sub, "carol-box", before).read_bytes().endswith(b"Hello over TLS.\n")


def test_submission_adds_message_id_and_date(sub: TlsServer) -> None:
    before = set(sub.server.maildir_files("bob"))
    c = logged_in(sub.submission)
    bare = b"From: <alice@example.org>\r\nSubject: bare\r\n\r\nx\r\n"
    assert send_message(c, ALICE, BOB, bare)[0] == 250
    c.close()
    text = _new_file(sub, "bob", before).read_text()
    head = text.split("\n\n", 1)[0]
    assert "\nMessage-ID: <" in head.replace("Message-Id", "Message-ID"), head
    assert "\nDate: " in head, head


# ---- swaks -----------------------------------------------------------------------------------
@pytest.mark.skipif(SWAKS is None, reason="swaks not installed")
@pytest.mark.parametrize(
    ("mech", "tls_flag", "listener"),
    [("PLAIN", "--tls", "submission"), ("LOGIN", "--tls", "submission"),
     ("PLAIN", "--tlsc", "submissions"), ("LOGIN", "--tlsc", "submissions")],
)  # fmt: skip
def test_swaks_auth(sub: TlsServer, mech: str, tls_flag: str, listener: str) -> None:
    port = sub.submission if listener == "submission" else sub.submissions
    before = set(sub.server.maildir_files("bob"))
    proc = run_tool(
        [SWAKS or "swaks", "--server", f"127.0.0.1:{port}", tls_flag,
         "--auth", mech, "--auth-user", ALICE, "--auth-password", ALICE_PW,
         "--from", ALICE, "--to", BOB, "--helo", "swaks.test",
         "--header", f"Subject: swaks {mech}"],
    )  # fmt: skip
    out = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, out + proc.stderr.decode(errors="replace")
    assert "235 2.7.0" in out
    header = received_header(_new_file(sub, "bob", before))
    assert "from swaks.test" in header and " with ESMTPSA id " in header, header


@pytest.mark.skipif(SWAKS is None, reason="swaks not installed")
def test_swaks_wrong_password_fails(sub: TlsServer) -> None:
    # swaks cannot choose its source address: its failure goes to 127.0.0.1's throttle
    # record, which the next successful login (any test) clears again.
    proc = run_tool(
        [SWAKS or "swaks", "--server", f"127.0.0.1:{sub.submission}", "--tls",
         "--auth", "PLAIN", "--auth-user", ALICE, "--auth-password", "wrong",
         "--from", ALICE, "--to", BOB],
    )  # fmt: skip
    assert proc.returncode != 0
    assert "535 5.7.8" in proc.stdout.decode(errors="replace")
    logged_in(sub.submission).close()  # clears 127.0.0.1's record


# ---- msmtp -----------------------------------------------------------------------------------
@pytest.mark.skipif(MSMTP is None, reason="msmtp not installed")
@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_msmtp(sub: TlsServer, tmp_path: Path, mode: str) -> None:
    port = sub.submission if mode == "starttls" else sub.submissions
    conf = tmp_path / "msmtprc"
    conf.write_text(
        "account default\n"
        "host 127.0.0.1\n"
        f"port {port}\n"
        f"from {CAROL}\n"
        "auth on\n"
        f"user {CAROL}\n"
        f"password {CAROL_PW}\n"
        "tls on\n"
        f"tls_starttls {'on' if mode == 'starttls' else 'off'}\n"
        "tls_certcheck off\n"
        "domain msmtp.test\n"
        f"logfile {tmp_path / 'msmtp.log'}\n"
    )
    conf.chmod(0o600)
    before = set(sub.server.maildir_files("alice"))
    message = f"From: Carol <{CAROL}>\nTo: {ALICE}\nSubject: via msmtp {mode}\n\nHi Alice.\n"
    proc = subprocess.run(
        [MSMTP or "msmtp", "-C", str(conf), ALICE],
        input=message.encode(),
        capture_output=True,
        timeout=SAFETY,
        check=False,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    new = _new_file(sub, "alice", before)
    header = received_header(new)
    assert "from msmtp.test" in header and " with ESMTPSA id " in header, header
    assert f"Subject: via msmtp {mode}" in new.read_text()


@pytest.mark.skipif(MSMTP is None, reason="msmtp not installed")
def test_msmtp_sender_not_owned_is_refused(sub: TlsServer, tmp_path: Path) -> None:
    conf = tmp_path / "msmtprc"
    conf.write_text(
        f"account default\nhost 127.0.0.1\nport {sub.submissions}\nfrom {BOB}\nauth on\n"
        f"user {CAROL}\npassword {CAROL_PW}\ntls on\ntls_starttls off\ntls_certcheck off\n"
    )
    conf.chmod(0o600)
    proc = subprocess.run(
        [MSMTP or "msmtp", "-C", str(conf), ALICE],
        input=b"Subject: x\n\nx\n",
        capture_output=True,
        timeout=SAFETY,
        check=False,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    assert proc.returncode != 0
    assert "553" in proc.stderr.decode(errors="replace")


def test_submission_keeps_existing_message_id_and_date(sub: TlsServer) -> None:
    before = set(sub.server.maildir_files("bob"))
    c = logged_in(sub.submission)
    full = (
        b"From: <alice@example.org>\r\nMessage-ID: <mine@example.org>\r\n"
        b"Date: Sun, 22 Nov 2026 05:00:00 +0000\r\nSubject: full\r\n\r\nx\r\n"
    )
    assert send_message(c, ALICE, BOB, full)[0] == 250
    c.close()
    head = _new_file(sub, "bob", before).read_text().split("\n\n", 1)[0]
    assert head.count("Message-ID:") == 1 and "<mine@example.org>" in head, head
    assert head.count("\nDate:") == 1, head
