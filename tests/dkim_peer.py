"""OpenDKIM as an independent verifier, looking keys up in a loopback DNS responder.

`opendkim-testmsg` resolves through the C library, which reads /etc/resolv.conf and asks port
53. So the check runs in a network and mount namespace of its own (`unshare --net --mount`):
inside, only `lo` exists, our responder (tests/dnsserver.py) answers on 127.0.0.1:53, and a
private resolv.conf is bind-mounted over the real one for that namespace alone. Nothing leaves
the machine and the host's resolver configuration is never touched; the namespace dies with
the process.

    result = opendkim_verify(message_crlf, zone)
    assert result.returncode == 0, result.stderr
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from postier.dkim.keys import DkimKey

ROOT = Path(__file__).resolve().parent.parent


def available() -> str | None:
    """Why the OpenDKIM check cannot run here, or None when it can."""
    for tool in ("opendkim-testmsg", "unshare", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    if os.geteuid() != 0:
        return "namespaces need root"
    return None


def key_zone(*keys: DkimKey) -> dict[str, Any]:
    """The responder's zone publishing each key's TXT record, split as we tell users to."""
    from postier.dkim.records import split_value

    zone: dict[str, Any] = {}
    for key in keys:
        strings = " ".join(f'"{s}"' for s in split_value(key.dns_value()))
        zone.setdefault(key.dns_name(), {}).setdefault("TXT", []).append(strings)
    return zone


def opendkim_verify(message: bytes, zone: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """Run `opendkim-testmsg` (verify mode) on `message`; returncode 0 means it verified."""
    with tempfile.TemporaryDirectory(prefix="dkimpeer") as tmp:
        zone_file = Path(tmp) / "zone.json"
        zone_file.write_text(json.dumps(zone))
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        return subprocess.run(
            ["unshare", "--net", "--mount", sys.executable, "-m", "tests.dkim_peer", tmp],
            input=message.decode("latin-1"),
            capture_output=True,
            text=True,
            encoding="latin-1",
            timeout=60,
            env=env,
            cwd=ROOT,
        )


def crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def fields_of(message: bytes) -> list[bytes]:
    """The header fields (with their folds) of a message with LF line ends."""
    return re.split(rb"\n(?=[^ \t])", message.split(b"\n\n", 1)[0])


def only_signature(message: bytes, algorithm: bytes) -> bytes:
    """The message keeping only the DKIM signature of `algorithm`: OpenDKIM's tool reports
    on one signature, and each signature verifies alone (none signs another)."""
    _, body = message.split(b"\n\n", 1)
    kept = [
        f
        for f in fields_of(message)
        if not f.startswith(b"DKIM-Signature:") or b"a=" + algorithm + b";" in f
    ]
    assert sum(f.startswith(b"DKIM-Signature:") for f in kept) == 1, "no such signature"
    return b"\n".join(kept) + b"\n\n" + body


def _inside_namespace(tmp: Path) -> int:
    """Run in the fresh namespace: lo up, resolv.conf pointed at our responder, verify."""
    from tests.dnsserver import DnsServer

    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    resolv = tmp / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions timeout:2 attempts:1\n")
    subprocess.run(["mount", "--bind", str(resolv), "/etc/resolv.conf"], check=True)
    zone = json.loads((tmp / "zone.json").read_text())
    with DnsServer(zone, port=53):
        result = subprocess.run(
            ["opendkim-testmsg", "-t", str(tmp)], stdin=sys.stdin, timeout=30, check=False
        )
    return result.returncode


if __name__ == "__main__":
    sys.exit(_inside_namespace(Path(sys.argv[1])))
