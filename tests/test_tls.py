"""postier.tls and postier.gencert against real sockets and real clients (Python, openssl).

The server here is a tiny asyncio echo server that accepts in plaintext and upgrades with
`StreamWriter.start_tls(store.context())`, asking the store once per connection, exactly as
the SMTP session will after STARTTLS (or at once on the implicit-TLS port).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import os
import re
import shutil
import socket
import ssl
import stat
import subprocess
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from postier import gencert
from postier.errors import ConfigError
from postier.tls import CertificateStore, client_context, describe

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl CLI not installed")
SAFETY = 30  # seconds: only keeps a broken test from hanging, never a pass/fail threshold


# --- helpers ---------------------------------------------------------------------------------


def pair(directory: Path, hostname: str, key_type: str = "ecdsa") -> tuple[Path, Path]:
    """A self-signed chain and key for hostname under directory, certbot-style names."""
    cert, key = directory / "fullchain.pem", directory / "privkey.pem"
    gencert.write_pair(cert, key, hostname, key_type=key_type, overwrite=True)
    return cert, key


def wildcard_pair(directory: Path, name: str) -> None:
    """A pair whose only SAN is a wildcard (gen-cert, rightly, will not make those)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "fullchain.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "privkey.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def peer_names(sock: ssl.SSLSocket) -> list[str]:
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.DNSName)


class EchoServer:
    """Line echo over TLS on 127.0.0.1, its event loop in a thread so clients can block."""

    def __init__(self, contexts: Callable[[], ssl.SSLContext]) -> None:
        self.contexts = contexts
        self.described: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await writer.start_tls(self.contexts())
            self.described.append(describe(writer.get_extra_info("ssl_object")))
            while line := await reader.readline():
                writer.write(line)
                await writer.drain()
        except (ssl.SSLError, OSError):
            pass
        finally:
            writer.close()

    def __enter__(self) -> EchoServer:
        self.thread.start()
        start = asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.server = asyncio.run_coroutine_threadsafe(start, self.loop).result(SAFETY)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            self.server.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(SAFETY)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(SAFETY)
        self.loop.close()

    def connect(
        self,
        ctx: ssl.SSLContext | None = None,
        server_name: str | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=SAFETY)
        ctx = ctx or client_context(verify=False)
        return ctx.wrap_socket(raw, server_hostname=server_name, session=session)

    def s_client(self, *args: str) -> subprocess.CompletedProcess[str]:
        assert OPENSSL is not None
        return subprocess.run(
            [OPENSSL, "s_client", "-brief", "-connect", f"127.0.0.1:{self.port}", *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=SAFETY,
        )


def echo(sock: ssl.SSLSocket, text: bytes = b"ping\n") -> None:
    sock.sendall(text)
    assert sock.recv(100) == text


def old_client(version: ssl.TLSVersion) -> ssl.SSLContext:
    """A client that speaks nothing newer than `version` (and accepts weak suites for it)."""
    with warnings.catch_warnings():  # the TLSv1/TLSv1_1 names are deprecated, on purpose
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = version
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


@pytest.fixture
def default_pair(tmp_path: Path) -> tuple[Path, Path]:
    return pair(tmp_path / "default", "mail.example.org")


@pytest.fixture
def store(default_pair: tuple[Path, Path]) -> CertificateStore:
    return CertificateStore(*default_pair)


@pytest.fixture
def server(store: CertificateStore) -> Iterator[EchoServer]:
    with EchoServer(store.context) as srv:
        yield srv


# --- protocol versions and ciphers -----------------------------------------------------------


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_python_client_tls12_and_13(server: EchoServer, version: ssl.TLSVersion) -> None:
    ctx = client_context(verify=False)
    ctx.minimum_version = ctx.maximum_version = version
    with server.connect(ctx) as sock:
        echo(sock)
        assert sock.version() == version.name.replace("v1_", "v1.")
        text = describe(sock)
        assert re.fullmatch(rf"version={sock.version()} cipher=\S+ bits=\d+", text)
    assert server.described == [text]  # the server side describes the same session


@needs_openssl
@pytest.mark.parametrize("flag,expected", [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")])
def test_openssl_client_tls12_and_13(server: EchoServer, flag: str, expected: str) -> None:
    result = server.s_client("-servername", "mail.example.org", flag)
    assert result.returncode == 0, result.stderr
    assert f"Protocol version: {expected}" in result.stderr


def permissive_server(
    pair_files: tuple[Path, Path], version: ssl.TLSVersion
) -> Callable[[], ssl.SSLContext]:
    """Contexts for a server that speaks TLS 1.0 up to `version`, weak suites included."""

    def make() -> ssl.SSLContext:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = version
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        ctx.load_cert_chain(*pair_files)
        return ctx

    return make


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_old_protocols_refused(
    server: EchoServer, default_pair: tuple[Path, Path], version: ssl.TLSVersion
) -> None:
    # Control: a permissive server shows whether this client can speak the old version here.
    # If the local OpenSSL could not offer it at all, the refusal below would prove less, but
    # the property that matters (no handshake below TLS 1.2) is asserted either way.
    with EchoServer(permissive_server(default_pair, version)) as control:
        try:
            with control.connect(old_client(version)) as sock:
                echo(sock)
                spoken = sock.version()
        except (ssl.SSLError, OSError):
            spoken = None  # this OpenSSL cannot speak it at all: only the refusal is checked
        assert spoken in (None, version.name.replace("v1_", "v1."))
        # Outbound, too: our client context will not go below TLS 1.2 for a weak server.
        with pytest.raises((ssl.SSLError, OSError)):
            control.connect(client_context(verify=False))
    with pytest.raises((ssl.SSLError, OSError)):
        server.connect(old_client(version))


@needs_openssl
def test_openssl_tls11_refused(server: EchoServer) -> None:
    result = server.s_client("-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
    assert result.returncode != 0
    assert "Protocol version" not in result.stderr


@needs_openssl
def test_server_cipher_preference_and_dhe(tmp_path: Path) -> None:
    cert, key = pair(tmp_path, "rsa.example.org", key_type="rsa")
    with EchoServer(CertificateStore(cert, key).context) as srv:
        # The client prefers DHE; the server's order (ECDHE first) must win.
        both = srv.s_client(
            "-tls1_2", "-cipher", "DHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256"
        )
        assert "Ciphersuite: ECDHE-RSA-AES128-GCM-SHA256" in both.stderr, both.stderr
        # DHE alone works, so the DH parameters really are loaded.
        dhe = srv.s_client("-tls1_2", "-cipher", "DHE-RSA-AES128-GCM-SHA256")
        assert "Ciphersuite: DHE-RSA-AES128-GCM-SHA256" in dhe.stderr, dhe.stderr
        # CBC-only, no forward secrecy: not in the intermediate list.
        cbc = srv.s_client("-tls1_2", "-cipher", "AES128-SHA")
        assert cbc.returncode != 0


def test_session_tickets_resume_tls12(server: EchoServer) -> None:
    ctx = client_context(verify=False)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with server.connect(ctx) as first:
        echo(first)
        session = first.session
        assert not first.session_reused
    assert session is not None and session.has_ticket  # tickets on, not just a session cache
    with server.connect(ctx, session=session) as second:
        echo(second)
        assert second.session_reused


# --- SNI -------------------------------------------------------------------------------------


def test_sni_picks_certificate(tmp_path: Path, default_pair: tuple[Path, Path]) -> None:
    certs = tmp_path / "live"
    pair(certs / "a.example.org", "a.example.org")
    pair(certs / "b.example.com", "b.example.com")
    wildcard_pair(certs / "example.net", "*.example.net")
    (certs / "README").write_text("certbot leaves this here\n")
    (certs / "half").mkdir()  # no files: skipped with a warning, not fatal
    store = CertificateStore(*default_pair, cert_dir=certs)
    with EchoServer(store.context) as srv:
        for name, expected in [
            ("a.example.org", "a.example.org"),
            ("B.Example.COM.", "b.example.com"),
            ("mx.example.net", "*.example.net"),
            ("deep.mx.example.net", "mail.example.org"),
            ("unknown.example", "mail.example.org"),
            (None, "mail.example.org"),
        ]:
            with srv.connect(server_name=name) as sock:
                echo(sock)
                assert peer_names(sock)[0] == expected, name
        if OPENSSL:
            result = srv.s_client("-servername", "b.example.com")
            assert "Peer certificate: CN = b.example.com" in result.stderr, result.stderr


# --- reload ----------------------------------------------------------------------------------


def test_reload_swaps_for_new_connections_only(
    server: EchoServer,
    store: CertificateStore,
    default_pair: tuple[Path, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    cert, _ = default_pair
    with server.connect() as old:
        echo(old)
        pair(cert.parent, "renewed.example.org")
        with caplog.at_level(logging.INFO, logger="postier.tls"):
            assert store.reload()
        assert store.generation == 2
        assert any("reloaded" in r.getMessage() for r in caplog.records)
        with server.connect() as new:
            echo(new)
            assert peer_names(new)[0] == "renewed.example.org"
        echo(old, b"still here\n")  # the open connection keeps working, on its old cert
        assert peer_names(old)[0] == "mail.example.org"


def garbage_key(cert: Path, key: Path) -> None:
    key.write_text("not a key\n")


def foreign_key(cert: Path, key: Path) -> None:
    _, other = pair(key.parent / "other", "other.example")
    key.write_bytes(other.read_bytes())


def missing_cert(cert: Path, key: Path) -> None:
    cert.unlink()


@pytest.mark.parametrize(
    "breakage,message",
    [
        (garbage_key, "no valid PEM private key"),
        (foreign_key, "does not belong"),
        (missing_cert, "cannot read the TLS certificate"),
    ],
)
def test_bad_files_on_reload_keep_old_cert(
    server: EchoServer,
    store: CertificateStore,
    default_pair: tuple[Path, Path],
    caplog: pytest.LogCaptureFixture,
    breakage: Callable[[Path, Path], object],
    message: str,
) -> None:
    breakage(*default_pair)
    with caplog.at_level(logging.ERROR, logger="postier.tls"):
        assert not store.reload()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and message in errors[0], errors
    assert store.generation == 1
    with server.connect() as sock:
        echo(sock)
        assert peer_names(sock)[0] == "mail.example.org"


def test_watch_follows_certbot_symlink_flip(
    tmp_path: Path, default_pair: tuple[Path, Path]
) -> None:
    live, archive = tmp_path / "live", tmp_path / "archive"
    pair(archive / "1", "site.example.org")
    pair(archive / "2", "site.example.org")
    site = live / "site.example.org"
    site.mkdir(parents=True)
    for name in ("fullchain.pem", "privkey.pem"):
        (site / name).symlink_to(archive / "1" / name)
    store = CertificateStore(*default_pair, cert_dir=live)

    def serial() -> int:
        with EchoServer(store.context) as srv, srv.connect(server_name="site.example.org") as s:
            return x509.load_der_x509_certificate(s.getpeercert(True) or b"").serial_number

    def current(n: str) -> int:
        pem = (archive / n / "fullchain.pem").read_bytes()
        return x509.load_pem_x509_certificate(pem).serial_number

    assert serial() == current("1")

    async def flip_and_wait() -> None:
        task = asyncio.create_task(store.watch(interval=0.01))
        for name in ("privkey.pem", "fullchain.pem"):  # certbot: new link, then rename over
            tmp_link = site / f".{name}.new"
            tmp_link.symlink_to(archive / "2" / name)
            os.replace(tmp_link, site / name)
        while store.generation == 1:
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(asyncio.wait_for(flip_and_wait(), SAFETY))
    assert serial() == current("2")


# --- construction errors ---------------------------------------------------------------------


def test_startup_errors_name_the_file(tmp_path: Path, default_pair: tuple[Path, Path]) -> None:
    cert, key = default_pair
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path / "missing.pem"))):
        CertificateStore(tmp_path / "missing.pem", key)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello\n")
    with pytest.raises(ConfigError, match="no valid PEM certificate"):
        CertificateStore(garbage, key)
    locked = tmp_path / "locked.pem"
    loaded = serialization.load_pem_private_key(key.read_bytes(), password=None)
    locked.write_bytes(
        loaded.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(ConfigError, match="passphrase"):
        CertificateStore(cert, locked)
    with pytest.raises(ConfigError, match="swapped"):
        CertificateStore(key, cert)
    with pytest.raises(ConfigError, match="certificate directory"):
        CertificateStore(cert, key, cert_dir=tmp_path / "nowhere")


# --- outbound client contexts ----------------------------------------------------------------


def test_client_context_verified_and_opportunistic(
    server: EchoServer, default_pair: tuple[Path, Path]
) -> None:
    cert, _ = default_pair
    verified = client_context(verify=True, ca_file=cert)
    with server.connect(verified, server_name="mail.example.org") as sock:
        echo(sock)
    with pytest.raises(ssl.SSLCertVerificationError):
        server.connect(client_context(verify=True, ca_file=cert), server_name="wrong.example")
    with pytest.raises(ssl.SSLCertVerificationError):  # system CAs do not know it
        server.connect(client_context(verify=True), server_name="mail.example.org")
    with server.connect(client_context(verify=False), server_name="wrong.example") as sock:
        echo(sock)
    with pytest.raises(ConfigError, match="cannot load CA certificates"):
        client_context(verify=True, ca_file=cert.parent / "none.pem")


# --- gen-cert --------------------------------------------------------------------------------


def gen_cert(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="postier gen-cert")
    gencert.add_arguments(parser)
    return gencert.run(parser.parse_args(argv))


def test_gen_cert_writes_usable_pair(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "certs"
    assert gen_cert("mx.example.org", "-o", str(out), "--days", "30") == 0
    cert, key = out / "fullchain.pem", out / "privkey.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert str(key) in capsys.readouterr().out
    parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    san = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mx.example.org", "localhost"]
    assert {str(a) for a in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    with EchoServer(CertificateStore(cert, key).context) as srv:
        for name in ("mx.example.org", "localhost"):
            with srv.connect(client_context(verify=True, ca_file=cert), name) as sock:
                echo(sock)
    before = cert.read_bytes()
    assert gen_cert("mx.example.org", "-o", str(out)) == 1  # refuses to overwrite
    assert cert.read_bytes() == before and "--force" in capsys.readouterr().err
    assert gen_cert("mx.example.org", "-o", str(out), "--force", "--key-type", "rsa") == 0
    assert cert.read_bytes() != before
    assert (
        gen_cert(
            "mx.example.org", "--cert", str(tmp_path / "c.pem"), "--key", str(tmp_path / "k.pem")
        )
        == 0
    )
    assert stat.S_IMODE((tmp_path / "k.pem").stat().st_mode) == 0o600
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary left


@pytest.mark.parametrize(
    "argv",
    [
        ["mx.example.org", "--cert", "c.pem"],
        ["mx.example.org", "-o", "d", "--cert", "c.pem", "--key", "k.pem"],
        ["mx.example.org", "--days", "0"],
        ["not a host name"],
        ["mx.example.org", "--cert", "same.pem", "--key", "same.pem"],
    ],
)
def test_gen_cert_usage_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert gen_cert(*argv) == 2
    assert list(tmp_path.iterdir()) == []


def test_ensure_self_signed_is_idempotent(tmp_path: Path) -> None:
    cert, key = tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem"
    assert gencert.ensure_self_signed(cert, key, "mail.example.org") is True
    first = cert.read_bytes(), key.read_bytes()
    assert gencert.ensure_self_signed(cert, key, "mail.example.org") is False
    assert (cert.read_bytes(), key.read_bytes()) == first
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    key.unlink()
    with pytest.raises(ConfigError, match=r"key\.pem does not"):
        gencert.ensure_self_signed(cert, key, "mail.example.org")
    assert cert.read_bytes() == first[0]
