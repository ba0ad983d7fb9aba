"""An asyncio SMTP load generator: N messages of L bytes over S concurrent sessions.

No third-party dependencies (uvloop is used when installed). Raw asyncio streams, not
smtplib, so that the generator costs little per message and the server is what we measure.

Each session opens a connection, says EHLO, then takes messages from a shared counter and
sends them back to back on that connection (MAIL, RCPT, DATA, body; no RSET between them),
optionally pipelined (MAIL+RCPT+DATA in one write, RFC 2920), or with ``per_connection``
one message per connection (connect, EHLO, transaction, QUIT), as Postfix's smtp-source does
by default. A message's latency runs from the moment MAIL is written to the moment the reply
to the end of data is read. The load is bounded: exactly ``messages`` are attempted at most,
and everything stops at the wall-clock ``deadline``.

TLS and AUTH: ``starttls`` says STARTTLS after the first EHLO, then EHLO again; ``tls`` speaks
TLS from the first byte (port 465 style). Neither verifies the certificate. ``tls_resume``
offers the last session ticket received on every new connection (TLS session resumption);
without it every connection makes a full handshake. ``auth`` ("user:password") says AUTH
PLAIN once per connection, after the (last) EHLO. ``connect_only`` sends no mail: each of the
``messages`` units is one connection (connect, greeting, EHLO, [STARTTLS, EHLO], [AUTH],
QUIT), its latency from connect to the reply to QUIT: new sessions per second.

Command line::

    python3 bench/loadgen.py --port 2525 -n 5000 -l 2048 -s 20 --rcpt alice@example.org
    python3 bench/loadgen.py --port 2587 --starttls --auth alice:secret -n 500 -s 20 -r x@y.test
    python3 bench/loadgen.py --port 2525 --starttls --connect-only --tls-resume -n 2000 -s 20 \
        -r x@y.test

As a module::

    result = asyncio.run(run_load(LoadConfig(port=2525, messages=10, sessions=2,
                                             recipients=["alice@example.org"])))
    assert result.ok == 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python3 bench/loadgen.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.loadgen_core import LoadConfig, LoadResult, build_message, percentile, run_load

__all__ = ["LoadConfig", "LoadResult", "build_message", "main", "percentile", "run", "run_load"]


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(cfg: LoadConfig) -> LoadResult:
    """Synchronous wrapper: a fresh event loop (uvloop when available)."""
    loop = _new_loop()
    try:
        return loop.run_until_complete(run_load(cfg))
    finally:
        loop.close()


def format_result(r: LoadResult) -> str:
    s = r.summary()
    unit = "connections" if r.config.get("connect_only") else "msgs"
    text = (
        f"{r.ok}/{r.config['messages']} {unit} done in {r.elapsed:.2f} s: "
        f"{s['msgs_per_s']:.1f} {unit}/s, p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms, "
        f"errors {r.errors} (failed {r.failed}, io {r.io_errors}, unsent {r.unsent}), "
        f"connections {r.connections}"
    )
    if r.tls_handshakes:
        text += f", TLS {r.tls_version}: {r.tls_handshakes} handshakes, {r.tls_resumed} resumed"
    if r.timed_out:
        text += ", DEADLINE REACHED"
    for e in r.error_samples[:5]:
        text += f"\n  error: {e}"
    return text


def parse_args(argv: list[str] | None = None) -> tuple[LoadConfig, bool]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("-n", "--messages", type=int, default=1000)
    p.add_argument("-l", "--size", type=int, default=2048, help="body bytes, headers excluded")
    p.add_argument("-s", "--sessions", type=int, default=1)
    p.add_argument(
        "-r",
        "--rcpt",
        action="append",
        default=[],
        help="recipient (repeatable, comma-separated allowed); rotated per message",
    )
    p.add_argument("--rcpt-file", help="file with one recipient per line")
    p.add_argument("-f", "--sender", default="loadgen@bench.example")
    p.add_argument("--helo", default="loadgen.bench.example")
    p.add_argument(
        "-P",
        "--pipelining",
        action="store_true",
        help="send MAIL, RCPT and DATA in one write when the server offers it",
    )
    p.add_argument(
        "-1",
        "--per-connection",
        action="store_true",
        help="one message per connection (as smtp-source without -d)",
    )
    p.add_argument("--starttls", action="store_true", help="STARTTLS after EHLO, then EHLO again")
    p.add_argument("--tls", action="store_true", help="implicit TLS (port 465 style)")
    p.add_argument(
        "--tls-resume",
        action="store_true",
        help="offer the last TLS session ticket on each new connection (resumption)",
    )
    p.add_argument("--auth", metavar="USER:PASS", help="AUTH PLAIN once per connection")
    p.add_argument(
        "--connect-only",
        action="store_true",
        help="no mail: -n connections of greeting, EHLO, [STARTTLS, EHLO], [AUTH], QUIT",
    )
    p.add_argument(
        "--message-file",
        help="send this message as it is (e.g. DKIM-signed) instead of a generated one",
    )
    p.add_argument("--deadline", type=float, default=120.0, help="wall-clock limit, seconds")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    a = p.parse_args(argv)
    rcpts = [x.strip() for r in a.rcpt for x in r.split(",") if x.strip()]
    if a.rcpt_file:
        with open(a.rcpt_file, encoding="utf-8") as f:
            rcpts += [ln.split()[0] for ln in f if ln.strip() and not ln.startswith("#")]
    if not rcpts and not a.connect_only:
        p.error("give at least one recipient with --rcpt or --rcpt-file")
    if a.tls and a.starttls:
        p.error("--tls and --starttls exclude each other")
    if a.tls_resume and not (a.tls or a.starttls):
        p.error("--tls-resume needs --tls or --starttls")
    if a.auth is not None and ":" not in a.auth:
        p.error("--auth: USER:PASS expected")
    return LoadConfig(
        host=a.host,
        port=a.port,
        messages=a.messages,
        size=a.size,
        sessions=a.sessions,
        recipients=tuple(rcpts) or ("postmaster@example.org",),
        sender=a.sender,
        helo=a.helo,
        pipelining=a.pipelining,
        per_connection=a.per_connection,
        deadline=a.deadline,
        starttls=a.starttls,
        tls=a.tls,
        tls_resume=a.tls_resume,
        auth=a.auth,
        connect_only=a.connect_only,
        message_file=a.message_file,
    ), a.json


def main(argv: list[str] | None = None) -> int:
    cfg, as_json = parse_args(argv)
    r = run(cfg)
    if as_json:
        d = r.summary()
        d["latencies_ms"] = [round(x * 1000, 3) for x in r.latencies]
        json.dump(d, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(format_result(r))
    return 0 if r.errors == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
