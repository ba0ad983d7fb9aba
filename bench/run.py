"""Benchmark postier (and, side by side, the baselines, or another postier tree) on loopback.

For each server and each session count: start the server on free loopback ports with a fresh
mail root in a temporary directory (users alice, bob, carol, dave, erin at example.org), send a
short unrecorded warm-up, then ``--repeat`` runs of ``--messages`` messages of ``--size``
bytes over that many sessions, with our asyncio load generator (bench/loadgen.py) or Postfix's
smtp-source. During each run a sampler reads the resident memory of the server's whole
process tree from /proc every 50 ms. After each run the messages that landed in the mailboxes
are counted: they must equal the messages accepted. Prints a table (median msgs/s of the
repeats, p50/p99 latency, CPU ms per message, peak RSS and PSS) and writes every figure as
JSON under bench/results/.

    python3 bench/run.py --sessions 1,20,100 --messages 5000 --size 2048 --repeat 5
    python3 bench/run.py --servers postier,aiosmtpd,postfix,sink     # side by side
    python3 bench/run.py --servers postier@../before,postier          # before and after
    python3 bench/run.py --scenario tls      # or basic, relay, formats, mailauth (scenarios.py)

This file is the command line only: harness.py (processes, CPU and memory), targets.py and
baselines.py (the servers), drivers.py (the load), runner.py (runs and repeats),
scenarios.py (which rows), report.py (tables, JSON). Everything started here is stopped
here, by pid, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python3 bench/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import report, scenarios
from bench.drivers import DRIVERS
from bench.harness import REPO
from bench.runner import bench_level
from bench.targets import FORMATS, Tree, parse_tree

DEFAULTS = {"sessions": "1,20,100", "messages": 5000, "repeat": 5}


def parse_args(argv=None, servers_default="postier") -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--scenario",
        choices=("basic", "tls", "relay", "formats", "mailauth"),
        help="a prepared comparison (bench/scenarios.py): basic (maildir at 1/20/100 sessions, "
        "--workers 1 and 2), tls (handshakes/s; msgs/s plain vs STARTTLS vs AUTH), relay "
        "(submission/local to smtp-sink through the queue), formats (maildir, mbox, spool, "
        "lmtp), mailauth (mx with SPF/DKIM/DMARC checks on vs off); its defaults for "
        "--sessions, --messages and --repeat yield to the flags",
    )
    p.add_argument(
        "--servers",
        default=servers_default,
        help="comma-separated: postier, postier@PATH (the postier checkout at PATH, run with "
        "this interpreter; two trees give a before/after table), aiosmtpd, postfix, sink",
    )
    p.add_argument(
        "--sessions", help=f"comma-separated session counts (default {DEFAULTS['sessions']})"
    )
    p.add_argument(
        "-n",
        "--messages",
        type=int,
        help=f"messages per run (default {DEFAULTS['messages']})",
    )
    p.add_argument("-l", "--size", type=int, default=2048, help="body bytes per message")
    p.add_argument(
        "--repeat",
        type=int,
        help=f"runs per session count, the table shows the median (default {DEFAULTS['repeat']})",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=200,
        help="unrecorded messages sent first at each session count (0: none)",
    )
    p.add_argument(
        "-F",
        "--format",
        default="maildir",
        help=f"postier's mailbox format, comma-separated for one row each: {', '.join(FORMATS)}",
    )
    p.add_argument(
        "--workers",
        default="0",
        help="postier --workers N, comma-separated for one row each (0: do not pass the flag)",
    )
    p.add_argument(
        "--handshakes",
        type=int,
        default=2000,
        help="--scenario tls: connections per handshake run",
    )
    p.add_argument(
        "--postier-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more argument for postier serve (repeatable: --postier-arg=--flag "
        "--postier-arg=value)",
    )
    p.add_argument("--driver", default="loadgen", choices=sorted(DRIVERS))
    p.add_argument(
        "--mode",
        default="persistent",
        choices=("persistent", "per-connection"),
        help="messages back to back on one connection per session, or one "
        "message per connection (smtp-source's default)",
    )
    p.add_argument(
        "-P", "--pipelining", action="store_true", help="loadgen: pipeline MAIL, RCPT and DATA"
    )
    p.add_argument("--deadline", type=float, default=300.0, help="seconds per run, at most")
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=120.0,
        help="seconds to wait for accepted mail to land in the mailboxes",
    )
    p.add_argument(
        "--aiosmtpd-uvloop",
        action="store_true",
        help="run the aiosmtpd baseline on uvloop instead of asyncio's loop",
    )
    p.add_argument("--tmpdir", help="where the mail roots go (default: the system's)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directories")
    p.add_argument("--label", default="", help="a name for the results file")
    p.add_argument(
        "--results-dir",
        type=Path,
        default=report.RESULTS,
        help="where the JSON file goes (default bench/results/)",
    )
    opts = p.parse_args(argv)
    preset = scenarios.PRESETS[opts.scenario] if opts.scenario else {}
    for key, value in DEFAULTS.items():
        if getattr(opts, key) is None:
            setattr(opts, key, preset.get(key, value))
    try:
        opts.sessions = [int(x) for x in str(opts.sessions).split(",") if x.strip()]
        opts.workers_list = [int(x) for x in str(opts.workers).split(",") if x.strip()] or [0]
    except ValueError:
        p.error("--sessions and --workers: comma-separated integers expected")
    opts.workers = opts.workers_list[0]
    opts.formats = [x.strip() for x in opts.format.split(",") if x.strip()]
    if not opts.formats or any(f not in FORMATS for f in opts.formats):
        p.error(f"-F: comma-separated, among {', '.join(FORMATS)}")
    opts.format = opts.formats[0]
    opts.servers = [x.strip() for x in opts.servers.split(",") if x.strip()]
    try:
        paths = [t for t in map(parse_tree, opts.servers) if t is not None]
    except ValueError as e:
        p.error(f"--servers: {e}")
    if len(set(opts.servers)) != len(opts.servers):
        p.error("--servers: a server is named twice (postier@PATH names this tree again)")
    opts.trees = [Tree(path, i) for i, path in enumerate(paths)]
    if opts.messages < 1 or opts.repeat < 1 or not opts.sessions:
        p.error("--messages, --repeat and --sessions must be positive")
    return opts


def main(argv: list[str] | None = None, servers_default: str = "postier") -> int:
    opts = parse_args(argv, servers_default)
    base = Path(tempfile.mkdtemp(prefix="postier-bench-", dir=opts.tmpdir))
    rows: list[dict] = []
    failures: list[str] = []
    started = time.time()
    info = report.machine()  # before the load, so that its load average is the machine's own
    info["file_system"] = report.file_system(base)
    try:
        for part in scenarios.parts(opts):
            popts = argparse.Namespace(**{**vars(opts), "part": part.title, **part.overrides})
            for sessions in part.sessions or opts.sessions:
                bench_level(sessions, popts, base, failures, rows, part.specs)
    except KeyboardInterrupt:
        failures.append("interrupted")
    finally:
        if not opts.keep:
            shutil.rmtree(base, ignore_errors=True)
    mode = f"{opts.driver}, {opts.mode}{', pipelined' if opts.pipelining else ''}"
    print(
        f"\n{opts.messages} messages x {opts.size} B per run, median of {opts.repeat}, "
        f"{mode}, {os.cpu_count()} CPUs, load average before the run "
        f"{info['loadavg'][0]:.2f}, mail on {info['file_system']}"
    )
    if rows:
        print(report.format_tables(rows))
        if comparison := report.format_comparison(rows, opts.trees):
            print("\n" + comparison)
    for f in failures:
        print(f"FAILED {f}")
    label = opts.label or opts.scenario or "-".join(opts.servers)
    label = re.sub(r"[^A-Za-z0-9_.@-]+", "_", label)  # postier@PATH: no slashes in a file name
    out = report.write_json(opts.results_dir, label, started, info, opts, rows, failures)
    print(f"results: {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    bad = failures or any(r["errors"] or (r["delivered"] not in (None, r["sent"])) for r in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
