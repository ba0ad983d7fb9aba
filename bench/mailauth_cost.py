"""CPU per message of the inbound authentication checks (SPF, DKIM, DMARC), before and after.

Measured in one run, in one process, with `getrusage(RUSAGE_SELF)` (user + system time of
every thread, so the thread-pool work counts), against a loopback DNS responder running in a
child process (its CPU is not ours) that answers the sender domain's SPF, DKIM key and DMARC
records:

- before: what a message costs anyway without the checks: reading its spool file once;
- after, warm: check_spf + authenticate, the resolver's cache warm (a repeat sender);
- after, cold: the same with a new resolver per message (every look-up goes to the wire).

    python3 bench/mailauth_cost.py --messages 300 --size 4096
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import resource
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from postier.dns import Resolver
from postier.mailauth import authenticate, check_spf

RESPONDER = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from tests.dnsserver import DnsServer
zone = json.loads(sys.stdin.readline())
with DnsServer(zone) as server:
    print(server.port, flush=True)
    sys.stdin.read()  # until the parent closes our stdin
"""


def _quoted(value: str) -> list[str]:
    raw = [value[i : i + 255] for i in range(0, len(value), 255)]
    return [" ".join(f'"{part}"' for part in raw)]


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def make_message(size: int, key: rsa.RSAPrivateKey) -> bytes:
    line = b"The quick brown fox jumps over the lazy dog, again and  again.\r\n"
    body = line * max(1, size // len(line))
    head = (
        b"From: Alice <alice@example.test>\r\nTo: bob@example.org\r\nSubject: cost\r\n"
        b"Date: Wed, 02 Dec 2026 07:00:00 +0000\r\nMessage-ID: <1@example.test>\r\n\r\n"
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    field = dkim.sign(
        head + body, b"sel1", b"example.test", pem, canonicalize=(b"relaxed", b"relaxed")
    )
    return (field + head + body).replace(b"\r\n", b"\n")


async def measure(port: int, spool: Path, offset: int, messages: int) -> dict[str, float]:
    pool = ThreadPoolExecutor(2)
    loop = asyncio.get_running_loop()

    def read_once() -> None:
        with open(spool, "rb") as f:
            while f.read(65536):
                pass

    async def checks(resolver: Resolver) -> None:
        spf = await check_spf(
            resolver, "192.0.2.5", "alice@example.test", "client.test", executor=pool
        )
        verdicts = await authenticate(resolver, spool, offset, spf=spf, executor=pool)
        assert verdicts.dmarc.result == "pass", verdicts

    figures: dict[str, float] = {}
    start = _cpu()
    for _ in range(messages):
        await loop.run_in_executor(pool, read_once)
    figures["before_ms"] = (_cpu() - start) / messages * 1000

    warm = Resolver("127.0.0.1", port, timeout=2.0)
    await checks(warm)
    start = _cpu()
    for _ in range(messages):
        await checks(warm)
    figures["after_warm_ms"] = (_cpu() - start) / messages * 1000

    start = _cpu()
    for _ in range(messages):
        await checks(Resolver("127.0.0.1", port, timeout=2.0))
    figures["after_cold_ms"] = (_cpu() - start) / messages * 1000
    pool.shutdown()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--size", type=int, default=4096, help="body bytes")
    args = parser.parse_args()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    zone = {
        "example.test": {"TXT": _quoted("v=spf1 ip4:192.0.2.0/24 include:_spf.example.test -all")},
        "_spf.example.test": {"TXT": _quoted("v=spf1 ip4:198.51.100.0/24 -all")},
        "sel1._domainkey.example.test": {
            "TXT": _quoted("v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode())
        },
        "_dmarc.example.test": {"TXT": _quoted("v=DMARC1; p=reject")},
    }
    root = str(Path(__file__).resolve().parent.parent)
    responder = subprocess.Popen(
        [sys.executable, "-c", RESPONDER, root],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert responder.stdin and responder.stdout
        responder.stdin.write(json.dumps(zone) + "\n")
        responder.stdin.flush()
        port = int(responder.stdout.readline())
        with tempfile.TemporaryDirectory() as tmp:
            spool = Path(tmp) / "msg.spool"
            head = b"Return-Path: <alice@example.test>\n"
            spool.write_bytes(head + make_message(args.size, key))
            figures = asyncio.run(measure(port, spool, len(head), args.messages))
    finally:
        if responder.stdin:
            responder.stdin.close()
        responder.wait(timeout=10)
    figures.update(messages=args.messages, size=args.size, pid=os.getpid())
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
