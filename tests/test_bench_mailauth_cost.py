"""bench/mailauth_cost.py runs: every row of the table, for two trees named, on a tiny load.

No timing is asserted (the figures are the benchmark's to report); the run checks itself
(each row asserts its verdict: SPF, DKIM and DMARC pass, a signature is made), so a change
that breaks a row shows here rather than on the day someone measures.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_every_row_for_two_trees() -> None:
    command = [sys.executable, str(REPO / "bench" / "mailauth_cost.py"), "--trees"]
    out = subprocess.run(
        [*command, f"{REPO},{REPO}", "--messages", "2", "--repeat", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines() if line}
    for row in ("read", "spf", "dkim-rsa", "dkim-ed25519", "dmarc", "all", "all-cold"):
        assert len(rows[row]) == 3, out.stdout  # two trees and the ratio
    assert rows["sign-rsa"][-1].endswith("x") and float(rows["sign-rsa"][0]) > 0
    assert "sign-ed25519" in rows


def test_primitives() -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "mailauth_cost.py"), "--primitives", "--repeat", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for op in ("sign, dkimpy", "sign, OpenSSL", "verify, dkimpy", "verify, OpenSSL"):
        assert op in out.stdout
