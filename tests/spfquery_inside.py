"""Run inside a private network and mount namespace (see test_mailauth_spfquery.py).

libspf2's spfquery asks the nameserver of /etc/resolv.conf on port 53 and cannot be pointed
elsewhere, so the test gives it a namespace of its own: loopback up, a private bind mount of a
resolv.conf naming 127.0.0.1, and our responder on 127.0.0.1:53. Reads {"zone", "cases"} as
JSON on stdin and prints [[spfquery's result, postier's result], ...] as JSON (libspf2 prints
a permerror as "(invalid)").
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from postier.dns import Resolver
from postier.mailauth import check_spf
from tests.dnsserver import DnsServer


def main() -> int:
    job = json.load(sys.stdin)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "resolv.conf"
        conf.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        subprocess.run(["mount", "--bind", str(conf), "/etc/resolv.conf"], check=True)
        out = []
        with DnsServer(job["zone"], port=53):
            resolver = Resolver("127.0.0.1", 53, timeout=1.0)
            for ip, sender, helo in job["cases"]:
                # the HELO identity is "postmaster@HELO" (RFC 7208 §2.3); spfquery needs it so
                who = sender or f"postmaster@{helo}"
                args = ["spfquery", "-ip", ip, "-helo", helo, "-sender", who]
                proc = subprocess.run(args, capture_output=True, text=True, timeout=30)
                out_lines = proc.stdout.splitlines()
                if out_lines and out_lines[0] == "StartError":  # diagnostics, then the result
                    out_lines = out_lines[out_lines.index("EndError") + 1 :]
                theirs = out_lines[0].strip() if out_lines else ""
                theirs = {"(invalid)": "permerror"}.get(theirs, theirs)
                ours = asyncio.run(check_spf(resolver, ip, sender, helo)).result
                out.append([theirs, ours])
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
