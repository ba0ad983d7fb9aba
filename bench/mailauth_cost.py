"""CPU per message of each inbound authentication check, and of DKIM signing, per tree.

Each check is measured alone, then all together, in a child process per postier tree, with
`getrusage(RUSAGE_SELF)` (user + system time of every thread, so the thread-pool work counts);
the repeats alternate between the trees (A, B, A, B...) so that a busy machine weighs on both,
and the table shows the median of each. A loopback DNS responder in another child process (its
CPU is not counted) serves the sender domain's SPF (with one include:), its RSA and Ed25519
DKIM keys and DMARC `p=reject`. The resolver's cache is warm (a repeat sender) except in
`all-cold`. Rows:

- `read`: reading the spool file once: what any end-of-data check pays anyway;
- `spf`: `check_spf` (pyspf, the include followed);
- `dkim-rsa`, `dkim-ed25519`: DKIM verification alone of a message carrying one signature
  (RSA 2048, or Ed25519; relaxed/relaxed): header section and tags (one trip to the thread
  pool), key (cached), body hash and signature (a second trip);
- `dmarc`: DMARC alone: the From domain and `check_dmarc` over given SPF and DKIM verdicts;
- `all`: `check_spf` + `authenticate` (DKIM RSA 2048 + DMARC), as the mx runs them;
- `all-cold`: the same with a new resolver per message (every look-up goes to the responder);
- `sign-rsa`, `sign-ed25519`: `DkimSigner.signature_for_file` with one RSA 2048 (or Ed25519)
  key, as the queue signs a relayed message.

    python3 bench/mailauth_cost.py --trees /tmp/before,. --messages 300 --repeat 3
    python3 bench/mailauth_cost.py --only dkim-rsa,sign-rsa   # this checkout alone
    python3 bench/mailauth_cost.py --primitives   # RSA-2048 alone: dkimpy's code vs OpenSSL

Profile one row with py-spy (the work is in the child, in its thread pool too): `py-spy record
--subprocesses -o out.svg -- python3 bench/mailauth_cost.py --only dkim-rsa --repeat 1
--messages 2000`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DOMAIN = "example.test"
SENDER = f"alice@{DOMAIN}"
CLIENT_IP = "198.51.100.5"  # in the include, so that both look-ups are made
MODES = (
    "read",
    "spf",
    "dkim-rsa",
    "dkim-ed25519",
    "dmarc",
    "all",
    "all-cold",
    "sign-rsa",
    "sign-ed25519",
)

RESPONDER = """
import json, sys
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


# -- the parent: keys, messages, zone, the children, the table ----------------------------------


def _message(size: int) -> bytes:
    line = b"The quick brown fox jumps over the lazy dog, again and  again.\r\n"
    body = line * max(1, size // len(line))
    head = (
        f"From: Alice <{SENDER}>\r\nTo: bob@example.org\r\nSubject: cost\r\n"
        "Date: Wed, 02 Dec 2026 07:00:00 +0000\r\nMessage-ID: <1@example.test>\r\n\r\n"
    ).encode()
    return head + body


def prepare(workdir: Path, size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Keys, the spool files and the signers' key directories in `workdir`: (spec, zone)."""
    import dkim
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    pkcs8 = (serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_pem = rsa_key.private_bytes(*pkcs8, serialization.NoEncryption())
    rsa_der = rsa_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    ed_key = ed25519.Ed25519PrivateKey.generate()
    ed_pem = ed_key.private_bytes(*pkcs8, serialization.NoEncryption())
    raw = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    ed_public = ed_key.public_key().public_bytes(*raw)
    ed_seed = ed_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    message = _message(size)
    canon = (b"relaxed", b"relaxed")
    signed = {
        "rsa": dkim.sign(message, b"sel1", DOMAIN.encode(), rsa_pem, canonicalize=canon),
        "ed25519": dkim.sign(
            message,
            b"ed1",
            DOMAIN.encode(),
            base64.b64encode(ed_seed),
            canonicalize=canon,
            signature_algorithm=b"ed25519-sha256",
        ),
    }
    head = f"Return-Path: <{SENDER}>\n".encode()
    spec: dict[str, Any] = {"offset": len(head)}
    for kind, field in [*signed.items(), ("unsigned", b"")]:
        path = workdir / f"{kind}.spool"
        path.write_bytes(head + (field + message).replace(b"\r\n", b"\n"))
        spec[f"spool_{kind}"] = str(path)
    for kind, pem in (("rsa", rsa_pem), ("ed25519", ed_pem)):
        keydir = workdir / f"keys-{kind}"
        (keydir / DOMAIN).mkdir(parents=True)
        key_file = keydir / DOMAIN / f"{kind}.pem"
        key_file.write_bytes(pem)
        key_file.chmod(0o600)
        spec[f"keys_{kind}"] = str(keydir)
    zone = {
        DOMAIN: {"TXT": _quoted(f"v=spf1 ip4:192.0.2.0/24 include:_spf.{DOMAIN} -all")},
        f"_spf.{DOMAIN}": {"TXT": _quoted("v=spf1 ip4:198.51.100.0/24 -all")},
        f"sel1._domainkey.{DOMAIN}": {
            "TXT": _quoted("v=DKIM1; k=rsa; p=" + base64.b64encode(rsa_der).decode())
        },
        f"ed1._domainkey.{DOMAIN}": {
            "TXT": _quoted("v=DKIM1; k=ed25519; p=" + base64.b64encode(ed_public).decode())
        },
        f"_dmarc.{DOMAIN}": {"TXT": _quoted("v=DMARC1; p=reject")},
    }
    return spec, zone


def _child(tree: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """One tree's figures, measured in a fresh interpreter with `tree` first on its path."""
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")])),
    )
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps({**spec, "tree": str(tree)})],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"{tree}: the measurement failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.splitlines()[-1])


def _commit(tree: Path) -> str:
    """The tree's commit, with a + when it has uncommitted changes."""
    git = ["git", "-C", str(tree)]
    head = subprocess.run([*git, "log", "-1", "--format=%h"], capture_output=True, text=True)
    dirty = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True)
    return (head.stdout.strip() or "?") + ("+" if dirty.stdout.strip() else "")


def _table(trees: list[Path], modes: list[str], runs: list[list[dict[str, Any]]]) -> str:
    """Rows: modes; columns: the median CPU ms/msg of each tree, and after/before."""
    names = [f"#{i + 1} {t.name or t.resolve().name} {_commit(t)}" for i, t in enumerate(trees)]
    width = max(14, *(len(n) for n in names))
    header = f"{'CPU ms/msg':<14}" + "".join(f"  {n:>{width}}" for n in names)
    if len(trees) > 1:
        header += "  last/first"
    lines = [header, "-" * len(header)]
    for mode in modes:
        medians = [statistics.median(r[mode] for r in per_tree) for per_tree in runs]
        line = f"{mode:<14}" + "".join(f"  {m:>{width}.3f}" for m in medians)
        if len(trees) > 1:
            line += f"  {medians[-1] / medians[0]:>9.2f}x" if medians[0] else "  -"
        lines.append(line)
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", default=".", help="postier checkouts, comma-separated")
    parser.add_argument("--messages", type=int, default=300, help="messages per row and run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per tree (median shown)")
    parser.add_argument("--size", type=int, default=4096, help="body bytes")
    parser.add_argument("--only", default=",".join(MODES), help="rows, comma-separated")
    parser.add_argument(
        "--primitives",
        action="store_true",
        help="only the RSA-2048 operations: dkimpy's pure Python against OpenSSL (this tree)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(json.loads(args.child))
    if args.primitives:
        return primitives(args.repeat)
    modes = [m for m in args.only.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown rows: {', '.join(sorted(unknown))}; known: {', '.join(MODES)}")
    trees = [Path(t).resolve() for t in args.trees.split(",") if t]
    sys.path.insert(0, str(REPO))
    responder = subprocess.Popen(
        [sys.executable, "-c", RESPONDER, str(REPO)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    runs: list[list[dict[str, Any]]] = [[] for _ in trees]
    try:
        assert responder.stdin and responder.stdout
        with tempfile.TemporaryDirectory() as tmp:
            spec, zone = prepare(Path(tmp), args.size)
            responder.stdin.write(json.dumps(zone) + "\n")
            responder.stdin.flush()
            spec.update(port=int(responder.stdout.readline()), messages=args.messages, modes=modes)
            for rep in range(args.repeat):
                for i, tree in enumerate(trees):
                    started = time.monotonic()
                    figures = _child(tree, spec)
                    runs[i].append(figures)
                    took = time.monotonic() - started
                    print(f"run {rep + 1} tree #{i + 1} ({figures['postier']}): {took:.1f} s")
    finally:
        if responder.stdin:
            responder.stdin.close()
        responder.wait(timeout=10)
    print(
        f"\n{args.messages} messages per row and run, body {args.size} bytes, median of "
        f"{args.repeat}; load average {os.getloadavg()[0]:.2f}"
    )
    print(_table(trees, modes, runs))
    return 0


def primitives(repeat: int) -> int:
    """RSA-2048 sign and verify of one header hash, dkimpy's code against OpenSSL's, here."""
    import hashlib

    import dkim
    import dkim.crypto
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    sys.path.insert(0, str(REPO))
    from postier.dkim import openssl_rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    private = dkim.crypto.parse_pem_private_key(pem)
    public = {"modulus": private["modulus"], "publicExponent": private["publicExponent"]}
    ours, ours_public = openssl_rsa.private_key(pem), openssl_rsa.public_key(public)
    digest = dkim.HashThrough(hashlib.sha256(b"the header fields"))
    signature = openssl_rsa.sign(digest, ours)
    ops = {
        "sign, dkimpy": (lambda: dkim.crypto.RSASSA_PKCS1_v1_5_sign(digest, private), 100),
        "sign, OpenSSL": (lambda: openssl_rsa.sign(digest, ours), 300),
        "verify, dkimpy": (
            lambda: dkim.crypto.RSASSA_PKCS1_v1_5_verify(digest, signature, public),
            2000,
        ),
        "verify, OpenSSL": (lambda: openssl_rsa.verify(digest, signature, ours_public), 2000),
    }
    figures: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(max(1, repeat)):
        for name, (op, count) in ops.items():
            start = _cpu()
            for _ in range(count):
                op()
            figures[name].append((_cpu() - start) / count * 1000)
    print(f"RSA-2048, CPU ms per operation, median of {max(1, repeat)}")
    for name, values in figures.items():
        print(f"{name:<16} {statistics.median(values):8.3f}")
    return 0


# -- the child: one tree, every row -------------------------------------------------------------


async def _measure(spec: dict[str, Any]) -> dict[str, float]:
    from postier.dkim.signer import DkimSigner
    from postier.dns import Resolver
    from postier.mailauth import authenticate, check_spf, dkim_verify
    from postier.mailauth.dmarc import check_dmarc, organizational_domain
    from postier.mailauth.headers import from_domains, read_header_section

    pool = ThreadPoolExecutor(2)
    loop = asyncio.get_running_loop()
    offset = spec["offset"]
    rsa_spool, ed_spool = Path(spec["spool_rsa"]), Path(spec["spool_ed25519"])
    unsigned = Path(spec["spool_unsigned"])
    port = spec["port"]
    warm = Resolver("127.0.0.1", port, timeout=2.0)
    signers = {k: DkimSigner(Path(spec[f"keys_{k}"])) for k in ("rsa", "ed25519")}
    organizational_domain(DOMAIN)  # the Public Suffix List, loaded once

    def read_once() -> None:
        with open(rsa_spool, "rb") as f:
            while f.read(65536):
                pass

    async def spf(resolver: Resolver = warm) -> Any:
        return await check_spf(resolver, CLIENT_IP, SENDER, "client.test", executor=pool)

    def read_and_prepare(path: Path) -> Any:
        return dkim_verify.prepare(read_header_section(path, offset))

    async def dkim_alone(path: Path) -> list[Any]:
        """authenticate()'s DKIM steps without DMARC, in the same two trips to the pool in
        every tree (so that this row compares the DKIM work itself)."""
        prepared = await loop.run_in_executor(pool, read_and_prepare, path)
        await dkim_verify.fetch_keys(warm, prepared)
        results = await loop.run_in_executor(pool, dkim_verify.finish, path, prepared)
        assert [r.result for r in results] == ["pass"], results
        return results

    spf_result = await spf()
    assert spf_result.result == "pass", spf_result
    dkim_results = await dkim_alone(rsa_spool)
    section = read_header_section(rsa_spool, offset)

    async def dmarc() -> None:
        result = await check_dmarc(warm, from_domains(section.raw), spf_result, dkim_results)
        assert result.result == "pass", result

    async def everything(resolver: Resolver = warm) -> None:
        spf_verdict = await spf(resolver)
        verdicts = await authenticate(resolver, rsa_spool, offset, spf=spf_verdict, executor=pool)
        assert verdicts.dmarc.result == "pass", verdicts

    def sign(kind: str) -> None:
        fields = signers[kind].signature_for_file(unsigned, offset)
        assert fields.startswith(b"DKIM-Signature:"), fields

    rows: dict[str, Any] = {
        "read": lambda: loop.run_in_executor(pool, read_once),
        "spf": spf,
        "dkim-rsa": lambda: dkim_alone(rsa_spool),
        "dkim-ed25519": lambda: dkim_alone(ed_spool),
        "dmarc": dmarc,
        "all": everything,
        "all-cold": lambda: everything(Resolver("127.0.0.1", port, timeout=2.0)),
        "sign-rsa": lambda: loop.run_in_executor(pool, sign, "rsa"),
        "sign-ed25519": lambda: loop.run_in_executor(pool, sign, "ed25519"),
    }
    figures: dict[str, float] = {}
    messages = spec["messages"]
    for mode in spec["modes"]:
        for _ in range(max(3, messages // 20)):  # warm-up: caches, first-call imports
            await rows[mode]()
        start = _cpu()
        for _ in range(messages):
            await rows[mode]()
        figures[mode] = (_cpu() - start) / messages * 1000
    pool.shutdown()
    return figures


def child_main(spec: dict[str, Any]) -> int:
    sys.path.insert(0, spec["tree"])
    import postier

    where = Path(postier.__file__).resolve().parent.parent
    if where != Path(spec["tree"]).resolve():
        raise SystemExit(f"postier imported from {where}, not from {spec['tree']}")
    figures: dict[str, Any] = asyncio.run(_measure(spec))
    figures["postier"] = str(where)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
