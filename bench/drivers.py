"""The load: our asyncio load generator (bench/loadgen.py) or Postfix's smtp-source.

Each driver runs one load against a target's port in a child process (so that its CPU is
never counted as the server's) and returns the same summary: messages accepted, errors,
elapsed seconds, p50/p99 latency when the driver measures it, and the first error texts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

from bench.harness import HERE, RECIPIENTS, SENDER, TOOLS, Target

LOADGEN = HERE / "loadgen.py"


def find_postfix_tool(tool: str) -> tuple[str, dict]:
    """Path and environment for smtp-source / smtp-sink.

    The installed one if there is one; else Debian's postfix package unpacked (not
    installed) under bench/.tools/postfix with ``apt-get download`` and ``dpkg-deb -x``.
    """
    env = dict(os.environ)
    for d in ("/usr/sbin", "/usr/bin"):
        if os.access(f"{d}/{tool}", os.X_OK):
            return f"{d}/{tool}", env
    unpacked = TOOLS / "postfix"
    exe = unpacked / "usr/sbin" / tool
    if not exe.exists():
        TOOLS.mkdir(parents=True, exist_ok=True)
        dl = TOOLS / "download"
        dl.mkdir(exist_ok=True)
        debs = sorted(dl.glob("postfix_*.deb"))
        if not debs:
            r = subprocess.run(
                ["apt-get", "download", "postfix"],
                cwd=dl,
                capture_output=True,
                text=True,
                timeout=300,
            )
            debs = sorted(dl.glob("postfix_*.deb"))
            if r.returncode or not debs:
                raise RuntimeError(f"apt-get download postfix failed: {r.stderr.strip()}")
        subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(unpacked)], check=True, timeout=300)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(unpacked / "usr/lib/postfix"), env.get("LD_LIBRARY_PATH", "")) if p
    )
    return str(exe), env


def drive_loadgen(target: Target, sessions: int, opts: argparse.Namespace) -> dict:
    argv = [sys.executable, str(LOADGEN), "--port", str(target.port)]
    argv += ["-n", str(opts.messages), "-l", str(opts.size), "-s", str(sessions)]
    argv += ["-f", SENDER, "--deadline", str(opts.deadline), "--json"]
    argv += ["-r", ",".join(target.recipients)]
    if opts.pipelining:
        argv.append("-P")
    if opts.mode == "per-connection":
        argv.append("-1")
    argv += target.loadgen_args
    r = subprocess.run(
        argv, capture_output=True, text=True, timeout=opts.deadline + 60, stdin=subprocess.DEVNULL
    )
    try:
        d = json.loads(r.stdout)
    except ValueError:
        raise RuntimeError(f"loadgen failed ({r.returncode}): {r.stderr[-2000:]}") from None
    return {
        "accepted": d["ok"],
        "errors": d["errors"],
        "elapsed": d["elapsed"],
        "p50_ms": d["p50_ms"],
        "p99_ms": d["p99_ms"],
        "error_samples": d["error_samples"],
        "tls_handshakes": d.get("tls_handshakes", 0),
        "tls_resumed": d.get("tls_resumed", 0),
        "tls_version": d.get("tls_version"),
    }


def drive_smtp_source(target: Target, sessions: int, opts: argparse.Namespace) -> dict:
    if target.loadgen_args or target.recipients != RECIPIENTS:
        raise RuntimeError(f"{target.describe()}: needs bench/loadgen.py (--driver loadgen)")
    exe, env = find_postfix_tool("smtp-source")
    argv = [exe, "-s", str(sessions), "-m", str(opts.messages), "-l", str(opts.size)]
    argv += ["-f", SENDER, "-t", RECIPIENTS[0], "-M", "source.bench.example"]
    if opts.mode == "persistent":
        argv.append("-d")
    argv.append(f"127.0.0.1:{target.port}")
    t0 = time.perf_counter()
    try:
        r = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=opts.deadline,
            env=env,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return {
            "accepted": 0,
            "errors": opts.messages,
            "elapsed": opts.deadline,
            "p50_ms": None,
            "p99_ms": None,
            "error_samples": ["deadline reached"],
        }
    elapsed = time.perf_counter() - t0
    ok = r.returncode == 0
    # smtp-source stops at the first error and does not say how far it got
    return {
        "accepted": opts.messages if ok else 0,
        "errors": 0 if ok else opts.messages,
        "elapsed": elapsed,
        "p50_ms": None,
        "p99_ms": None,
        "error_samples": [] if ok else [(r.stderr or r.stdout).strip()[-500:]],
    }


DRIVERS: dict[str, Callable[[Target, int, argparse.Namespace], dict]] = {
    "loadgen": drive_loadgen,
    "smtp-source": drive_smtp_source,
}
