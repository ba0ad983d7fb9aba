"""Real SMTP peers on loopback for tests: Postfix's smtp-sink, a private Postfix, a recorder.

- `SmtpSink`: `/usr/sbin/smtp-sink` on one address and a free port, optionally answering
  4xx/5xx on demand (its -r/-f/-q/-Q options) and dumping each message into a directory.
- `PrivatePostfix`: a full Postfix instance of our own (config, queue and log under a temp
  dir), receiving on a loopback port with STARTTLS and a recipient access table (per-recipient
  4xx/5xx), delivering into Maildirs under the temp dir.
- `RecordingProxy`: an asyncio TCP proxy that keeps every byte the client sent, so a test can
  check the exact wire format (dot-stuffing, no bare CR/LF), which the sinks' dumps normalise.
  With `tls=` it terminates implicit TLS (port-465 style) in front of a plaintext server.
- `make_cert(dir)`: a self-signed certificate for localhost, 127.0.0.1 and ::1 (openssl CLI).

Every process is started by us and stopped by its pid (or `postfix -c DIR stop`); waits are
bounded loops on "is the port accepting?", never sleeps tuned to this machine's speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.server import free_port  # re-exported: tests import it from here too

SMTP_SINK = "/usr/sbin/smtp-sink"
POSTFIX = "/usr/sbin/postfix"


def wait_for_port(host: str, port: int, *, attempts: int = 200, pause: float = 0.05) -> bool:
    """True once something accepts connections on (host, port); bounded attempts."""
    for _ in range(attempts):
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            time.sleep(pause)
    return False


@contextlib.contextmanager
def public_tmpdir() -> Iterator[Path]:
    """A temp dir that daemons running as other users (nobody, postfix, dovecot) can enter.

    pytest's tmp_path lives under a 0700 directory, which those users cannot traverse.
    """
    path = Path(tempfile.mkdtemp(prefix="postier-test-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def make_cert(directory: Path) -> tuple[Path, Path]:
    """(cert.pem, key.pem): self-signed P-256 for localhost, 127.0.0.1 and ::1."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


class SmtpSink:
    """`smtp-sink` on `host` (127.0.0.1 or ::1) and a free port.

    `options` are extra smtp-sink flags, e.g. ["-r", "RCPT"] (4xx to every RCPT),
    ["-f", "MAIL"] (5xx to MAIL), ["-Q", "CONNECT"] (421 greeting). Messages are dumped
    one file per message into `dump_dir` (read them with `messages()`).
    """

    def __init__(
        self,
        dump_dir: Path,
        *,
        host: str = "127.0.0.1",
        options: tuple[str, ...] = (),
        hostname: str = "sink.test",
        port: int = 0,
    ) -> None:
        self.dump_dir = dump_dir
        self.host = host
        self.options = options
        self.hostname = hostname
        self.port = port  # 0: a free one
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SmtpSink:
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dump_dir, 0o777)  # smtp-sink writes as nobody
        log = open(self.dump_dir.parent / f"smtp-sink-{id(self)}.log", "wb")  # noqa: SIM115
        fixed = self.port
        for _ in range(5):  # bounded: the free port may be taken between probe and bind
            self.port = fixed or free_port(self.host)
            host = f"[{self.host}]" if ":" in self.host else self.host
            listen = f"{host}:{self.port}"
            self.proc = subprocess.Popen(
                [
                    SMTP_SINK,
                    "-u",
                    "nobody",
                    "-h",
                    self.hostname,
                    "-d",
                    f"{self.dump_dir}/msg.",
                    *self.options,
                    listen,
                    "64",
                ],
                stdout=log,
                stderr=log,
            )
            if wait_for_port(self.host, self.port):
                log.close()
                return self
            self.stop()
        log.close()
        raise RuntimeError("smtp-sink did not start")

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
            self.proc = None

    def messages(self) -> list[bytes]:
        """The dumped messages (smtp-sink headers included), oldest first.

        smtp-sink opens a dump file when a transaction starts and removes it when the
        transaction is abandoned, so an empty file is a transaction in flight, not a message.
        """
        files = sorted(self.dump_dir.glob("msg.*"), key=lambda p: p.stat().st_mtime_ns)
        return [data for p in files if (data := p.read_bytes())]

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RecordingProxy:
    """Forward (host, port) ← 127.0.0.1:self.port and keep what the client sent in `sent`.

    With `tls` (a server SSLContext), the listening side speaks implicit TLS and the target
    gets plaintext: an SMTPS front for a plaintext sink. Runs in the caller's event loop.
    """

    def __init__(
        self, target_host: str, target_port: int, *, tls: ssl.SSLContext | None = None
    ) -> None:
        self.target = (target_host, target_port)
        self.tls = tls
        self.sent = bytearray()
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> RecordingProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection(*self.target)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, record: bool) -> None:
            try:
                while data := await src.read(65536):
                    if record:
                        self.sent += data
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        tasks = [
            asyncio.ensure_future(pump(reader, up_writer, True)),
            asyncio.ensure_future(pump(up_reader, writer, False)),
        ]
        self._tasks.update(tasks)
        await asyncio.gather(*tasks, return_exceptions=True)


_MASTER_CF = """\
{listen} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PrivatePostfix:
    """A private Postfix receiving for `domain` on 127.0.0.1:port into Maildirs.

    `users` are the local parts that exist (mail goes to `root/mail/<domain>/<user>/`);
    `access` maps a full recipient address to a reply, e.g. {"later@x": "450 4.2.0 busy"}.
    STARTTLS is offered with a self-signed certificate when `tls` is true.
    """

    def __init__(
        self,
        root: Path,
        domain: str,
        users: list[str],
        *,
        access: dict[str, str] | None = None,
        tls: bool = True,
        hostname: str = "peer.test",
        extra: dict[str, str] | None = None,
    ) -> None:
        self.root = root
        self.domain = domain
        self.users = users
        self.access = access or {}
        self.tls = tls
        self.hostname = hostname
        self.extra = extra or {}
        self.port = 0
        self.config_dir = root / "etc"
        self.maildir_base = root / "mail"
        self.log_file = root / "maillog"

    def _write_config(self) -> None:
        etc, spool, data = self.config_dir, self.root / "spool", self.root / "data"
        for d in (etc, spool, data, self.maildir_base):
            d.mkdir(parents=True, exist_ok=True)
        os.chown(self.maildir_base, 65534, 65534)
        pw = pwd.getpwnam("postfix")
        os.chown(data, pw.pw_uid, pw.pw_gid)  # master.lock and tls caches are written as postfix
        (etc / "access").write_text("".join(f"{k} {v}\n" for k, v in self.access.items()))
        (etc / "vmailbox").write_text(
            "".join(f"{u}@{self.domain} {self.domain}/{u}/\n" for u in self.users)
        )
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(spool),
            "data_directory": str(data),
            "maillog_file": str(self.log_file),
            "maillog_file_prefixes": str(self.root),
            "myhostname": self.hostname,
            "mydomain": "peer.test",
            "myorigin": "peer.test",
            "mydestination": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "alias_maps": "",
            "alias_database": "",
            "smtpd_recipient_restrictions": f"check_recipient_access texthash:{etc}/access, "
            "permit_mynetworks, reject_unauth_destination",
            "virtual_mailbox_domains": self.domain,
            "virtual_mailbox_base": str(self.maildir_base),
            "virtual_mailbox_maps": f"texthash:{etc}/vmailbox",
            "virtual_uid_maps": "static:65534",
            "virtual_gid_maps": "static:65534",
            "smtpd_tls_loglevel": "1",
            "smtpd_tls_received_header": "yes",
        }
        if self.tls:
            cert, key = make_cert(etc)
            settings |= {
                "smtpd_tls_security_level": "may",
                "smtpd_tls_cert_file": str(cert),
                "smtpd_tls_key_file": str(key),
            }
        settings |= self.extra
        (etc / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        (etc / "master.cf").write_text(_MASTER_CF.format(listen=f"127.0.0.1:{self.port}"))

    def _postfix(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [POSTFIX, "-c", str(self.config_dir), *args], capture_output=True, timeout=60
        )

    def start(self) -> PrivatePostfix:
        self.port = free_port()
        self._write_config()
        result = self._postfix("start")
        if result.returncode != 0 or not wait_for_port("127.0.0.1", self.port):
            log = self.log_file.read_text() if self.log_file.exists() else ""
            self.stop()
            raise RuntimeError(f"private postfix did not start: {result.stderr!r}\n{log}")
        return self

    def stop(self) -> None:
        # postfix-script signals the master by its pid file, waits, and escalates by itself.
        self._postfix("stop")

    def delivered(self, user: str, *, attempts: int = 400) -> list[bytes]:
        """Messages in <user>'s Maildir new/, waiting (bounded) until at least one is there."""
        new = self.maildir_base / self.domain / user / "new"
        for _ in range(attempts):
            files = sorted(new.glob("*")) if new.is_dir() else []
            if files:
                return [f.read_bytes() for f in files]
            time.sleep(0.05)
        return []

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def __enter__(self) -> PrivatePostfix:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def have(program: str) -> bool:
    return shutil.which(program) is not None or Path(program).exists()
