"""`postier status [-c FILE]`: a short view of a running server for the terminal.

It reads what every worker contributes and nothing only one worker knows: the daemon's
metrics endpoint (`metrics = "ADDR:PORT"` in the config; the scrape sums the workers) and
the queue directory (envelope files, read-only). Without an endpoint it still shows the
queue, and says how to turn the endpoint on. Exit 0, or 1 when the daemon cannot be reached.
"""

from __future__ import annotations

import argparse
import http.client
import sys
import time
from collections import defaultdict
from pathlib import Path

from postier.config import Config, build, load_toml
from postier.errors import ConfigError
from postier.netaddr import parse_listen

VERIFIED_TLS = ("verified", "dane", "mta-sts", "verify")  # tls label values of a checked peer

Samples = list[tuple[str, dict[str, str], float]]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", type=Path, help="the server's TOML configuration file")


def run(args: argparse.Namespace) -> int:
    try:
        config = build(load_toml(args.config) if args.config else {}, {})
    except ConfigError as exc:
        print(f"postier status: {exc}", file=sys.stderr)
        return 2
    samples, problem = read_metrics(config)
    for line in render(config, samples, problem, queue_summary(config.queue_dir)):
        print(line)
    return 1 if problem and config.metrics else 0


def read_metrics(config: Config, timeout: float = 5.0) -> tuple[Samples, str]:
    """Every sample of one scrape, or ([], why not)."""
    if not config.metrics:
        return [], 'no metrics endpoint: set metrics = "127.0.0.1:9325" to see sessions'
    from prometheus_client.parser import text_string_to_metric_families

    spec = parse_listen(config.metrics, "metrics")
    host = spec.host if spec.kind == "ip" else "127.0.0.1"
    conn = http.client.HTTPConnection(host, spec.port, timeout=timeout)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        body = response.read().decode("utf-8", "replace")
        if response.status != 200:
            return [], f"{config.metrics}: HTTP {response.status}"
    except OSError as exc:
        return [], f"daemon not reachable at {config.metrics}: {exc.strerror or exc}"
    finally:
        conn.close()
    return [
        (s.name, s.labels, s.value)
        for family in text_string_to_metric_families(body)
        for s in family.samples
    ], ""


def _sum(samples: Samples, name: str, **labels: str) -> float:
    return sum(
        v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items())
    )


def queue_summary(queue_dir: Path) -> dict[str, object]:
    """Entries waiting for a first try or deferred, the oldest, the last failure per domain."""
    from postier.queue.store import QueueStore

    out: dict[str, object] = {"waiting": 0, "deferred": 0, "oldest": None, "failures": {}}
    try:
        entries = QueueStore(queue_dir, create=False).list()
    except Exception as exc:  # an unreadable or absent queue is worth a line, not a crash
        out["error"] = str(exc)
        return out
    failures: dict[str, tuple[float, str]] = {}
    for entry in entries:
        pending = entry.pending()
        tried = [r for r in pending if r.attempts]
        out["deferred" if tried else "waiting"] += 1  # type: ignore[operator]
        oldest = out["oldest"]
        out["oldest"] = entry.arrival if oldest is None else min(oldest, entry.arrival)  # type: ignore[type-var]
        for r in tried:
            if r.domain not in failures or failures[r.domain][0] < r.last_attempt:
                failures[r.domain] = (r.last_attempt, r.last_reply)
    out["failures"] = failures
    return out


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def render(config: Config, samples: Samples, problem: str, queue: dict[str, object]) -> list[str]:
    lines = [f"postier on {config.hostname}"]
    open_by: dict[str, float] = defaultdict(float)
    for name, labels, value in samples:
        if name == "postier_sessions_open":
            open_by[labels.get("listener", "?")] += value
    for role, specs in config.listeners.items():
        if specs:
            where = ", ".join(str(s) for s in specs)
            sessions = f"{open_by.get(role, 0):.0f} open" if samples else "?"
            lines.append(f"  {role:<12} {where:<30} sessions: {sessions}")
    if problem:
        lines.append(f"  metrics: {problem}")
    else:
        last_minute = _sum(samples, "postier_messages_recent", window="1m")
        last_hour = _sum(samples, "postier_messages_recent", window="1h")
        lines.append(
            f"messages accepted: {last_minute:.0f} in the last minute, "
            f"{last_hour:.0f} in the last hour"
        )
        attempts = _sum(samples, "postier_delivery_attempts_total")
        tls = attempts - _sum(samples, "postier_delivery_attempts_total", tls="no")
        verified = sum(
            _sum(samples, "postier_delivery_attempts_total", tls=v) for v in VERIFIED_TLS
        )
        if attempts:
            lines.append(
                f"outbound sessions: {attempts:.0f}, over TLS {100 * tls / attempts:.0f}%, "
                f"verified TLS {100 * verified / attempts:.0f}%"
            )
        else:
            lines.append("outbound sessions: none yet")
    if "error" in queue:
        lines.append(f"queue {config.queue_dir}: {queue['error']}")
        return lines
    oldest = queue["oldest"]
    age = f", oldest {_age(time.time() - oldest)}" if isinstance(oldest, float) else ""
    lines.append(f"queue: {queue['waiting']} waiting, {queue['deferred']} deferred{age}")
    failures = queue["failures"]
    assert isinstance(failures, dict)
    for domain, (_, reply) in sorted(failures.items()):
        lines.append(f"  {domain}: {reply or 'no reply'}")
    return lines
