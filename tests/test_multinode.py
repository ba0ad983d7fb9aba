"""A small Internet in network namespaces: two postier MX nodes, Postfix, Dovecot, DNS.

    rtN-dns  10.251.0.2   the loopback DNS responder (tests/dnsserver.py) on port 53
    rtN-snd  10.251.0.5   a private Postfix, the sending MTA (resolv.conf bind-mounted in a
                          private mount namespace: it asks our responder, nothing else)
    rtN-mx1  10.251.0.11  postier, MX 10, `routes = { "example.test" = "lmtp:..." }` to a
                          Dovecot on mx1's loopback (LMTP and IMAP)
    rtN-mx2  10.251.0.12  postier, MX 20, `--relay-domain example.test`
    rtN-hub               the bridge all veth pairs plug into (the root namespace has none)

The story: mail flows Postfix → mx1 → Dovecot; with mx1 stopped Postfix falls over to mx2,
which queues; mx1 back, `postier queue flush` on mx2 delivers to it; a `kill -9` of mx2 with
mail in its queue and a restart lose nothing; every message is in Dovecot exactly once, read
over IMAP. Every namespace (and with it every link) is deleted however the test ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dovecot import CONFIG, MAIL_GROUP, MAIL_USER, available, mail_owner
from tests.dovecot import _stop as _stop_dovecot
from tests.server import wait_until as poll_until
from tests.sinks import PrivatePostfix, have, public_tmpdir

REPO = Path(__file__).resolve().parent.parent
NET = "10.251.0"
NODES = {"dns": 2, "snd": 5, "mx1": 11, "mx2": 12}
PREFIX = f"rt{os.getpid() % 100000}"
SAFETY = 60.0  # a bound on each wait, not a speed assertion


def _ip(*args: str, ns: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = ["ip", "netns", "exec", ns, *args] if ns else list(args)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        return "iproute2 or unshare is missing"
    if not have("/usr/sbin/postfix"):
        return "postfix is not installed"
    reason = available()
    if reason:
        return reason
    probe = f"{PREFIX}-probe"
    made = _ip("ip", "netns", "add", probe)
    if made.returncode != 0:
        return f"cannot create a network namespace here: {made.stderr.strip()}"
    _ip("ip", "netns", "del", probe)
    return None


def ns(name: str) -> str:
    return f"{PREFIX}-{name}"


@contextlib.contextmanager
def network() -> Iterator[None]:
    """The hub with its bridge, one namespace per node on 10.251.0.0/24; all deleted after."""
    made: list[str] = []
    try:
        for name in ["hub", *NODES]:
            assert _ip("ip", "netns", "add", ns(name)).returncode == 0
            made.append(ns(name))
            _ip("ip", "link", "set", "lo", "up", ns=ns(name))
        _ip("ip", "link", "add", "br0", "type", "bridge", ns=ns("hub"))
        _ip("ip", "link", "set", "br0", "up", ns=ns("hub"))
        for name, host in NODES.items():
            outer, inner = f"{PREFIX}h{name}"[-15:], f"{PREFIX}n{name}"[-15:]
            res = _ip("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
            assert res.returncode == 0, res.stderr
            _ip("ip", "link", "set", outer, "netns", ns("hub"))
            _ip("ip", "link", "set", inner, "netns", ns(name))
            _ip("ip", "link", "set", outer, "master", "br0", "up", ns=ns("hub"))
            _ip("ip", "link", "set", inner, "name", "eth0", ns=ns(name))
            _ip("ip", "addr", "add", f"{NET}.{host}/24", "dev", "eth0", ns=ns(name))
            _ip("ip", "link", "set", "eth0", "up", ns=ns(name))
        yield
    finally:
        for name in reversed(made):  # a namespace takes its links with it
            _ip("ip", "netns", "del", name)


def start(cmd: list[str], node: str, log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "ab")  # noqa: SIM115 - the child keeps it
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(["ip", "netns", "exec", ns(node), *cmd], stdout=out, stderr=out,
                            stdin=subprocess.DEVNULL, env=env, cwd=REPO)  # fmt: skip
    out.close()
    return proc


def wait_until(predicate, timeout: float = SAFETY) -> bool:  # type: ignore[no-untyped-def]
    return poll_until(predicate, timeout, 0.2)  # predicates run commands in namespaces


class Node:
    """A postier serve process inside a namespace, restartable, killable."""

    def __init__(self, name: str, root: Path, args: list[str]) -> None:
        self.name, self.root, self.args = name, root, args
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "postier.log"

    def start(self) -> Node:
        offset = self.log.stat().st_size if self.log.exists() else 0
        cmd = [sys.executable, "-m", "postier", "serve", *self.args]
        self.proc = start(cmd, self.name, self.log)
        assert wait_until(lambda: "event=ready" in self.log.read_text()[offset:]), self.text()
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=SAFETY)
        self.proc = None

    def queue(self, *args: str) -> str:
        cmd = [sys.executable, "-m", "postier", "queue", *args, "-Q", str(self.root / "queue")]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=SAFETY).stdout


def postier_node(name: str, root: Path, *extra: str) -> Node:
    root.mkdir(parents=True, exist_ok=True)
    (root / "users").write_text("bob@example.test\n")
    ip = f"{NET}.{NODES[name]}"
    return Node(name, root, [
        "-H", f"{name}.example.test", "-R", str(root / "mail"), "-Q", str(root / "queue"),
        "-u", str(root / "users"), "--mx", f"{ip}:25", "--local", "127.0.0.1:2525",
        "--workers", "1", "--dns-server", f"{NET}.2:53", *extra,
    ])  # fmt: skip


ZONE = {
    "example.test": {"MX": [(10, "mx1.example.test"), (20, "mx2.example.test")]},
    "mx1.example.test": {"A": [f"{NET}.11"]},
    "mx2.example.test": {"A": [f"{NET}.12"]},
    "snd.test": {"A": [f"{NET}.5"]},
}

DNS_SERVER = """
import json, sys, time
from tests.dnsserver import DnsServer
with DnsServer(json.loads(sys.argv[1]), host=sys.argv[2], port=53):
    print("ready", flush=True)
    while True:
        time.sleep(3600)
"""

IMAP_COUNT = """
import imaplib, sys
imap = imaplib.IMAP4("127.0.0.1", int(sys.argv[1]))
imap.login("bob", "bob-secret")
imap.select("INBOX", readonly=True)
_, data = imap.search(None, "ALL")
subjects = []
for num in data[0].split():
    _, parts = imap.fetch(num, "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    subjects.append(parts[0][1].decode().strip())
print("\\n".join(subjects))
imap.logout()
"""


@pytest.mark.skipif((why := _why_not()) is not None, reason=why or "")
def test_two_mx_nodes_postfix_and_dovecot_in_namespaces() -> None:
    with public_tmpdir() as tmp, network():
        procs: list[subprocess.Popen[bytes]] = []
        nodes: list[Node] = []
        postfix: PrivatePostfix | None = None
        dovecot_conf = tmp / "dovecot" / "dovecot.conf"
        try:
            # DNS
            dns_proc = start(
                [sys.executable, "-c", DNS_SERVER, json.dumps(ZONE), f"{NET}.2"], "dns",
                tmp / "dns.log",
            )  # fmt: skip
            procs.append(dns_proc)
            assert wait_until(lambda: "ready" in (tmp / "dns.log").read_text())

            # Dovecot on mx1's loopback: LMTP for delivery, IMAP to read.
            wd = tmp / "dovecot"
            (wd / "home" / "bob").mkdir(parents=True)
            uid, gid = mail_owner()
            os.chown(wd / "home" / "bob", uid, gid)
            (wd / "mail").mkdir()
            os.chown(wd / "mail", uid, gid)
            (wd / "passwd").write_text("bob:{PLAIN}bob-secret::::::\n")
            (wd / "passwd").chmod(0o644)
            dovecot_conf.write_text(CONFIG.format(
                wd=wd, protocols="imap lmtp", mail_location=f"maildir:{wd}/mail/%n",
                mail_user=MAIL_USER, mail_group=MAIL_GROUP, imap_port=1143, lmtp_port=1024,
                extra="",
            ))  # fmt: skip
            # It daemonizes keeping the stdout it inherited: a file, never a pipe we wait on.
            with open(wd / "dovecot.out", "wb") as out:
                started = subprocess.run(
                    ["ip", "netns", "exec", ns("mx1"), "dovecot", "-c", str(dovecot_conf)],
                    stdout=out, stderr=out, stdin=subprocess.DEVNULL, timeout=SAFETY,
                )  # fmt: skip
            assert started.returncode == 0, (wd / "dovecot.out").read_text()

            def imap_subjects() -> list[str]:
                res = _ip(sys.executable, "-c", IMAP_COUNT, "1143", ns=ns("mx1"))
                return [s for s in res.stdout.splitlines() if s]

            assert wait_until(lambda: _ip(sys.executable, "-c", IMAP_COUNT, "1143",
                                          ns=ns("mx1")).returncode == 0)  # fmt: skip

            # mx1 (MX 10) routes the domain to Dovecot; mx2 (MX 20) is its backup.
            (tmp / "mx1").mkdir()
            (tmp / "mx1" / "postier.toml").write_text(
                'routes = { "example.test" = "lmtp:127.0.0.1:1024" }\n'
            )
            mx1 = postier_node(
                "mx1", tmp / "mx1", "-s", "example.test", "-c", str(tmp / "mx1" / "postier.toml")
            )
            mx2 = postier_node("mx2", tmp / "mx2", "--relay-domain", "example.test")
            nodes += [mx1, mx2]
            mx1.start()
            mx2.start()

            # The sending Postfix, asking our DNS responder through a bind-mounted resolv.conf.
            resolv = tmp / "resolv.conf"
            resolv.write_text(f"nameserver {NET}.2\noptions timeout:1 attempts:2\n")
            postfix = PrivatePostfix(tmp / "pf", "unused.test", [], tls=False, hostname="snd.test",
                                     extra={"inet_interfaces": "loopback-only",
                                            "smtp_tls_security_level": "none",
                                            "maximal_backoff_time": "10s",
                                            "minimal_backoff_time": "5s",
                                            "queue_run_delay": "5s"})  # fmt: skip
            postfix.port = 2525
            postfix._write_config()
            inside = (
                f"mount --bind {resolv} /etc/resolv.conf && postfix -c {postfix.config_dir} start"
            )
            with open(tmp / "postfix.out", "wb") as out:  # its daemons keep this too
                res = subprocess.run(
                    ["ip", "netns", "exec", ns("snd"), "unshare", "--mount", "sh", "-c", inside],
                    stdout=out, stderr=out, stdin=subprocess.DEVNULL, timeout=SAFETY,
                )  # fmt: skip
            assert res.returncode == 0, (tmp / "postfix.out").read_text() + postfix.log()

            def send(subject: str) -> None:
                done = subprocess.run(
                    ["ip", "netns", "exec", ns("snd"), "sendmail", "-C", str(postfix.config_dir),
                     "-i", "-f", "alice@snd.test", "bob@example.test"],
                    input=f"Subject: {subject}\n\n{subject}\n", text=True, capture_output=True,
                    timeout=SAFETY,
                )  # fmt: skip
                assert done.returncode == 0, done.stderr

            # 1. Postfix → mx1 → Dovecot.
            send("one")
            assert wait_until(lambda: "Subject: one" in imap_subjects()), postfix.log()

            # 2. mx1 down: Postfix falls over to mx2, which queues.
            mx1.stop()
            send("two")
            assert wait_until(lambda: "bob@example.test" in mx2.queue("list")), postfix.log()

            # 3. mx1 back: a flush on mx2 delivers to it.
            mx1.start()
            mx2.queue("flush")
            assert wait_until(lambda: "Subject: two" in imap_subjects()), mx2.text()
            assert wait_until(lambda: "bob@example.test" not in mx2.queue("list"))

            # 5. kill -9 of mx2 with mail in its queue, then a restart: nothing lost.
            mx1.stop()
            send("three")
            assert wait_until(lambda: "bob@example.test" in mx2.queue("list")), postfix.log()
            mx2.stop(signal.SIGKILL)
            mx2.start()
            mx1.start()
            mx2.queue("flush")
            assert wait_until(lambda: "Subject: three" in imap_subjects()), mx2.text()

            # 4. Every message in Dovecot exactly once.
            assert wait_until(lambda: "bob@example.test" not in mx2.queue("list"))
            assert sorted(imap_subjects()) == ["Subject: one", "Subject: three", "Subject: two"]
            assert "host=mx1.example.test" in mx2.text()
        finally:
            for node in nodes:
                node.stop(signal.SIGKILL)
            if postfix is not None:
                postfix.stop()
            if dovecot_conf.exists():
                _stop_dovecot(dovecot_conf, dovecot_conf.parent)
            for proc in procs:
                proc.kill()
                proc.wait(timeout=SAFETY)
