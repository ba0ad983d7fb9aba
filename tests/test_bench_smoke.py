"""The benchmark harness works end to end: a tiny load against a live `postier serve`.

10 messages over 2 sessions; every one must get its 250 and be in a mailbox. No timing is
asserted: speed is what bench/run.py reports, not what the unit suite checks.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name: str):
    """Import bench/<name>.py (bench/ is a directory of scripts, not a package)."""
    modname = f"_postier_bench_{name}"
    if modname not in sys.modules:
        spec = importlib.util.spec_from_file_location(modname, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[modname] = module  # dataclasses look their module up while it loads
        spec.loader.exec_module(module)
    return sys.modules[modname]


def _serve_exists() -> bool:
    r = subprocess.run(
        [sys.executable, "-m", "postier", "serve", "--help"],
        capture_output=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    return r.returncode == 0


@pytest.fixture(scope="module")
def bench():
    if not _serve_exists():
        pytest.skip("`python -m postier serve --help` fails: the server does not exist yet")
    return _load("run"), _load("loadgen")


@pytest.mark.parametrize("pipelining", [False, True], ids=["plain", "pipelined"])
def test_loadgen_against_postier(bench, tmp_path, pipelining):
    run, loadgen = bench
    opts = run.parse_args(["--sessions", "2", "--format", "maildir"])
    target = run.PostierTarget(tmp_path, opts)
    target.start()
    try:
        cfg = loadgen.LoadConfig(
            port=target.port,
            messages=10,
            sessions=2,
            size=2048,
            recipients=run.RECIPIENTS,
            sender=run.SENDER,
            pipelining=pipelining,
            deadline=60,
        )
        result = loadgen.run(cfg)
        assert result.error_samples == []
        assert (result.ok, result.errors, result.timed_out) == (10, 0, False)
        assert len(result.latencies) == 10
        assert target.delivered() == 10
        # 10 messages rotated over the users: each mailbox got its share
        for user in run.USERS:
            assert len(list((target.root / user / "new").iterdir())) == 2
    finally:
        proc = target.proc
        target.stop()
    assert proc.returncode == 0, f"postier did not exit 0 on SIGTERM:\n{run.tail(target.log)}"
