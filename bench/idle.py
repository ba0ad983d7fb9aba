"""Memory of idle connections: what N open SMTP sessions cost a server, in RSS and PSS.

For each row (a server, and for postier each ``--workers`` value): start the server on free
loopback ports, let it settle and read its whole process tree's RSS and PSS from /proc (the
empty server's baseline), then have a client process (bench/idle_client.py) open ``-n``
connections (default 10,000) that read the greeting, send EHLO with ``--ehlo`` (idle after
EHLO is the realistic case), and then say nothing. With all of them held, the server's
memory is read again; then the client closes them and it is read once more (what the server
keeps after they are gone). Prints a table: total RSS and PSS with the connections held, and
per connection above the baseline; with two postier trees a before/after table follows.
Every figure goes to bench/results/idle-*.json.

    python3 bench/idle.py                                   # postier, --workers 1 and auto
    python3 bench/idle.py --ehlo --servers postier@/tmp/before,postier,aiosmtpd

The server's caps (``--max-connections``, ``--max-connections-per-ip``) are raised above the
load as bench/targets.py does for every run (all connections come from 127.0.0.1). postier
does not raise its own descriptor limit (its systemd unit sets LimitNOFILE=65536): this
script raises its own soft RLIMIT_NOFILE to the hard limit, and the server inherits it.
Everything started here is stopped here, by pid, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python3 bench/idle.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import baselines, report
from bench.harness import (
    HERE,
    REPO,
    RssSampler,
    Target,
    process_tree,
    pss_bytes,
    rss_bytes,
    tail,
    tree_cpu_seconds,
)
from bench.targets import Tree, parse_tree, postier_target

CLIENT = HERE / "idle_client.py"
PORTS_PER_SOURCE = 25000  # of the ephemeral range (32768-60999 by default) to one port
MiB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--servers",
        default="postier",
        help="comma-separated: postier, postier@PATH (the checkout at PATH; two trees give a "
        "before/after table), aiosmtpd",
    )
    p.add_argument("-n", "--connections", type=int, default=10000, help="idle connections")
    p.add_argument("--ehlo", action="store_true", help="each connection sends EHLO, then idles")
    p.add_argument(
        "--workers",
        default="1,0",
        help="postier --workers N, comma-separated for one row each (0: the flag not passed, "
        "the default: one per core)",
    )
    p.add_argument("--repeat", type=int, default=1, help="runs per row (the table: medians)")
    p.add_argument(
        "--settle", type=float, default=2.0, help="seconds to wait before each memory reading"
    )
    p.add_argument(
        "--sources",
        type=int,
        default=0,
        help="spread the connections over 127.0.0.1..127.0.0.N (0: as many as the ephemeral "
        f"ports need, {PORTS_PER_SOURCE} connections each); postier then runs with "
        "reverse_dns = false, or it would ask the system's resolver for 127.0.0.2's name",
    )
    p.add_argument(
        "--deadline", type=float, default=180.0, help="seconds for the client to open them all"
    )
    p.add_argument(
        "--postier-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more argument for postier serve (repeatable)",
    )
    p.add_argument("--aiosmtpd-uvloop", action="store_true", help="aiosmtpd on uvloop")
    p.add_argument("--tmpdir", help="where the servers' directories go (default: the system's)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directories")
    p.add_argument("--label", default="", help="a name for the results file")
    p.add_argument("--results-dir", type=Path, default=report.RESULTS)
    opts = p.parse_args(argv)
    try:
        opts.workers_list = [int(x) for x in opts.workers.split(",") if x.strip()] or [0]
    except ValueError:
        p.error("--workers: comma-separated integers expected")
    opts.servers = [x.strip() for x in opts.servers.split(",") if x.strip()]
    try:
        paths = [parse_tree(s) for s in opts.servers]
    except ValueError as e:
        p.error(f"--servers: {e}")
    others = [s for s, t in zip(opts.servers, paths, strict=True) if t is None and s != "aiosmtpd"]
    if others:
        p.error(f"--servers: {', '.join(others)}: postier, postier@PATH or aiosmtpd")
    if len(set(opts.servers)) != len(opts.servers):
        p.error("--servers: a server is named twice")
    opts.trees = [Tree(t, i) for i, t in enumerate(x for x in paths if x is not None)]
    if opts.connections < 1 or opts.repeat < 1:
        p.error("--connections and --repeat must be positive")
    if opts.sources < 1:
        opts.sources = math.ceil(opts.connections / PORTS_PER_SOURCE)
    # what PostierTarget reads: the caps it sets are 2 x the largest of ``sessions``
    opts.sessions = [opts.connections]
    opts.format = "maildir"
    opts.workers = opts.workers_list[0]
    return opts


def raise_nofile(wanted: int) -> tuple[int, int]:
    """Our soft descriptor limit raised towards ``wanted`` (the servers inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted and (hard == resource.RLIM_INFINITY or hard > soft):
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft, hard


# --------------------------------------------------------------------------- rows


class Row:
    """A server to start afresh for each run: a postier tree with a worker count, or
    aiosmtpd."""

    def __init__(self, server: str, workers: int, tree: Tree | None) -> None:
        self.server, self.workers, self.tree = server, workers, tree

    def make(self, workdir: Path, opts: argparse.Namespace) -> Target:
        if self.tree is None:
            return baselines.make_target(self.server, workdir, opts)
        extra: tuple[str, ...] = ()
        if opts.sources > 1:
            config = workdir / "idle.toml"
            config.write_text("reverse_dns = false\n")
            extra = ("-c", str(config))
        return postier_target(workdir, opts, workers=self.workers, tree=self.tree, extra_args=extra)


def make_rows(opts: argparse.Namespace) -> list[Row]:
    rows, trees = [], iter(opts.trees)
    for server in opts.servers:
        if server == "aiosmtpd":
            rows.append(Row(server, 0, None))
        else:
            tree = next(trees)
            rows += [Row(server, w, tree) for w in opts.workers_list]
    return rows


# --------------------------------------------------------------------------- one run


def uss_bytes(pids: list[int]) -> int:
    """Unique set size: the pages only this process maps (Private_Clean + Private_Dirty).

    PSS moves when unrelated processes map the same files (every Python on the machine
    shares the interpreter's pages); USS does not, so on a shared machine it is the steadier
    measure of what the connections cost."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
                for line in f:
                    if line.startswith((b"Private_Clean:", b"Private_Dirty:")):
                        total += int(line.split()[1]) * 1024
        except (OSError, IndexError, ValueError):
            pass
    return total


def memory(root: int) -> dict:
    pids = process_tree(root)
    return {
        "rss": rss_bytes(pids),
        "pss": pss_bytes(pids),
        "uss": uss_bytes(pids),
        "procs": len(pids),
    }


def _client_report(client: subprocess.Popen, timeout: float) -> dict:
    """The client's JSON line, once every connection is open (or the deadline passed)."""
    assert client.stdout is not None
    ready, _, _ = select.select([client.stdout], [], [], timeout)
    line = client.stdout.readline() if ready else b""
    if not line:
        raise RuntimeError(f"the idle client said nothing (exit status {client.poll()})")
    return json.loads(line)


def one_run(t: Target, opts: argparse.Namespace) -> dict:
    """Baseline, N connections held, and after they closed: the server tree's memory."""
    root = t.root_pid()
    time.sleep(opts.settle)
    base = memory(root)
    cpu0 = tree_cpu_seconds(root)
    sampler = RssSampler(root, interval=0.1, pss_interval=1.0)
    sampler.start()
    argv = [sys.executable, str(CLIENT), "--port", str(t.port), "-n", str(opts.connections)]
    argv += ["--sources", str(opts.sources), "--deadline", str(opts.deadline)]
    if opts.ehlo:
        argv.append("--ehlo")
    client = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        opened = _client_report(client, opts.deadline + 30)
        cpu_open = tree_cpu_seconds(root) - cpu0
        time.sleep(opts.settle)
        held = memory(root)
        sampler.stop()
        if not t.alive():
            raise RuntimeError(f"the server died:\n{tail(t.log)}")
    finally:
        sampler.stop()
        assert client.stdin is not None
        client.stdin.close()  # the client closes its connections and exits
        try:
            client.wait(60)
        except subprocess.TimeoutExpired:
            client.kill()
            client.wait(5)
    time.sleep(opts.settle)
    after = memory(root)
    n = opened["open"]

    def per_conn(key: str) -> float | None:
        return round((held[key] - base[key]) / n / 1024, 2) if n else None

    return {
        "open": n,
        "failed": opened["failed"],
        "open_seconds": opened["seconds"],
        "client_errors": opened["errors"],
        "base": base,
        "held": held,
        "after": after,
        "peak_rss": sampler.peak,
        "rss_kib_per_conn": per_conn("rss"),
        "pss_kib_per_conn": per_conn("pss"),
        "uss_kib_per_conn": per_conn("uss"),
        "cpu_ms_per_conn": round(cpu_open * 1000 / n, 3) if n else None,
    }


def _median(runs: list[dict], key: str, sub: str | None = None) -> float | None:
    xs = [r[key][sub] if sub else r[key] for r in runs]
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def make_table_row(row: Row, t: Target, runs: list[dict]) -> dict:
    return {
        "server": t.describe(),
        "tree": row.tree.index if row.tree is not None else None,
        "workers": row.workers,
        "connections": runs[0]["open"] + runs[0]["failed"],
        "open": min(r["open"] for r in runs),
        "failed": max(r["failed"] for r in runs),
        "procs": max(r["held"]["procs"] for r in runs),
        "base_rss_mib": round(_median(runs, "base", "rss") / MiB, 1),
        "held_rss_mib": round(_median(runs, "held", "rss") / MiB, 1),
        "rss_kib_per_conn": _median(runs, "rss_kib_per_conn"),
        "base_pss_mib": round(_median(runs, "base", "pss") / MiB, 1),
        "held_pss_mib": round(_median(runs, "held", "pss") / MiB, 1),
        "pss_kib_per_conn": _median(runs, "pss_kib_per_conn"),
        "held_uss_mib": round(_median(runs, "held", "uss") / MiB, 1),
        "uss_kib_per_conn": _median(runs, "uss_kib_per_conn"),
        "peak_rss_mib": round(max(r["peak_rss"] for r in runs) / MiB, 1),
        "after_rss_mib": round(_median(runs, "after", "rss") / MiB, 1),
        "cpu_ms_per_conn": _median(runs, "cpu_ms_per_conn"),
        "runs": runs,
    }


# --------------------------------------------------------------------------- report


def _f(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


COLUMNS = (
    ("server", "server", str),
    ("procs", "procs", str),
    ("open/conns", None, None),
    ("base RSS MiB", "base_rss_mib", _f),
    ("held RSS MiB", "held_rss_mib", _f),
    ("RSS KiB/conn", "rss_kib_per_conn", _f),
    ("base PSS MiB", "base_pss_mib", _f),
    ("held PSS MiB", "held_pss_mib", _f),
    ("PSS KiB/conn", "pss_kib_per_conn", _f),
    ("held USS MiB", "held_uss_mib", _f),
    ("USS KiB/conn", "uss_kib_per_conn", _f),
    ("peak RSS MiB", "peak_rss_mib", _f),
    ("RSS after close", "after_rss_mib", _f),
    ("CPU ms/conn", "cpu_ms_per_conn", lambda v: _f(v, 3)),
)


def format_table(rows: list[dict]) -> str:
    head = [c[0] for c in COLUMNS]
    lines = []
    for r in rows:
        cells = []
        for _, key, fmt in COLUMNS:
            cells.append(f"{r['open']}/{r['connections']}" if key is None else fmt(r[key]))
        lines.append(tuple(cells))
    return report._columns(head, lines)


def format_comparison(rows: list[dict], trees: list[Tree]) -> str:
    """Each later tree's rows beside the first tree's row with the same worker count."""
    if len(trees) < 2:
        return ""
    before = {r["workers"]: r for r in rows if r["tree"] == 0}
    lines = []
    for r in rows:
        b = before.get(r["workers"])
        if r["tree"] in (None, 0) or b is None:
            continue
        workers = f"--workers {r['workers']}" if r["workers"] else "workers auto"
        lines.append(
            (
                f"{workers}, #{r['tree'] + 1}",
                f"{b['held_rss_mib']} -> {r['held_rss_mib']}",
                f"{_f(b['rss_kib_per_conn'])} -> {_f(r['rss_kib_per_conn'])}",
                f"{b['held_pss_mib']} -> {r['held_pss_mib']}",
                f"{_f(b['pss_kib_per_conn'])} -> {_f(r['pss_kib_per_conn'])}",
                f"{_f(b['uss_kib_per_conn'])} -> {_f(r['uss_kib_per_conn'])}",
                f"{_f(b['cpu_ms_per_conn'], 3)} -> {_f(r['cpu_ms_per_conn'], 3)}",
            )
        )
    names = "; ".join(t.label() for t in trees)
    head = ["row", "held RSS MiB", "RSS KiB/conn", "held PSS MiB", "PSS KiB/conn", "USS KiB/conn"]
    head.append("CPU ms/conn")
    return f"## after / before (#1 is before): {names}\n" + report._columns(head, lines)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    soft, hard = raise_nofile(opts.connections + 1024)
    if soft < opts.connections + 64:
        print(
            f"# RLIMIT_NOFILE is {soft} (hard {hard}): too few descriptors for "
            f"{opts.connections} connections; expect failures",
            file=sys.stderr,
        )
    base = Path(tempfile.mkdtemp(prefix="postier-idle-", dir=opts.tmpdir))
    rows = make_rows(opts)
    runs: dict[int, list[dict]] = {i: [] for i in range(len(rows))}
    described: dict[int, Target] = {}
    failures: list[str] = []
    started = time.time()
    info = report.machine()
    try:
        for rep in range(opts.repeat):
            for i, row in enumerate(rows):  # interleaved: every row once, then again
                workdir = base / f"{i}-{rep}"
                workdir.mkdir()
                t = row.make(workdir, opts)
                described[i] = t
                print(f"# {t.describe()}, run {rep + 1}/{opts.repeat}", file=sys.stderr, flush=True)
                try:
                    t.start()
                    r = one_run(t, opts)
                except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as e:
                    failures.append(f"{t.describe()}: {e}")
                    print(f"#   FAILED: {e}", file=sys.stderr, flush=True)
                    continue
                finally:
                    t.stop()
                    if not opts.keep:
                        shutil.rmtree(workdir, ignore_errors=True)
                runs[i].append(r)
                print(
                    f"#   {r['open']} open in {r['open_seconds']} s, held RSS "
                    f"{r['held']['rss'] / MiB:.1f} MiB ({r['rss_kib_per_conn']} KiB/conn), "
                    f"PSS {r['held']['pss'] / MiB:.1f} MiB ({r['pss_kib_per_conn']} KiB/conn), "
                    f"USS ({r['uss_kib_per_conn']} KiB/conn), "
                    f"after close {r['after']['rss'] / MiB:.1f} MiB",
                    file=sys.stderr,
                    flush=True,
                )
                if r["failed"]:
                    failures.append(f"{t.describe()}: {r['failed']} failed {r['client_errors']}")
    except KeyboardInterrupt:
        failures.append("interrupted")
    finally:
        if not opts.keep:
            shutil.rmtree(base, ignore_errors=True)
    table = [make_table_row(rows[i], described[i], rs) for i, rs in runs.items() if rs]
    mode = "greeting and EHLO" if opts.ehlo else "greeting only"
    print(
        f"\n{opts.connections} idle connections ({mode}), {opts.sources} source address(es), "
        f"median of {opts.repeat}, {os.cpu_count()} CPUs, load average before the run "
        f"{info['loadavg'][0]:.2f}; per conn = (held - base) / open"
    )
    if table:
        print(format_table(table))
        if comparison := format_comparison(table, opts.trees):
            print("\n" + comparison)
    for f in failures:
        print(f"FAILED {f}")
    label = opts.label or "idle-" + "-".join(opts.servers)
    label = re.sub(r"[^A-Za-z0-9_.@-]+", "_", label)
    out = report.write_json(opts.results_dir, label, started, info, opts, table, failures)
    print(f"results: {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
