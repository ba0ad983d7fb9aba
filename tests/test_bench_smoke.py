"""The benchmark harness works end to end: tiny loads against live servers.

10 messages over 2 sessions; every one must get its 250 and be in a mailbox. No timing is
asserted: speed is what bench/run.py reports, not what the unit suite checks. Also: the
before/after run of two postier trees starts each server from its own tree, and bench/'s
modules import one another one way only (run.py, the command line, at the top).
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import harness, loadgen, report, run, targets

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _serve_exists() -> bool:
    r = subprocess.run(
        [sys.executable, "-m", "postier", "serve", "--help"],
        capture_output=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    return r.returncode == 0


@pytest.fixture(scope="module")
def serve_exists() -> None:
    if not _serve_exists():
        pytest.skip("`python -m postier serve --help` fails: the server does not exist yet")


def _postier_copy(directory: Path) -> Path:
    """A second postier tree: a copy of this one whose package, once imported, leaves a file
    ``ran-from-copy`` in its working directory (so a test can tell which tree ran)."""
    tree = directory / "other-tree"
    shutil.copytree(
        harness.REPO / "postier", tree / "postier", ignore=shutil.ignore_patterns("__pycache__")
    )
    with open(tree / "postier" / "__init__.py", "a") as f:
        f.write('\nimport pathlib as _pl\n\n_pl.Path("ran-from-copy").touch()\n')
    return tree


def _ten_messages(port: int, pipelining: bool) -> loadgen.LoadResult:
    """10 messages of 2 KiB over 2 sessions, rotated over the users; each must get its 250."""
    cfg = loadgen.LoadConfig(
        port=port,
        messages=10,
        sessions=2,
        size=2048,
        recipients=harness.RECIPIENTS,
        sender=harness.SENDER,
        pipelining=pipelining,
        deadline=60,
    )
    result = loadgen.run(cfg)
    assert result.error_samples == []
    assert (result.ok, result.errors, result.timed_out) == (10, 0, False)
    return result


@pytest.mark.parametrize("pipelining", [False, True], ids=["plain", "pipelined"])
def test_loadgen_against_postier(serve_exists, tmp_path, pipelining):
    opts = run.parse_args(["--sessions", "2", "--format", "maildir"])
    target = targets.PostierTarget(tmp_path, opts)
    target.start()
    try:
        result = _ten_messages(target.port, pipelining)
        assert len(result.latencies) == 10
        assert target.delivered() == 10
        # 10 messages rotated over the users: each mailbox got its share
        for user in harness.USERS:
            assert len(list((target.root / user / "new").iterdir())) == 2
    finally:
        proc = target.proc
        target.stop()
    assert proc.returncode == 0, f"postier did not exit 0 on SIGTERM:\n{harness.tail(target.log)}"


@pytest.mark.parametrize("pipelining", [False, True], ids=["plain", "pipelined"])
def test_the_floor_row_stores_every_message(tmp_path, pipelining):
    """bench/floor_server.py (the measuring stick) answers and stores like a server would."""
    from bench import baselines

    opts = run.parse_args(["--sessions", "2", "--workers", "2"])
    target = baselines.FloorTarget(tmp_path, opts)
    target.start()
    try:
        _ten_messages(target.port, pipelining)
        assert target.delivered() == 10
        copy = next((target.root / harness.USERS[0] / "new").iterdir())
        assert copy.read_bytes().endswith(b"\r\n") and not copy.read_bytes().endswith(b".\r\n")
    finally:
        target.stop()


def test_other_tree_is_the_one_that_runs(serve_exists, tmp_path):
    other = _postier_copy(tmp_path)
    workdir = tmp_path / "work"
    workdir.mkdir()
    opts = run.parse_args(["--sessions", "2", "--servers", f"postier,postier@{other}"])
    assert [t.path for t in opts.trees] == [harness.REPO, other]
    target = targets.make_target(f"postier@{other}", workdir, opts)
    target.start()
    try:
        assert (workdir / "ran-from-copy").exists()
        assert "#2 other-tree" in target.describe()
    finally:
        target.stop()


def test_before_and_after_in_one_run(serve_exists, tmp_path, capsys):
    other = _postier_copy(tmp_path)
    results = tmp_path / "results"
    argv = ["--servers", f"postier,postier@{other},sink", "--sessions", "2", "-n", "10"]
    argv += ["--repeat", "1", "--warmup", "0", "--tmpdir", str(tmp_path)]
    argv += ["--results-dir", str(results)]
    assert run.main(argv) == 0
    out = capsys.readouterr().out
    assert "after / before" in out
    [doc] = [json.loads(p.read_text()) for p in results.glob("*.json")]
    assert doc["failures"] == []
    rows = doc["rows"]
    assert [r["tree"] for r in rows] == [0, 1, None]
    for r in rows[:2]:
        assert (r["sent"], r["accepted"], r["delivered"], r["errors"]) == (10, 10, 10, 0)
        assert r["cpu_ms_per_msg"] is not None and r["peak_rss_mib"] > 0
    # the load generator's own CPU (a Python process: never zero), for every row
    assert all(r["load_cpu_ms_per_msg"] > 0 for r in rows)
    assert "load gen CPU ms/msg" in out
    # what the mail lives on, told with the run: on ext4 it says whether there is a journal
    fs = doc["machine"]["file_system"]
    assert f"mail on {fs}" in out and fs == report.file_system(tmp_path)
    assert fs != "unknown" and " on " in fs
    assert rows[2]["accepted"] == 10 and rows[2]["delivered"] is None
    assert doc["options"]["trees"] == [str(harness.REPO), str(other)]


def _bench_imports(path: Path) -> set[str]:
    """The bench/ modules ``path`` imports (``from bench import x``, ``from bench.x import``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "bench":
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bench."):
            found.add(node.module.removeprefix("bench."))
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("bench.") for a in node.names if "bench." in a.name)
    return found


def test_bench_modules_import_one_way():
    graph = {p.stem: _bench_imports(p) for p in BENCH.glob("*.py") if p.stem != "__init__"}
    assert not any("run" in deps for deps in graph.values()), graph
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import circle: {' -> '.join((*path, module))}"
        if module in done:
            return
        for dep in graph.get(module, ()):
            visit(dep, (*path, module))
        done.add(module)

    for module in graph:
        visit(module, ())


def test_idle_connections_bench(serve_exists, tmp_path, capsys):
    """bench/idle.py opens its connections, holds them, and reports the server's memory."""
    from bench import idle

    results = tmp_path / "results"
    argv = ["-n", "20", "--ehlo", "--workers", "1", "--settle", "0.2"]
    argv += ["--tmpdir", str(tmp_path), "--results-dir", str(results)]
    assert idle.main(argv) == 0
    assert "RSS KiB/conn" in capsys.readouterr().out
    [doc] = [json.loads(p.read_text()) for p in results.glob("idle-*.json")]
    assert doc["failures"] == []
    [row] = doc["rows"]
    assert (row["open"], row["connections"], row["failed"]) == (20, 20, 0)
    assert row["held_rss_mib"] > 0 and row["held_pss_mib"] > 0
    assert row["rss_kib_per_conn"] is not None


def test_core_cost_bench_measures_each_tree_it_is_given(tmp_path):
    """bench/core_cost.py reports its rows (no timing), and a tree's figures come from that
    tree's code: its child imports postier from the tree, not from this checkout."""
    other = _postier_copy(tmp_path)
    argv = [sys.executable, str(BENCH / "core_cost.py"), "--messages", "20", "--repeat", "1"]
    argv += ["--trees", f"{harness.REPO},{other}"]
    out = subprocess.run(
        argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0] for line in out.stdout.splitlines()[3:] if line.strip()}
    assert rows == {"protocol", "log-lines"}, out.stdout
    assert (other / "ran-from-copy").exists()  # the child runs in its tree, with its code
