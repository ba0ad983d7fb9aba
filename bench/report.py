"""What a benchmark prints and keeps: a line per run, a table per part, a JSON file per run.

A row is the median of its repeats (msgs/s, latency, CPU ms per message) and the peak of
their memory. When rows of two or more postier trees ran side by side, ``format_comparison``
puts each next to the first tree's: the before/after of one interleaved run.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import REPO, Target

RESULTS = REPO / "bench" / "results"


@dataclass
class RunResult:
    sessions: int
    accepted: int
    errors: int
    elapsed: float  # load start to the last message accepted
    e2e: float  # load start to the last message in its mailbox
    delivered: int | None
    msgs_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    peak_rss: int
    peak_pss: int
    peak_procs: int
    loadavg: float  # the machine's 1-minute load average as the run began
    cpu_s: float  # CPU seconds the server's process tree used during the run
    cpu_ms_per_msg: float | None
    error_samples: list[str] = field(default_factory=list)
    peer_cpu_ms_per_msg: float | None = None  # the far end's (smtp-sink, Dovecot), if any
    load_cpu_ms_per_msg: float | None = None  # the load generator's (smtp-source, loadgen)
    tls_handshakes: int = 0
    tls_resumed: int = 0
    tls_version: str | None = None


def _median(xs: list[float | None]) -> float | None:
    values = [x for x in xs if x is not None]
    return round(statistics.median(values), 3) if values else None


def print_run(t: Target, i: int, r: RunResult, opts: argparse.Namespace) -> None:
    """One run's figures on stderr, as it ends: a long level shows its progress."""
    lost = "" if r.delivered in (None, r.accepted) else f" DELIVERED {r.delivered}"
    u = t.unit
    more = ""
    if r.peer_cpu_ms_per_msg is not None:
        more += f", peer cpu {r.peer_cpu_ms_per_msg} ms/{u}"
    if r.load_cpu_ms_per_msg is not None:
        more += f", load generator cpu {r.load_cpu_ms_per_msg} ms/{u}"
    if r.tls_handshakes:
        more += f", {r.tls_version}, {r.tls_resumed}/{r.tls_handshakes} resumed"
    print(
        f"#   {t.describe()}, run {i + 1}/{opts.repeat}: {r.msgs_per_s} {u}s/s, "
        f"p50 {r.p50_ms} ms, p99 {r.p99_ms} ms, cpu {r.cpu_ms_per_msg} ms/{u}, "
        f"rss {r.peak_rss / 2**20:.1f} MiB, pss {r.peak_pss / 2**20:.1f} MiB, "
        f"errors {r.errors}{lost}, load {r.loadavg}{more}",
        file=sys.stderr,
        flush=True,
    )
    for e in r.error_samples[:3]:
        print(f"#     error: {e}", file=sys.stderr)


def make_row(t: Target, sessions: int, runs: list[RunResult], opts: argparse.Namespace) -> dict:
    """A table row: medians of the repeats, peaks of their memory, sums of their counts."""
    return {
        "server": t.describe(),
        "part": getattr(opts, "part", ""),
        "unit": t.unit,
        "sessions": sessions,
        "msgs_per_s": _median([r.msgs_per_s for r in runs]),
        "p50_ms": _median([r.p50_ms for r in runs]),
        "p99_ms": _median([r.p99_ms for r in runs]),
        "cpu_ms_per_msg": _median([r.cpu_ms_per_msg for r in runs]),
        "peer_cpu_ms_per_msg": _median([r.peer_cpu_ms_per_msg for r in runs]),
        "load_cpu_ms_per_msg": _median([r.load_cpu_ms_per_msg for r in runs]),
        "tls_handshakes": sum(r.tls_handshakes for r in runs),
        "tls_resumed": sum(r.tls_resumed for r in runs),
        "peak_rss_mib": round(max(r.peak_rss for r in runs) / 2**20, 1),
        "peak_pss_mib": round(max(r.peak_pss for r in runs) / 2**20, 1),
        "sent": (t.messages or opts.messages) * len(runs),
        "accepted": sum(r.accepted for r in runs),
        "delivered": sum(r.delivered or 0 for r in runs) if t.stores else None,
        "errors": sum(r.errors for r in runs),
        "tree": t.tree.index if hasattr(t, "tree") else None,  # its place in opts.trees
        "runs": [vars(r) for r in runs],
    }


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _columns(head: list[str], lines: list[tuple[str, ...]]) -> str:
    widths = [max(len(x) for x in col) for col in zip(head, *lines, strict=True)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    out += [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    ]
    return "\n".join(out)


def format_table(rows: list[dict]) -> str:
    """One table; ``rows`` share a unit (messages, or connections for handshake rows)."""
    u = rows[0].get("unit", "msg") if rows else "msg"
    peer = any(r.get("peer_cpu_ms_per_msg") is not None for r in rows)
    load = any(r.get("load_cpu_ms_per_msg") is not None for r in rows)
    tls = any(r.get("tls_handshakes") for r in rows)
    head = [
        "server",
        "sessions",
        f"{u}s/s",
        "p50 ms",
        "p99 ms",
        f"CPU ms/{u}",
        *([f"peer CPU ms/{u}"] if peer else []),
        *([f"load gen CPU ms/{u}"] if load else []),
        "peak RSS MiB",
        "peak PSS MiB",
        *(["TLS resumed"] if tls else []),
        "delivered/sent" if u == "msg" else "done/sent",
        "errors",
    ]
    lines = []
    for r in rows:
        if r["delivered"] is None:
            landed = f"{r['accepted']}/{r['sent']}" if u != "msg" else "n/a (sink)"
        else:
            landed = f"{r['delivered']}/{r['sent']}"
        hs = r.get("tls_handshakes", 0)
        lines.append(
            (
                r["server"],
                str(r["sessions"]),
                f"{r['msgs_per_s']:.0f}",
                _fmt(r["p50_ms"]),
                _fmt(r["p99_ms"]),
                _fmt(r["cpu_ms_per_msg"]),
                *([_fmt(r.get("peer_cpu_ms_per_msg"))] if peer else []),
                *([_fmt(r.get("load_cpu_ms_per_msg"))] if load else []),
                f"{r['peak_rss_mib']:.1f}",
                f"{r['peak_pss_mib']:.1f}",
                *([f"{r.get('tls_resumed', 0)}/{hs}" if hs else "-"] if tls else []),
                landed,
                str(r["errors"]),
            )
        )
    return _columns(head, lines)


def format_tables(rows: list[dict]) -> str:
    """One table per part of a scenario (and per unit), in the order they ran."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r.get("part", ""), r.get("unit", "msg")), []).append(r)
    out = []
    for (part, _), group in groups.items():
        out.append((f"## {part}\n" if part else "") + format_table(group))
    return "\n\n".join(out)


def _ratio(new: float | None, old: float | None) -> str:
    return f"{new / old:.2f}x" if new is not None and old else "-"


def format_comparison(rows: list[dict], trees: list) -> str:
    """Each postier row of a later tree beside the same row of the first tree ("before"):
    msgs/s, CPU ms per message and peak RSS, and their ratios after/before."""
    if len(trees) < 2:
        return ""

    def key(r: dict) -> tuple:
        # the row's name without its tree: "postier [#1 tree sha] (maildir)" -> "(maildir)"
        return (r.get("part", ""), r["sessions"], r["server"].partition("] ")[2])

    before = {key(r): r for r in rows if r.get("tree") == 0}
    lines = []
    for r in rows:
        b = before.get(key(r))
        if b is None or not r.get("tree"):
            continue
        lines.append(
            (
                f"{key(r)[2]} #{r['tree'] + 1}, {r['sessions']} sessions",
                f"{b['msgs_per_s']:.0f} -> {r['msgs_per_s']:.0f}",
                _ratio(r["msgs_per_s"], b["msgs_per_s"]),
                f"{_fmt(b['cpu_ms_per_msg'])} -> {_fmt(r['cpu_ms_per_msg'])}",
                _ratio(r["cpu_ms_per_msg"], b["cpu_ms_per_msg"]),
                f"{b['peak_rss_mib']:.1f} -> {r['peak_rss_mib']:.1f}",
            )
        )
    if not lines:
        return ""
    u = rows[0].get("unit", "msg")
    head = ["row (tree)", f"{u}s/s", "ratio", f"CPU ms/{u}", "ratio", "peak RSS MiB"]
    names = "; ".join(f"[{t.label()}] = {t.path}" for t in trees)
    return f"## after / before (#1 is before): {names}\n" + _columns(head, lines)


def file_system(path: str | Path) -> str:
    """What the mail roots and queues live on, e.g. "ext4 (no journal) on /dev/vda": it
    moves the figures (bench/README.md, "Reading the figures", says how and why)."""
    target = os.path.realpath(path)
    best: tuple[str, str, str] | None = None
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if "-" not in fields:
                continue
            mount_point = fields[4]
            rest = fields[fields.index("-") + 1 :]
            inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
            if inside and (best is None or len(mount_point) >= len(best[0])):
                best = (mount_point, rest[0], rest[1] if len(rest) > 1 else "?")
    if best is None:
        return "unknown"
    _, fs_type, source = best
    if fs_type == "ext4" and os.path.isdir("/proc/fs/jbd2"):
        journaled = bool(glob.glob(f"/proc/fs/jbd2/{os.path.basename(source)}-*"))
        fs_type += "" if journaled else " (no journal)"
    return f"{fs_type} on {source}"


def machine() -> dict:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "host": platform.node(),
        "loadavg": os.getloadavg(),
    }


def write_json(
    directory: Path,
    label: str,
    started: float,
    info: dict,
    opts: argparse.Namespace,
    rows: list[dict],
    failures: list[str],
) -> Path:
    """Every figure of every repeat, the options and the machine, in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
    out = directory / f"{label}-{stamp}.json"
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()}
    options["trees"] = [str(t.path) for t in getattr(opts, "trees", [])]
    document = {
        "started": stamp,
        "machine": info,
        "argv": sys.argv[1:],
        "options": options,
        "rows": rows,
        "failures": failures,
    }
    out.write_text(json.dumps(document, indent=1) + "\n")
    return out
