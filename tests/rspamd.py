"""A private rspamd for tests: Debian's rspamd with its stock rules, on loopback ports.

It runs without Redis and with its DNS pointed at a loopback responder (never the machine's
resolver). A `local.d/multimap.conf` adds marker rules so a test picks rspamd's action by a
token in the Subject: XREJECTX → reject, XSOFTX → soft reject, XSPAMX → add header,
XREWRITEX → rewrite subject. Everything else gets rspamd's own verdict ("no action" for a
plain test message). Loading takes 10-20 s, so the fixture is module-scoped.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.server import free_port

MARKERS = {
    "XREJECTX": ('action = "reject"', 'message = "Spam message rejected by test marker"'),
    "XSOFTX": ('action = "soft reject"', 'message = "Try again later (test marker)"'),
    "XSPAMX": ('action = "add header"',),
    "XREWRITEX": ('action = "rewrite subject"',),
}


class Rspamd:
    def __init__(self, dns_port: int) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="postier-rspamd-"))
        self.port = free_port()
        self.controller_port = free_port()
        self.dns_port = dns_port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _write_config(self) -> None:
        d = self.dir
        for sub in ("local.d", "override.d", "maps", "db", "run", "log"):
            (d / sub).mkdir()
        (d / "local.d/worker-normal.inc").write_text(
            f'bind_socket = "127.0.0.1:{self.port}";\ncount = 1;\n'
        )
        (d / "local.d/worker-controller.inc").write_text(
            f'bind_socket = "127.0.0.1:{self.controller_port}";\n'
        )
        (d / "override.d/worker-proxy.inc").write_text("enabled = false;\n")
        (d / "local.d/options.inc").write_text(
            f'dns {{ nameserver = ["127.0.0.1:{self.dns_port}"]; timeout = 1s; }}\n'
        )
        (d / "local.d/actions.conf").write_text('subject = "***SPAM*** %s";\n')
        rules = []
        for marker, settings in MARKERS.items():
            (d / "maps" / f"{marker}.map").write_text(f"/{marker}/\n")
            body = "; ".join(
                [
                    'type = "header"',
                    'header = "Subject"',
                    "regexp = true",
                    f'map = "{d}/maps/{marker}.map"',
                    "prefilter = true",
                    *settings,
                ]
            )
            rules.append(f"TEST_{marker} {{ {body}; }}")
        (d / "local.d/multimap.conf").write_text("\n".join(rules) + "\n")

    def start(self, timeout: float = 90.0) -> Rspamd:
        self._write_config()
        log = open(self.dir / "out.log", "wb")  # noqa: SIM115 - closed with the process
        d = self.dir
        self.proc = subprocess.Popen(
            [
                "rspamd", "-f", "-i", "-u", "root", "-g", "root",
                "-c", "/etc/rspamd/rspamd.conf",
                f"--var=DBDIR={d}/db", f"--var=RUNDIR={d}/run", f"--var=LOGDIR={d}/log",
                f"--var=LOCAL_CONFDIR={d}",
            ],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=d, start_new_session=True,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("rspamd exited: " + (d / "out.log").read_text()[-2000:])
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.5).close()
                return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("rspamd did not start listening")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # rspamd's main process forwards TERM to its workers; the group catches stragglers.
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


def rspamd_available() -> bool:
    return shutil.which("rspamd") is not None
