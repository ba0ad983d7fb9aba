"""One measured run, and one session count's interleaved repeats over all the rows.

A run drives the load with a driver, waits (bounded) for every accepted message to land and
for the queue to empty, and reads the server tree's CPU time before and after and its memory
throughout. The repeats of a level are interleaved (row A, B, C, then A, B, C again) so that
whatever else the machine is doing weighs on every row alike: that is what lets one run
compare servers, or two postier trees, fairly.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import report
from bench.drivers import DRIVERS
from bench.harness import RssSampler, Target, tail, tree_cpu_seconds
from bench.report import RunResult

_FAILS = (RuntimeError, OSError, subprocess.SubprocessError, ValueError, KeyError)


@dataclass(frozen=True)
class Spec:
    """One row of a table: a name (for directories and failures) and how to make its target.

    ``make`` takes the work directory and the options; a postier row's also takes ``tree=``,
    so that a scenario can be repeated for every postier tree of ``--servers``.
    """

    name: str
    make: Callable[..., Target]
    postier: bool = False


@dataclass
class Part:
    """A table of a scenario: its rows, session counts (None: --sessions) and option changes."""

    title: str
    specs: list[Spec]
    sessions: list[int] | None = None
    overrides: dict = field(default_factory=dict)


def _settle(target: Target, d: dict, opts: argparse.Namespace) -> None:
    """Wait (bounded) until nothing is left in flight: a relay's queue entry goes after the
    far end's 250. A queue left non-empty counts as an error in ``d``."""
    end = time.perf_counter() + opts.drain_timeout
    while (left := target.settled()) and time.perf_counter() < end:
        time.sleep(0.02)
    if left:
        d["error_samples"] = [f"after the run: {left}", *d["error_samples"]]
        d["errors"] += 1


def _reaped_children_cpu() -> float:
    """CPU seconds of this process's children that have ended and been waited for. The
    driver is the one child waited for during a run (the servers live on until the end),
    so the difference around it is the load generator's own CPU: on a machine with few
    cores it shares them with the server, and that share bounds any server's msgs/s."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def one_run(
    target: Target, sessions: int, opts: argparse.Namespace, messages: int | None = None
) -> RunResult:
    """One measured run (or, with ``messages``, a warm-up: same load, fewer messages)."""
    if messages is None:
        messages = target.messages or opts.messages
    if messages != opts.messages:
        opts = argparse.Namespace(**{**vars(opts), "messages": messages})
    before = target.delivered() if target.stores else 0
    loadavg = os.getloadavg()[0]
    peers = target.peer_pids()
    cpu0 = tree_cpu_seconds(target.root_pid())
    peer0 = sum(tree_cpu_seconds(p) for p in peers)
    sampler = RssSampler(target.root_pid())
    sampler.start()
    try:
        load0 = _reaped_children_cpu()
        d = DRIVERS[opts.driver](target, sessions, opts)
        load_cpu = _reaped_children_cpu() - load0
        done = time.perf_counter()
        delivered = None
        e2e = d["elapsed"]
        if target.stores:
            delivered = target.delivered() - before
            if delivered < d["accepted"]:
                # Postfix answers 250 once queued and delivers later: wait for the mailboxes
                end = done + opts.drain_timeout
                while delivered < d["accepted"] and time.perf_counter() < end:
                    time.sleep(0.02)
                    delivered = target.delivered() - before
                e2e += time.perf_counter() - done
            _settle(target, d, opts)
    finally:
        peak = sampler.stop()
    cpu = tree_cpu_seconds(target.root_pid()) - cpu0
    peer_cpu = sum(tree_cpu_seconds(p) for p in peers) - peer0
    handled = delivered if target.stores else d["accepted"]
    if target.stores:
        target.clear()
    return RunResult(
        sessions=sessions,
        accepted=d["accepted"],
        errors=d["errors"],
        elapsed=round(d["elapsed"], 4),
        e2e=round(e2e, 4),
        delivered=delivered,
        msgs_per_s=round(handled / e2e, 1) if e2e > 0 else 0.0,
        p50_ms=d["p50_ms"],
        p99_ms=d["p99_ms"],
        peak_rss=peak,
        peak_pss=sampler.peak_pss,
        peak_procs=sampler.peak_procs,
        loadavg=round(loadavg, 2),
        cpu_s=round(cpu, 2),
        cpu_ms_per_msg=round(cpu * 1000 / handled, 3) if handled else None,
        error_samples=d["error_samples"][:5],
        peer_cpu_ms_per_msg=round(peer_cpu * 1000 / handled, 3) if peers and handled else None,
        load_cpu_ms_per_msg=round(load_cpu * 1000 / handled, 3) if handled else None,
        tls_handshakes=d.get("tls_handshakes", 0),
        tls_resumed=d.get("tls_resumed", 0),
        tls_version=d.get("tls_version"),
    )


def _start(spec: Spec, sessions: int, opts: argparse.Namespace, base: Path) -> Target:
    """Make and start a row's target on a fresh work directory, then warm it up."""
    workdir = Path(tempfile.mkdtemp(prefix=f"{spec.name}-s{sessions}-", dir=base))
    t = spec.make(workdir, opts)
    print(f"# {t.describe()}, {sessions} sessions: starting", file=sys.stderr, flush=True)
    return t


def bench_level(
    sessions: int,
    opts: argparse.Namespace,
    base: Path,
    failures: list[str],
    rows: list[dict],
    specs: list[Spec],
) -> None:
    """All rows at one session count, each server started afresh on its own mail root.

    The repeats are interleaved (server A, B, C, then A, B, C again...) so that whatever
    else the machine is doing weighs on every server alike. A server that fails is dropped
    from the level; the others go on. The rows go to ``rows``, also when interrupted.
    """
    targets: list[Target] = []
    runs: dict[Target, list[RunResult]] = {}
    try:
        for spec in specs:
            try:
                t = _start(spec, sessions, opts, base)
                targets.append(t)
                t.start()
                if opts.warmup:
                    w = one_run(t, sessions, opts, messages=min(opts.warmup, t.messages or 1e9))
                    if w.errors or w.delivered not in (None, w.accepted):
                        # not in the figures, but a fresh mail root is where races show
                        failures.append(
                            f"{spec.name} at {sessions} sessions, warm-up: {w.errors} errors, "
                            f"{w.delivered} of {w.accepted} accepted landed {w.error_samples}"
                        )
                runs[t] = []
            except _FAILS as e:
                failures.append(f"{spec.name} at {sessions} sessions: {e}")
                print(f"# {spec.name}: FAILED: {e}", file=sys.stderr, flush=True)
        for i in range(opts.repeat):
            for t in [t for t in targets if t in runs]:
                try:
                    r = one_run(t, sessions, opts)
                    if not t.alive():
                        raise RuntimeError(f"the server died:\n{tail(t.log)}")
                except _FAILS as e:
                    failures.append(f"{t.describe()} at {sessions} sessions: {e}")
                    print(f"# {t.describe()}: FAILED: {e}", file=sys.stderr, flush=True)
                    del runs[t]
                    t.stop()
                    continue
                runs[t].append(r)
                report.print_run(t, i, r, opts)
    finally:
        for t in targets:
            t.stop()  # its work directory goes with run.py's, after the last level (see
            # mailboxes.clear_maildir: deleting files here would slow the next level down)
        rows.extend(report.make_row(t, sessions, runs[t], opts) for t in targets if runs.get(t))
