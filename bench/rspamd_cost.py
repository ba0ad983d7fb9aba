"""Cost per message of the rspamd check, with rspamd on and off, end to end.

Two runs of a real `postier serve` on loopback (one worker), each taking the same messages
over one SMTP session: without rspamd, then with `rspamd = URL` pointing at a private
Debian rspamd (tests/rspamd.py: stock rules, no Redis, DNS on a loopback responder). For
each run: wall time per message as the client sees it (end of data to 250 included), and CPU
seconds per message of postier's process tree and of rspamd's. Small counts; bounded.

    python3 bench/rspamd_cost.py --messages 200 --size 4096
"""

from __future__ import annotations

import argparse
import json
import shutil
import smtplib
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import tree_cpu_seconds  # noqa: E402
from tests.dnsserver import DnsServer  # noqa: E402
from tests.rspamd import Rspamd  # noqa: E402
from tests.server import make_server  # noqa: E402


def message(n: int, size: int) -> bytes:
    line = b"The quick brown fox jumps over the lazy dog, again and  again.\r\n"
    body = line * max(1, size // len(line))
    return (
        b"From: Someone <someone@remote.test>\r\nTo: alice@example.org\r\n"
        b"Subject: cost %d\r\nMessage-ID: <%d@remote.test>\r\n"
        b"Date: Wed, 02 Dec 2026 07:00:00 +0000\r\n\r\n" % (n, n)
    ) + body


def run(tmp: Path, dns_port: int, url: str, messages: int, size: int, rspamd_pid: int) -> dict:
    tmp.mkdir()
    conf = tmp / "postier.toml"
    conf.write_text(f'rspamd = "{url}"\n' if url else "")
    srv = make_server(tmp, extra=["-c", str(conf), "--dns-server", f"127.0.0.1:{dns_port}"])
    srv.start()
    assert srv.proc is not None
    try:
        with smtplib.SMTP("127.0.0.1", srv.mx_port, timeout=120) as smtp:
            smtp.sendmail("someone@remote.test", ["alice@example.org"], message(0, size))  # warm
            cpu0 = tree_cpu_seconds(srv.proc.pid)
            spam0 = tree_cpu_seconds(rspamd_pid) if rspamd_pid else 0.0
            t0 = time.perf_counter()
            for n in range(1, messages + 1):
                smtp.sendmail("someone@remote.test", ["alice@example.org"], message(n, size))
            wall = time.perf_counter() - t0
            cpu = tree_cpu_seconds(srv.proc.pid) - cpu0
            spam = (tree_cpu_seconds(rspamd_pid) - spam0) if rspamd_pid else 0.0
        stored = len(srv.maildir_files("alice"))
        assert stored == messages + 1, f"{stored} stored of {messages + 1}"
    finally:
        srv.stop()
    return {
        "rspamd": bool(url),
        "messages": messages,
        "ms_per_message": round(wall / messages * 1000, 2),
        "postier_cpu_ms_per_message": round(cpu / messages * 1000, 2),
        "rspamd_cpu_ms_per_message": round(spam / messages * 1000, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=200)
    ap.add_argument("--size", type=int, default=4096)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="postier-rspamd-cost-"))
    try:
        with DnsServer({}) as dns:
            rspamd = Rspamd(dns.port).start()
            try:
                assert rspamd.proc is not None
                rows = [
                    run(tmp / "off", dns.port, "", args.messages, args.size, 0),
                    run(
                        tmp / "on", dns.port, rspamd.url, args.messages, args.size, rspamd.proc.pid
                    ),
                ]
            finally:
                rspamd.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
