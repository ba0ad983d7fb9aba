"""Live reload under load: while 20 clients send, a user is added, an alias removed and a
password changed; no session drops, every worker sees the new data, AUTH takes the new
password, and a broken users file keeps the old one (logged with its file and line)."""

from __future__ import annotations

import os
import signal
import smtplib
import threading
import time
from pathlib import Path

from postier.auth.passwd import hash_password
from postier.log import parse_fields
from tests.server import PostierServer, wait_until
from tests.test_tls_integration import TlsServer, client_context, start_tls_server

CLIENTS = 20
MAX_MESSAGES = 25  # per client: bounds the load whatever the machine's speed
SAFETY = 60.0

USERS = "alice@example.org\nbob@example.org\n"
ALIASES = "team@example.org: alice@example.org, bob@example.org\n"


def replace_file(path: Path, text: str) -> None:
    """Write beside and rename, as editors and config tools do."""
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    os.replace(tmp, path)


def wait_log(t: TlsServer, needle: str, count: int = 1) -> None:
    seen = wait_until(lambda: t.server.log().count(needle) >= count, SAFETY, 0.05)
    assert seen, f"never logged {needle!r}:\n{t.server.log()[-3000:]}"


def rcpt_code(t: TlsServer, rcpt: str) -> int:
    with smtplib.SMTP("127.0.0.1", t.mx, timeout=SAFETY) as client:
        client.ehlo("client.test")
        client.mail("sender@example.net")
        return client.rcpt(rcpt)[0]


def auth_code(t: TlsServer, user: str, password: str) -> int:
    with smtplib.SMTP("127.0.0.1", t.submission, timeout=SAFETY) as client:
        client.starttls(context=client_context())
        try:
            return client.login(user, password)[0]
        except smtplib.SMTPAuthenticationError as exc:
            return exc.smtp_code


def two_workers(tmp_path: Path, reload_interval: float, *extra: str) -> TlsServer:
    """A TLS server with two workers, alice's password "old-secret" and this interval."""
    conf = tmp_path / "reload.toml"
    conf.write_text(f"reload_interval = {reload_interval}\n")
    return start_tls_server(
        tmp_path,
        passwords={"alice@example.org": "old-secret"},
        sni_names=(),
        extra=["--workers", "2", *extra, "-c", str(conf)],
    )


def ready_pids(srv: PostierServer, worker: int) -> list[int]:
    """The pids of a worker's `event=ready` lines, in order: one more each time it starts."""
    pids = []
    for line in srv.log().splitlines():
        kv = parse_fields(line[line.find("event=") :]) if "event=ready" in line else None
        if kv is not None and kv.get("worker") == str(worker):
            pids.append(int(kv["pid"]))
    return pids


def _load(t: TlsServer, stop: threading.Event, sent: list[int], errors: list[str]) -> None:
    try:
        with smtplib.SMTP("127.0.0.1", t.mx, timeout=SAFETY) as client:
            for n in range(MAX_MESSAGES):
                client.sendmail(
                    "load@example.net", ["alice@example.org"], f"Subject: {n}\r\n\r\nx\r\n"
                )
                sent.append(1)
                if stop.is_set():
                    break
    except Exception as exc:  # collected and asserted by the test
        errors.append(repr(exc))


def test_reload_under_load(tmp_path: Path) -> None:
    aliases = tmp_path / "aliases"
    aliases.write_text(ALIASES)
    t = two_workers(tmp_path, 0.2, "-a", str(aliases))
    try:
        users = tmp_path / "users"
        replace_file(users, USERS)  # the server started with carol: she goes
        wait_log(t, "what=users", 2)  # both workers
        assert rcpt_code(t, "team@example.org") == 250
        assert rcpt_code(t, "carol@example.org") == 550

        stop, sent, errors = threading.Event(), [], []
        threads = [
            threading.Thread(target=_load, args=(t, stop, sent, errors)) for _ in range(CLIENTS)
        ]
        for th in threads:
            th.start()
        while len(sent) < CLIENTS and not errors:  # every client is mid-session
            time.sleep(0.02)
        replace_file(users, USERS + "carol@example.org\n")
        replace_file(aliases, "")
        replace_file(t.server.root / "passwd", f"alice@example.org:{hash_password('new-secret')}\n")
        for what in ("users", "aliases", "pass"):
            for w in ("w0", "w1"):
                wait_log(t, f"postier[{w}] event=reload what={what}", 2 if what == "users" else 1)
        stop.set()
        for th in threads:
            th.join(SAFETY)
        assert errors == []
        assert len(t.server.maildir_files("alice")) == len(sent)

        for _ in range(6):  # fresh connections land on both workers
            assert rcpt_code(t, "carol@example.org") == 250
            assert rcpt_code(t, "team@example.org") == 550
        assert auth_code(t, "alice@example.org", "new-secret") == 235
        assert auth_code(t, "alice@example.org", "old-secret") == 535
        assert "result=failed" not in t.server.log()

        # A broken users file: the old data stays, the error names the file and line.
        replace_file(users, USERS + "carol@example.org\nnot a valid line\n")
        wait_log(t, "result=failed", 2)
        failed = next(x for x in t.server.log().splitlines() if "result=failed" in x)
        assert f"{users}:4:" in failed and "what=users" in failed
        assert rcpt_code(t, "carol@example.org") == 250

        # SIGHUP reloads everything; the fixed file takes effect.
        replace_file(users, USERS)
        os.kill(t.server.proc.pid, signal.SIGHUP)  # type: ignore[union-attr]
        wait_log(t, "result=ok reason=sighup")
        deadline = time.monotonic() + SAFETY
        while rcpt_code(t, "carol@example.org") != 550:
            assert time.monotonic() < deadline
        assert "event=worker-died" not in t.server.log()
    finally:
        assert t.server.stop() == 0


def test_dkim_keys_reload_and_a_bad_key_keeps_the_old_ones(tmp_path: Path) -> None:
    from postier.dkim.keys import generate_key
    from tests.server import make_server

    keys = tmp_path / "dkim"
    generate_key(keys, "example.org", "one", "ed25519")
    conf = tmp_path / "reload.toml"
    conf.write_text("reload_interval = 0.2\n")
    srv = make_server(tmp_path / "srv", extra=["--dkim-keys", str(keys), "-c", str(conf)])
    srv.start()
    try:
        assert srv.logged("selectors=one:ed25519")
        generate_key(keys, "example.org", "two", "ed25519")
        deadline = time.monotonic() + SAFETY
        while "event=reload what=dkim" not in srv.log():
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.05)
        assert srv.logged("result=ok reason=changed")
        assert srv.logged("selectors=one:ed25519,two:ed25519")

        (keys / "example.org" / "three.pem").write_text("not a key\n")
        while "what=dkim" not in "".join(x for x in srv.log().splitlines() if "result=failed" in x):
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.05)
        failed = next(x for x in srv.log().splitlines() if "result=failed" in x)
        assert "three.pem" in failed
    finally:
        assert srv.stop() == 0


def test_a_file_replaced_before_the_workers_start_is_reloaded(tmp_path: Path) -> None:
    """The start-up load and a worker's first look at the files are apart (the fork, queue
    recovery): a file replaced in between must still read as changed, not as the baseline."""
    import asyncio

    from postier.cli import load_config, make_parser
    from postier.net.daemon import build_context
    from postier.ops.reload import Reloader

    users = tmp_path / "users"
    users.write_text(USERS)
    argv = ["serve", "-H", "mx.test", "-s", "example.org", "-u", str(users)]
    argv += ["-R", str(tmp_path / "mail"), "-Q", str(tmp_path / "queue")]
    ctx = build_context(load_config(make_parser().parse_args(argv)))
    try:
        assert ctx.policy.users.keys() == {"alice@example.org", "bob@example.org"}
        replace_file(users, USERS + "carol@example.org\n")
        reloader = Reloader(ctx, 0.2)  # what a worker makes when it starts
        assert asyncio.run(reloader.reload(only_changed=True, reason="changed")) == 0
        assert "carol@example.org" in ctx.policy.users
    finally:
        ctx.executor.shutdown()


def test_a_respawned_worker_catches_up_before_it_serves(tmp_path: Path) -> None:
    """A worker that dies is replaced by a fork of the supervisor, which holds the start-up
    users, passwords and certificates: the new worker reloads what changed since before it
    takes a connection, not at its first timed check (an hour away here)."""
    from postier.gencert import write_pair
    from tests.test_tls_integration import Client, der, load_cert

    t = two_workers(tmp_path, 3600)
    srv = t.server
    try:
        assert srv.logged("worker=0", "worker=1")
        replace_file(tmp_path / "users", USERS + "carol@example.org\n")
        replace_file(srv.root / "passwd", f"alice@example.org:{hash_password('new-secret')}\n")
        write_pair(t.cert, t.key, "mx.test", overwrite=True)  # certbot renews in place
        new_cert = der(load_cert(t.cert))
        os.kill(srv.proc.pid, signal.SIGHUP)  # type: ignore[union-attr]
        for needle in ("what=users", "what=pass", "TLS certificates reloaded"):
            assert wait_until(lambda n=needle: srv.log().count(n) >= 2, SAFETY), srv.log()
        assert "result=failed" not in srv.log()

        [first] = ready_pids(srv, worker=1)
        os.kill(first, signal.SIGKILL)
        assert srv.logged("event=worker-died worker=1")
        assert wait_until(lambda: len(ready_pids(srv, worker=1)) == 2, SAFETY), srv.log()

        for _ in range(12):  # fresh connections land on both workers (1 in 4096 that not)
            assert rcpt_code(t, "carol@example.org") == 250
            client = Client(t.submissions, implicit=True)
            assert der(client.peer_cert()) == new_cert
            client.close()
            assert auth_code(t, "alice@example.org", "new-secret") == 235
    finally:
        assert srv.stop() == 1  # a worker was killed: the supervisor's exit status says so
