"""Issue 3 end to end: TLS on a real `postier serve`, with real clients.

Clients: raw sockets wrapped with `ssl` (for injection and SNI), smtplib (`starttls()`,
`SMTP_SSL`), `openssl s_client` (STARTTLS and implicit TLS) and `swaks --tls` / `--tlsc`.
Every wait is bounded by SAFETY, which only keeps a broken server from hanging the suite;
nothing here measures time.

The helpers at the top (`Client`, `start_tls_server`, `wait_log` ...) are shared with
tests/test_submission.py.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from postier.auth.passwd import hash_password
from postier.gencert import write_pair
from tests.rawsmtp import RawReplies
from tests.server import PostierServer, free_port, make_server, wait_until

SAFETY = 20.0  # seconds; bounds a hung peer, never a measurement
OPENSSL = shutil.which("openssl")
SWAKS = shutil.which("swaks")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl CLI not installed")
needs_swaks = pytest.mark.skipif(SWAKS is None, reason="swaks not installed")

MESSAGE = b"From: someone\r\nSubject: tls test\r\n\r\nHello over TLS.\r\n"


# ---- shared helpers ------------------------------------------------------------------------
def client_context(*, legacy_only: bool = False) -> ssl.SSLContext:
    """A client context that accepts the self-signed test certificates.

    legacy_only: offer TLS 1.0 and 1.1 and nothing newer (with every cipher allowed), the
    client a server with a TLS 1.2 floor must refuse.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if legacy_only:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        ctx.set_ciphers("ALL:@SECLEVEL=0")
    return ctx


class Client(RawReplies):
    """A raw SMTP client over a socket that can switch to TLS at any point."""

    def __init__(
        self,
        port: int,
        *,
        source: str | None = None,
        implicit: bool = False,
        server_hostname: str | None = None,
        context: ssl.SSLContext | None = None,
    ) -> None:
        src = (source, 0) if source else None
        self.sock: socket.socket = socket.create_connection(
            ("127.0.0.1", port), timeout=SAFETY, source_address=src
        )
        self.buf = b""
        if implicit:
            self.wrap(server_hostname, context)

    def wrap(self, server_hostname: str | None = None, context: ssl.SSLContext | None = None):
        assert not self.buf, f"unread plaintext before the handshake: {self.buf!r}"
        ctx = context or client_context()
        self.sock = ctx.wrap_socket(self.sock, server_hostname=server_hostname)
        return self.sock

    def cmd(self, line: str) -> tuple[int, str]:
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def ehlo(self, name: str = "client.test") -> tuple[int, str]:
        return self.cmd(f"EHLO {name}")

    def starttls(self, server_hostname: str | None = None, context=None) -> None:
        code, text = self.cmd("STARTTLS")
        assert (code, text) == (220, "220 2.0.0 Ready to start TLS")
        self.wrap(server_hostname, context)

    def peer_cert(self) -> x509.Certificate:
        assert isinstance(self.sock, ssl.SSLSocket)
        der = self.sock.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der)

    def closed(self) -> bool:
        """Read to the end of the stream: True once the server has closed the connection."""
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self.buf += data
        except (ConnectionResetError, ssl.SSLError, BrokenPipeError):
            return True

    def close(self) -> None:
        self.sock.close()


def common_name(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def wait_log(server: PostierServer, pattern: str, after: int = 0) -> str:
    """The first log line at or after offset `after` matching the regex; bounded by SAFETY."""
    rx = re.compile(pattern)
    deadline = time.monotonic() + SAFETY
    while True:
        for line in server.log()[after:].splitlines():
            if rx.search(line):
                return line
        if time.monotonic() > deadline:
            raise AssertionError(f"no log line matching {pattern!r}:\n{server.log()[after:]}")
        time.sleep(0.02)


def log_offset(server: PostierServer) -> int:
    return len(server.log())


@dataclass
class TlsServer:
    server: PostierServer
    submission: int
    submissions: int
    cert: Path
    key: Path
    cert_dir: Path
    passwords: dict[str, str]

    @property
    def mx(self) -> int:
        return self.server.mx_port

    @property
    def local(self) -> int:
        return self.server.local_port


def start_tls_server(
    tmp: Path,
    passwords: dict[str, str] | None = None,
    sni_names: tuple[str, ...] = ("a.example", "b.example"),
    prepare: Callable[[Path], None] | None = None,
    loop: str = "default",
    extra: list[str] | None = None,
) -> TlsServer:
    """A running server with a default certificate for mx.test, one certificate per SNI name
    in a --tls-cert-dir, --submission and --submissions listeners and an {ARGON2ID} password
    file (address -> password); `prepare(passwd_file)` may add to that file before start.

    loop="asyncio" runs the daemon on the standard event loop even where uvloop is
    installed (uvloop is an optional extra: the quick start runs without it), by making
    `import uvloop` fail in the server process through a sitecustomize module."""
    tmp.mkdir(parents=True, exist_ok=True)
    cert, key = tmp / "tls" / "cert.pem", tmp / "tls" / "key.pem"
    write_pair(cert, key, "mx.test")
    cert_dir = tmp / "tls" / "live"
    cert_dir.mkdir()
    for name in sni_names:
        write_pair(cert_dir / name / "fullchain.pem", cert_dir / name / "privkey.pem", name)
    passwords = dict(passwords or {"alice@example.org": "alice-secret"})
    lines = [f"{user}:{hash_password(pw)}" for user, pw in passwords.items()]
    (tmp / "passwd").write_text("\n".join(lines) + "\n")
    (tmp / "passwd").chmod(0o600)
    if prepare is not None:
        prepare(tmp / "passwd")
    submission, submissions = free_port(), free_port()
    srv = make_server(
        tmp,
        extra=[
            "--tls-cert", str(cert), "--tls-key", str(key), "--tls-cert-dir", str(cert_dir),
            "--submission", f"127.0.0.1:{submission}",
            "--submissions", f"127.0.0.1:{submissions}",
            "-P", str(tmp / "passwd"),
            *(extra or []),
        ],
    )  # fmt: skip
    if loop == "asyncio":
        hide = tmp / "no-uvloop"
        hide.mkdir()
        (hide / "sitecustomize.py").write_text("import sys\nsys.modules['uvloop'] = None\n")
        path = os.pathsep.join(filter(None, [str(hide), os.environ.get("PYTHONPATH")]))
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PYTHONPATH", path)
            srv.start()
        assert srv.logged("loop=asyncio"), srv.log()
    else:
        srv.start()
    return TlsServer(srv, submission, submissions, cert, key, cert_dir, passwords)


def send_message(c: Client, sender: str, rcpt: str, body: bytes = MESSAGE) -> tuple[int, str]:
    """MAIL, RCPT, DATA on an open session (after EHLO); returns the final reply."""
    assert c.cmd(f"MAIL FROM:<{sender}>")[0] == 250
    assert c.cmd(f"RCPT TO:<{rcpt}>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(body + b".\r\n")
    return c.reply()


def received_header(path: Path) -> str:
    """The Received: header we prepended (with its continuation lines), unfolded."""
    text = path.read_text(errors="replace")
    m = re.search(r"^Received: .*?(?=^\S)", text, re.S | re.M)
    assert m, text[:500]
    return " ".join(m.group(0).split())


def run_tool(args: list[str], stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(args, input=stdin, capture_output=True, timeout=SAFETY, check=False)


# ---- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["default", "asyncio"])
def tls(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[TlsServer]:
    """The shared TLS server, once on the default loop (uvloop when installed) and once on
    the standard asyncio loop: TLS start-up ordering differs between the two."""
    t = start_tls_server(tmp_path_factory.mktemp("tls"), loop=request.param)
    try:
        yield t
    finally:
        t.server.stop()


def ehlo_keywords(text: str) -> set[str]:
    return {line[4:].split()[0].upper() for line in text.splitlines()[1:]}


# ---- advertising -----------------------------------------------------------------------------
def test_starttls_advertised_on_mx_and_local_with_a_certificate(tls: TlsServer) -> None:
    for port in (tls.mx, tls.local, tls.submission):
        c = Client(port)
        assert c.reply()[0] == 220
        code, text = c.ehlo()
        assert code == 250 and "STARTTLS" in ehlo_keywords(text), (port, text)
        c.starttls()
        code, text = c.ehlo()
        assert code == 250 and "STARTTLS" not in ehlo_keywords(text), text
        c.cmd("QUIT")
        c.close()


def test_no_starttls_without_a_certificate(server: PostierServer) -> None:
    for port in (server.mx_port, server.local_port):
        c = Client(port)
        c.reply()
        code, text = c.ehlo()
        assert code == 250 and "STARTTLS" not in ehlo_keywords(text)
        assert c.cmd("STARTTLS")[0] == 502
        c.close()


def test_submission_without_certificate_is_a_config_error(tmp_path: Path) -> None:
    srv = make_server(tmp_path, extra=["--submission", f"127.0.0.1:{free_port()}"])
    proc = subprocess.run(
        [sys.executable, "-m", "postier", "serve", *srv.args],
        capture_output=True,
        timeout=SAFETY,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2
    assert b"tls" in proc.stderr.lower()


# ---- delivery inside TLS ---------------------------------------------------------------------
def test_delivery_inside_starttls_says_esmtps_with_version_and_cipher(tls: TlsServer) -> None:
    before = set(tls.server.maildir_files("bob"))
    with smtplib.SMTP("127.0.0.1", tls.mx, timeout=SAFETY) as s:
        s.ehlo("sender.test")
        assert s.has_extn("starttls")
        s.starttls(context=client_context())
        version, cipher = s.sock.version(), s.sock.cipher()[0]  # type: ignore[union-attr]
        s.ehlo("sender.test")
        s.sendmail("someone@remote.example", ["bob@example.org"], MESSAGE)
    (new,) = set(tls.server.maildir_files("bob")) - before
    header = received_header(new)
    assert " with ESMTPS id " in header, header
    assert f"version={version}" in header and f"cipher={cipher}" in header, header
    assert version in ("TLSv1.2", "TLSv1.3")
    assert new.read_bytes().endswith(b"Hello over TLS.\n")


def test_plaintext_delivery_says_esmtp(tls: TlsServer) -> None:
    before = set(tls.server.maildir_files("bob"))
    with smtplib.SMTP("127.0.0.1", tls.mx, timeout=SAFETY) as s:
        s.sendmail("someone@remote.example", ["bob@example.org"], MESSAGE)
    (new,) = set(tls.server.maildir_files("bob")) - before
    header = received_header(new)
    assert " with ESMTP id " in header and "cipher=" not in header, header


# ---- RFC 3207 state handling -----------------------------------------------------------------
def test_starttls_injection_220_then_pipelined_command_discarded(tls: TlsServer) -> None:
    mark = log_offset(tls.server)
    c = Client(tls.mx)
    c.reply()
    c.ehlo()
    c.send(b"STARTTLS\r\nRSET\r\n")  # one write: the CVE-2011-0411 pattern
    assert c.reply() == (220, "220 2.0.0 Ready to start TLS")
    # Anything the server said in plaintext after the 220 (a reply to RSET) would be read by
    # the handshake as a TLS record and make it fail.
    c.wrap()
    code, text = c.ehlo()
    assert code == 250 and text.startswith("250-mx.test Hello"), text  # not the RSET's 250
    assert c.cmd("NOOP")[0] == 250
    c.cmd("QUIT")
    c.close()
    wait_log(tls.server, r"event=starttls-injection .*discarded=6", mark)


def test_starttls_pipelined_command_never_answered_in_plaintext(tls: TlsServer) -> None:
    """The safety half of the injection case, whichever way the server refuses: the only
    plaintext reply after `STARTTLS\\r\\nRSET\\r\\n` is the STARTTLS one, and then either TLS
    follows (and the RSET is gone) or the connection closes."""
    c = Client(tls.mx)
    c.reply()
    c.ehlo()
    c.send(b"STARTTLS\r\nRSET\r\n")
    code, text = c.reply()
    if code == 220:
        c.wrap()
        code, text = c.ehlo()
        assert text.startswith("250-mx.test Hello"), text
    else:
        assert code == 554, text
        assert c.closed() and c.buf == b"", c.buf
    c.close()


def test_ehlo_required_again_after_starttls(tls: TlsServer) -> None:
    c = Client(tls.mx)
    c.reply()
    c.ehlo()
    c.starttls()
    assert c.cmd("MAIL FROM:<someone@remote.example>")[0] == 503
    assert c.ehlo()[0] == 250
    assert c.cmd("MAIL FROM:<someone@remote.example>")[0] == 250
    c.cmd("QUIT")
    c.close()


def test_envelope_forgotten_after_starttls(tls: TlsServer) -> None:
    c = Client(tls.mx)
    c.reply()
    c.ehlo()
    assert c.cmd("MAIL FROM:<someone@remote.example>")[0] == 250
    c.starttls()
    c.ehlo()
    # A MAIL from before TLS does not survive: a new MAIL is not "nested", RCPT needs MAIL.
    assert c.cmd("RCPT TO:<bob@example.org>")[0] == 503
    assert c.cmd("MAIL FROM:<other@remote.example>")[0] == 250
    c.close()


def test_starttls_inside_tls_is_refused(tls: TlsServer) -> None:
    c = Client(tls.mx)
    c.reply()
    c.ehlo()
    c.starttls()
    c.ehlo()
    assert c.cmd("STARTTLS") == (503, "503 5.5.1 TLS already active")
    assert c.cmd("NOOP")[0] == 250  # the session goes on
    c.close()
    c = Client(tls.submissions, implicit=True)
    c.reply()
    code, text = c.ehlo()
    assert code == 250 and "STARTTLS" not in ehlo_keywords(text)
    assert c.cmd("STARTTLS")[0] == 503
    c.close()


def test_ehlo_arriving_with_the_client_finished_is_answered(tls: TlsServer) -> None:
    """A TLS 1.3 client may send its first command right behind its Finished message, and
    the server may read both at once. That EHLO came through TLS: it must be answered, not
    dropped as plaintext injection (which left the session hanging on the asyncio loop)."""
    mark = log_offset(tls.server)
    c = Client(tls.mx)
    c.reply()
    c.ehlo()
    assert c.cmd("STARTTLS")[0] == 220
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls_obj = client_context().wrap_bio(incoming, outgoing)

    def pump() -> None:
        if outgoing.pending:
            c.sock.sendall(outgoing.read())
        data = c.sock.recv(65536)
        if not data:
            raise ConnectionError("server closed")
        incoming.write(data)

    while True:
        try:
            tls_obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            pump()
    tls_obj.write(b"EHLO coalesced.test\r\n")
    c.sock.sendall(outgoing.read())  # the Finished and the EHLO in one segment
    replies = b""

    def read_until(end: bytes) -> None:
        nonlocal replies
        while end not in replies:
            try:
                replies += tls_obj.read(65536)
            except ssl.SSLWantReadError:
                pump()

    read_until(b"250 HELP\r\n")
    assert replies.startswith(b"250-mx.test Hello"), replies
    # NOOP ends a pipelining group (RFC 2920 §3.1): wait for its reply before QUIT.
    tls_obj.write(b"NOOP\r\n")
    c.sock.sendall(outgoing.read())
    read_until(b"250 2.0.0 OK\r\n")
    tls_obj.write(b"QUIT\r\n")
    c.sock.sendall(outgoing.read())
    read_until(b"221 ")
    c.close()
    assert "event=starttls-injection" not in tls.server.log()[mark:]


@pytest.mark.parametrize("where", ["starttls", "implicit"])
def test_tls_1_0_and_1_1_refused(tls: TlsServer, where: str) -> None:
    mark = log_offset(tls.server)
    legacy = client_context(legacy_only=True)
    if where == "starttls":
        c = Client(tls.mx)
        c.reply()
        c.ehlo()
        assert c.cmd("STARTTLS")[0] == 220
        with pytest.raises((ssl.SSLError, ConnectionError)):
            c.wrap(context=legacy)
        c.close()
        wait_log(tls.server, r"event=tls-failed .*ip=127\.0\.0\.1 .*unsupported protocol", mark)
    else:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            Client(tls.submissions, implicit=True, context=legacy)
    # The same listener still serves a modern client.
    c = Client(tls.submissions if where == "implicit" else tls.mx, implicit=where == "implicit")
    if where == "starttls":
        c.reply()
        c.ehlo()
        c.starttls()
        assert c.sock.version() in ("TLSv1.2", "TLSv1.3")  # type: ignore[attr-defined]
    else:
        assert c.reply()[0] == 220
    c.close()


def test_tls_1_2_accepted_with_intermediate_cipher(tls: TlsServer) -> None:
    ctx = client_context()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    c = Client(tls.mx)
    c.reply()
    c.ehlo()
    c.starttls(context=ctx)
    assert c.sock.version() == "TLSv1.2"  # type: ignore[attr-defined]
    name = c.sock.cipher()[0]  # type: ignore[attr-defined]
    assert name.startswith(("ECDHE-", "DHE-")) and ("GCM" in name or "CHACHA20" in name), name
    c.close()


def resumptions(t: TlsServer, where: str, n: int, version: ssl.TLSVersion | None = None):
    """Connect n times, offering the previous connection's TLS session; session_reused of
    each connection."""
    ctx = client_context()
    if version is not None:
        ctx.maximum_version = version
    session, reused = None, []
    for _ in range(n):
        if where == "implicit":
            c = Client(t.submissions)
            c.sock = ctx.wrap_socket(c.sock, session=session)
            c.reply()
        else:  # "starttls" on submission; "mx" sends no tickets (tls.sends_tickets)
            c = Client(t.mx if where == "mx" else t.submission)
            c.reply()
            c.ehlo()
            assert c.cmd("STARTTLS")[0] == 220
            c.sock = ctx.wrap_socket(c.sock, session=session)
        assert c.ehlo()[0] == 250  # TLS 1.3 tickets arrive after the handshake
        assert c.cmd("QUIT")[0] == 221
        reused.append(c.sock.session_reused)  # type: ignore[attr-defined]
        session = c.sock.session  # type: ignore[attr-defined]
        c.close()
    return reused


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
@pytest.mark.parametrize("where", ["starttls", "implicit"])
def test_sessions_resume(tls: TlsServer, version: ssl.TLSVersion, where: str) -> None:
    """Session tickets are on for submission and submissions: our users' clients that
    reconnect resume instead of a full handshake."""
    assert resumptions(tls, where, 3, version) == [False, True, True]


def test_mx_sends_no_session_tickets(tls: TlsServer) -> None:
    """No tickets on mx: Outlook.com's senders abort STARTTLS when they get TLS 1.3 tickets.
    (TLS 1.2 may still resume by session ID from the worker's own cache: no ticket key.)"""
    assert resumptions(tls, "mx", 3, ssl.TLSVersion.TLSv1_3) == [False, False, False]


def wait_log_count(server: PostierServer, needle: str, count: int, after: int = 0) -> None:
    if not wait_until(lambda: server.log()[after:].count(needle) >= count, SAFETY):
        raise AssertionError(f"fewer than {count} {needle!r}:\n{server.log()[after:]}")


def test_sessions_resume_across_workers_and_reloads(tmp_path: Path) -> None:
    """With several worker processes a reconnect may reach another worker: the ticket keys
    must be the same in all of them, also after each worker reloaded its certificates."""
    t = start_tls_server(tmp_path / "workers", sni_names=(), extra=["--workers", "3"])
    try:
        wait_log_count(t.server, "event=ready", 3)  # a SIGHUP must find every worker
        for where in ("starttls", "implicit"):
            assert resumptions(t, where, 10) == [False] + [True] * 9, where
        write_pair(t.cert, t.key, "mx.test", overwrite=True)
        mark = log_offset(t.server)
        assert t.server.proc is not None
        t.server.proc.send_signal(signal.SIGHUP)
        wait_log_count(t.server, "TLS certificates reloaded", 3, mark)
        for where in ("starttls", "implicit"):
            assert resumptions(t, where, 10) == [False] + [True] * 9, where
        c = Client(t.submissions, implicit=True)
        assert der(c.peer_cert()) == der(load_cert(t.cert))
        c.close()
    finally:
        t.server.stop()


def test_failed_handshake_is_logged_and_closed_server_keeps_serving(tls: TlsServer) -> None:
    mark = log_offset(tls.server)
    c = Client(tls.mx)
    c.reply()
    c.ehlo()
    assert c.cmd("STARTTLS")[0] == 220
    c.send(b"this is not a TLS ClientHello\r\n" * 4)
    assert c.closed()
    c.close()
    line = wait_log(tls.server, r"event=tls-failed ", mark)
    assert "ip=127.0.0.1" in line
    wait_log(tls.server, r"event=disconnect .*reason=.*tls", mark)
    # Others are still served, in TLS.
    before = set(tls.server.maildir_files("alice"))
    c = Client(tls.mx)
    c.reply()
    c.ehlo()
    c.starttls()
    c.ehlo()
    assert send_message(c, "someone@remote.example", "alice@example.org")[0] == 250
    c.close()
    assert len(set(tls.server.maildir_files("alice")) - before) == 1


def test_peer_closing_during_handshake_does_not_hurt(tls: TlsServer) -> None:
    c = Client(tls.mx)
    c.reply()
    c.ehlo()
    assert c.cmd("STARTTLS")[0] == 220
    c.close()
    with smtplib.SMTP("127.0.0.1", tls.mx, timeout=SAFETY) as s:
        assert s.noop()[0] == 250


# ---- implicit TLS ----------------------------------------------------------------------------
def test_implicit_tls_smtp_ssl(tls: TlsServer) -> None:
    for _ in range(5):  # several in a row: the first connection must not be the only one
        with smtplib.SMTP_SSL(
            "127.0.0.1", tls.submissions, timeout=SAFETY, context=client_context()
        ) as s:
            code, _ = s.ehlo("client.test")
            assert code == 250
            assert s.has_extn("auth") and not s.has_extn("starttls")
            assert s.sock.version() in ("TLSv1.2", "TLSv1.3")  # type: ignore[union-attr]


def test_implicit_tls_plaintext_client_gets_no_greeting(tls: TlsServer) -> None:
    c = Client(tls.submissions)
    c.send(b"EHLO plaintext.test\r\n")
    # The server waits for a ClientHello; what it got is not one: it closes, without ever
    # answering in plaintext.
    assert c.closed()
    assert not c.buf.startswith(b"220"), c.buf
    c.close()


@needs_openssl
def test_implicit_tls_openssl_s_client(tls: TlsServer) -> None:
    out = s_client_dialogue(
        ["-connect", f"127.0.0.1:{tls.submissions}"], ["EHLO client.test", "QUIT"]
    )
    assert "220 mx.test" in out
    assert "250-AUTH PLAIN LOGIN" in out
    assert "221 " in out


@needs_openssl
def test_starttls_openssl_s_client(tls: TlsServer) -> None:
    out = s_client_dialogue(
        ["-starttls", "smtp", "-connect", f"127.0.0.1:{tls.mx}"],
        ["EHLO client.test", "MAIL FROM:<x@remote.example>", "RCPT TO:<bob@example.org>", "QUIT"],
        greeting=False,
    )
    assert "250-mx.test Hello" in out
    assert "250-STARTTLS" not in out
    assert "250 2.1.5" in out or "250 2.1.5" in out.replace("\r", ""), out


def s_client_dialogue(args: list[str], lines: list[str], *, greeting: bool = True) -> str:
    """Drive `openssl s_client -quiet` like a person: wait for each reply before the next
    command (a client that talks before the greeting is refused, as it should be)."""
    proc = subprocess.Popen(
        [OPENSSL or "openssl", "s_client", "-quiet", "-crlf", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    watchdog = threading.Timer(SAFETY, proc.kill)
    watchdog.start()
    assert proc.stdin is not None and proc.stdout is not None
    seen: list[str] = []

    def read_reply() -> None:
        while True:
            line = proc.stdout.readline().decode(errors="replace")  # type: ignore[union-attr]
            if not line:
                raise AssertionError(f"s_client ended early: {seen}")
            seen.append(line.rstrip("\r\n"))
            if re.match(r"\d{3} ", line):
                return

    try:
        if greeting:
            read_reply()
        for cmd in lines:
            proc.stdin.write(cmd.encode() + b"\n")
            proc.stdin.flush()
            read_reply()
        proc.stdin.close()
        proc.wait(SAFETY)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return "\n".join(seen)


# ---- SNI -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sni", "expected"),
    [("a.example", "a.example"), ("b.example", "b.example"), ("B.Example", "b.example"),
     ("other.example", "mx.test"), (None, "mx.test")],
)  # fmt: skip
def test_sni_picks_the_certificate_after_starttls(
    tls: TlsServer, sni: str | None, expected: str
) -> None:
    c = Client(tls.mx)
    c.reply()
    c.ehlo()
    c.starttls(server_hostname=sni)
    assert common_name(c.peer_cert()) == expected
    assert c.ehlo()[0] == 250
    c.close()


@pytest.mark.parametrize(("sni", "expected"), [("a.example", "a.example"), (None, "mx.test")])
def test_sni_picks_the_certificate_on_implicit_tls(
    tls: TlsServer, sni: str | None, expected: str
) -> None:
    c = Client(tls.submissions, implicit=True, server_hostname=sni)
    assert common_name(c.peer_cert()) == expected
    assert c.reply()[0] == 220
    c.close()


@needs_openssl
def test_sni_with_openssl_s_client(tls: TlsServer) -> None:
    proc = run_tool(
        [OPENSSL or "openssl", "s_client", "-connect", f"127.0.0.1:{tls.submissions}",
         "-servername", "b.example"],
    )  # fmt: skip
    out = proc.stdout.decode(errors="replace")
    assert re.search(r"subject=\s*CN\s*=\s*b\.example", out), out


# ---- reload ----------------------------------------------------------------------------------
def test_sighup_reload_swaps_certificate_existing_session_keeps_working(tmp_path: Path) -> None:
    t = start_tls_server(tmp_path / "reload", sni_names=())
    try:
        srv = t.server
        old = load_cert(t.cert)
        before = set(srv.maildir_files("alice"))
        # A session already in TLS with the old certificate.
        kept = Client(t.mx)
        kept.reply()
        kept.ehlo()
        kept.starttls()
        assert der(kept.peer_cert()) == der(old)
        kept.ehlo()
        implicit_old = Client(t.submissions, implicit=True)
        assert der(implicit_old.peer_cert()) == der(old)
        implicit_old.reply()

        write_pair(t.cert, t.key, "mx.test", overwrite=True)  # certbot renews in place
        new = load_cert(t.cert)
        assert der(new) != der(old)
        mark = log_offset(srv)
        assert srv.proc is not None
        srv.proc.send_signal(signal.SIGHUP)
        wait_log(srv, r"TLS certificates reloaded", mark)

        # New connections get the new certificate, on STARTTLS and on implicit TLS.
        fresh = Client(t.mx)
        fresh.reply()
        fresh.ehlo()
        fresh.starttls()
        assert der(fresh.peer_cert()) == der(new)
        fresh.close()
        implicit_new = Client(t.submissions, implicit=True)
        assert der(implicit_new.peer_cert()) == der(new)
        assert implicit_new.reply()[0] == 220
        implicit_new.close()

        # The sessions that started before the reload were not dropped.
        assert send_message(kept, "someone@remote.example", "alice@example.org")[0] == 250
        assert kept.cmd("QUIT")[0] == 221
        kept.close()
        assert implicit_old.ehlo()[0] == 250
        implicit_old.close()
        assert len(set(srv.maildir_files("alice")) - before) == 1
    finally:
        t.server.stop()


def test_broken_certificate_on_reload_keeps_the_old_one(tmp_path: Path) -> None:
    t = start_tls_server(tmp_path / "broken", sni_names=())
    try:
        old = load_cert(t.cert)
        t.key.write_text("not a key\n")
        mark = log_offset(t.server)
        assert t.server.proc is not None
        t.server.proc.send_signal(signal.SIGHUP)
        wait_log(t.server, r"TLS reload failed", mark)
        c = Client(t.mx)
        c.reply()
        c.ehlo()
        c.starttls()
        assert der(c.peer_cert()) == der(old)
        c.close()
        assert t.server.proc.poll() is None
    finally:
        t.server.stop()


# ---- swaks -----------------------------------------------------------------------------------
@needs_swaks
def test_swaks_tls_delivery(tls: TlsServer) -> None:
    before = set(tls.server.maildir_files("carol-box"))
    proc = run_tool(
        [SWAKS or "swaks", "--server", f"127.0.0.1:{tls.mx}", "--tls",
         "--from", "sender@remote.example", "--to", "carol@example.org",
         "--helo", "swaks.test", "--header", "Subject: swaks over TLS"],
    )  # fmt: skip
    out = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, out + proc.stderr.decode(errors="replace")
    assert "TLS started" in out or "STARTTLS" in out
    (new,) = set(tls.server.maildir_files("carol-box")) - before
    header = received_header(new)
    assert "from swaks.test" in header and " with ESMTPS id " in header, header


@needs_swaks
def test_swaks_tls_required_fails_cleanly_without_certificate(server: PostierServer) -> None:
    proc = run_tool(
        [SWAKS or "swaks", "--server", f"127.0.0.1:{server.mx_port}", "--tls",
         "--from", "sender@remote.example", "--to", "alice@example.org"],
    )  # fmt: skip
    assert proc.returncode != 0
    assert server.maildir_files("alice") == []
