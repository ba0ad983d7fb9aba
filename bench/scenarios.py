"""The prepared comparisons of ``bench/run.py --scenario NAME``, and the targets they need.

- ``basic``: postier to Maildir at 1, 20 and 100 sessions, with ``--workers 1`` and ``2``.
- ``tls``: (a) new TLS sessions per second: connections that only say EHLO, STARTTLS, EHLO,
  QUIT (full handshakes, then resumed ones; implicit TLS likewise; plaintext EHLO, QUIT as the
  floor; one row with AUTH PLAIN against an ARGON2ID hash); (b) messages per second over
  plaintext, STARTTLS, STARTTLS + AUTH (submission) and implicit TLS + AUTH (submissions) on
  persistent connections.
- ``relay``: messages per second through the queue to a local smtp-sink, end to end (from
  the first MAIL to the last message the sink counted, and the queue empty after), sent to the
  ``local`` listener and to ``submission`` (STARTTLS + AUTH), beside local Maildir delivery.
  postier finds the sink by MX: a DNS responder on loopback (tests/dnsserver.py) maps
  ``relay.test`` to 127.0.0.1, ``--remote-port`` is the sink's port.
- ``formats``: messages per second into Maildir, mbox, the numbered spool and LMTP (a private
  Dovecot, tests/dovecot.py, storing Maildir), side by side.

Each is a list of ``run.Part``s (one table each) of ``run.Spec``s (one row each). Presets
for --sessions, --messages and --repeat are in PRESETS; flags given on the command line win.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    from bench import run as core
except ImportError:
    import run as core

Part, Spec, PostierTarget = core.Part, core.Spec, core.PostierTarget

PRESETS = {
    "basic": {"sessions": "1,20,100", "messages": 3000, "repeat": 3},
    "tls": {"sessions": "20", "messages": 5000, "repeat": 3},
    "relay": {"sessions": "20", "messages": 5000, "repeat": 3},
    "formats": {"sessions": "20", "messages": 5000, "repeat": 3},
}

RELAY_DOMAIN = "relay.test"
RELAY_ZONE = {
    RELAY_DOMAIN: {"MX": [(10, f"mx.{RELAY_DOMAIN}")]},
    f"mx.{RELAY_DOMAIN}": {"A": ["127.0.0.1"]},
}


def _repo_on_path() -> None:
    """tests/ (DNS responder, Dovecot) is imported from the repository root."""
    if str(core.REPO) not in sys.path:
        sys.path.insert(0, str(core.REPO))


def _public_dir(opts: argparse.Namespace, prefix: str) -> Path:
    """A temporary directory other users (Dovecot's, smtp-sink's) can traverse."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=opts.tmpdir))
    os.chmod(path, 0o755)
    return path


def _pid_from(pid_file: Path) -> list[int]:
    with contextlib.suppress(OSError, ValueError):
        return [int(pid_file.read_text().strip())]
    return []


# --------------------------------------------------------------------------- targets


class LmtpTarget(PostierTarget):
    """postier -F lmtp, delivering to a private Dovecot's LMTP listener, which stores Maildir.

    Dovecot's files are counted by difference and never removed between runs (its index
    knows them). Its CPU is the peer CPU column.
    """

    def start(self) -> None:
        _repo_on_path()
        from tests.dovecot import available, chown_tree, running_dovecot

        why = available()
        if why:
            raise RuntimeError(f"lmtp: {why}")
        self._stack = contextlib.ExitStack()
        self.dc_dir = _public_dir(self.opts, "postier-bench-dovecot-")
        self.boxes = self.dc_dir / "mail"
        self.boxes.mkdir()
        chown_tree(self.boxes)  # Dovecot writes as nobody
        self.dovecot = self._stack.enter_context(
            running_dovecot(
                self.dc_dir,
                f"maildir:{self.boxes}/%n",
                {u: "unused" for u in core.USERS},
                protocols=("imap", "lmtp"),
            )
        )
        super().start()

    def serve_args(self) -> list[str]:
        return ["--lmtp", f"127.0.0.1:{self.dovecot.lmtp_port}"]

    def delivered(self) -> int:
        return core.count_maildir(self.boxes)

    def clear(self) -> None:
        pass

    def peer_pids(self) -> list[int]:
        return _pid_from(self.dc_dir / "run" / "master.pid")

    def stop(self) -> None:
        super().stop()
        stack = getattr(self, "_stack", None)
        if stack is not None:
            self._stack = None
            stack.close()
            if not self.opts.keep:
                shutil.rmtree(self.dc_dir, ignore_errors=True)


_MESG = re.compile(rb"mesg=(\d+)\r")


class RelayTarget(PostierTarget):
    """postier relaying to ``RELAY_DOMAIN``: DNS responder, smtp-sink, then the server.

    smtp-sink runs with ``-c``: after each "." it writes ``sess=N quit=N mesg=N`` and a CR
    to its stdout (a file here), and ``delivered`` reads the last complete count. The run
    ends when that count reaches the messages accepted and the queue's env/ is empty.
    """

    recipients = tuple(f"{u}@{RELAY_DOMAIN}" for u in core.USERS)

    def start(self) -> None:
        _repo_on_path()
        from tests.dnsserver import DnsServer

        self.dns = DnsServer(RELAY_ZONE).start()
        exe, env = core.find_postfix_tool("smtp-sink")
        self.sink_port = core.free_port()
        self.sink_out = self.workdir / "smtp-sink.counts"
        listen = f"127.0.0.1:{self.sink_port}"
        with (
            open(self.sink_out, "wb") as out,
            open(self.workdir / "smtp-sink.log", "wb") as err,
        ):
            self.sink = subprocess.Popen(
                [exe, "-c", "-u", "nobody", "-h", "sink.relay.test", listen, "256"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                start_new_session=True,
            )
        core.wait_smtp(self.sink_port, 30, lambda: self.sink.poll() is None)
        super().start()

    def serve_args(self) -> list[str]:
        return ["--dns-server", f"127.0.0.1:{self.dns.port}", "--remote-port", str(self.sink_port)]

    def delivered(self) -> int:
        try:
            with open(self.sink_out, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 256))
                counts = _MESG.findall(f.read())
        except OSError:
            return 0
        return int(counts[-1]) if counts else 0

    def clear(self) -> None:
        pass

    def peer_pids(self) -> list[int]:
        return [self.sink.pid] if getattr(self, "sink", None) else []

    def stop(self) -> None:
        super().stop()
        if getattr(self, "sink", None) is not None:
            core.stop_process(self.sink)
            self.sink = None
        if getattr(self, "dns", None) is not None:
            self.dns.stop()
            self.dns = None


# --------------------------------------------------------------------------- scenarios


def _spec(name: str, cls=PostierTarget, **kw) -> Spec:
    return Spec(name, functools.partial(cls, **kw))


def basic(opts: argparse.Namespace) -> list[Part]:
    return [
        Part(
            "Maildir, --workers 1 and 2",
            [_spec(f"postier-w{w}", fmt="maildir", workers=w) for w in (1, 2)],
        )
    ]


def tls(opts: argparse.Namespace) -> list[Part]:
    n = opts.handshakes
    conn = ("--connect-only",)
    handshakes = [
        _spec("plain", tls=True, loadgen_args=conn, label="mx, no TLS: EHLO, QUIT"),
        _spec(
            "starttls",
            tls=True,
            loadgen_args=(*conn, "--starttls"),
            label="mx, STARTTLS, full handshake",
        ),
        _spec(
            "starttls-resumed",
            tls=True,
            loadgen_args=(*conn, "--starttls", "--tls-resume"),
            label="mx, STARTTLS, resumed session",
        ),
        _spec(
            "implicit",
            listener="submissions",
            auth=False,
            loadgen_args=(*conn, "--tls"),
            label="submissions, implicit TLS, full handshake",
        ),
        _spec(
            "implicit-resumed",
            listener="submissions",
            auth=False,
            loadgen_args=(*conn, "--tls", "--tls-resume"),
            label="submissions, implicit TLS, resumed session",
        ),
        _spec(
            "starttls-auth",
            listener="submission",
            loadgen_args=(*conn, "--starttls"),
            messages=max(20, n // 40),
            label="submission, STARTTLS + AUTH PLAIN (ARGON2ID), full handshake",
        ),
    ]
    messages = [
        _spec("plain", tls=True, label="mx, plaintext"),
        _spec("starttls", tls=True, loadgen_args=("--starttls",), label="mx, STARTTLS"),
        _spec(
            "submission",
            listener="submission",
            loadgen_args=("--starttls",),
            label="submission, STARTTLS + AUTH",
        ),
        _spec(
            "submissions",
            listener="submissions",
            loadgen_args=("--tls",),
            label="submissions, implicit TLS + AUTH",
        ),
    ]
    return [
        Part(
            f"new sessions per second: {n} connections (EHLO [STARTTLS EHLO] [AUTH] QUIT)",
            handshakes,
            overrides={"messages": n, "warmup": min(opts.warmup, 100)},
        ),
        Part(
            "messages per second, persistent connections (one TLS handshake and AUTH each)",
            messages,
        ),
    ]


def relay(opts: argparse.Namespace) -> list[Part]:
    return [
        Part(
            f"relay to smtp-sink via the queue (MX of {RELAY_DOMAIN} from a loopback DNS "
            "responder), end to end",
            [
                _spec("local-delivery", label="mx, local delivery to Maildir (for comparison)"),
                _spec(
                    "relay-local",
                    RelayTarget,
                    listener="local",
                    label="local listener -> queue -> smtp-sink",
                ),
                _spec(
                    "relay-submission",
                    RelayTarget,
                    listener="submission",
                    loadgen_args=("--starttls",),
                    label="submission STARTTLS + AUTH -> queue -> smtp-sink",
                ),
            ],
        )
    ]


def formats(opts: argparse.Namespace) -> list[Part]:
    return [
        Part(
            "mailbox formats, 5 mailboxes rotated",
            [
                _spec("maildir", fmt="maildir", label="maildir"),
                _spec("mbox", fmt="mbox", label="mbox"),
                _spec("spool", fmt="spool", label="spool"),
                _spec("lmtp", LmtpTarget, fmt="lmtp", label="lmtp to Dovecot (Maildir)"),
            ],
        )
    ]


SCENARIOS = {"basic": basic, "tls": tls, "relay": relay, "formats": formats}


def parts(opts: argparse.Namespace) -> list[Part]:
    return SCENARIOS[opts.scenario](opts)
