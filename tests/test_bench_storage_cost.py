"""bench/storage_cost.py runs and reports every layout (a few messages; no timing asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import storage_cost


def test_every_layout_lands_its_messages(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for mode in storage_cost.MODES:
        work = tmp_path / mode
        for sub in ("spool", "md/tmp", "md/new", "md/cur"):
            (work / sub).mkdir(parents=True)
        for i in range(5):
            storage_cost.MODES[mode](str(work), i)
        assert len(list((work / "md/new").iterdir())) == 5
        assert not list((work / "spool").iterdir()) and not list((work / "md/tmp").iterdir())
    assert storage_cost.main(["--messages", "5", "--repeat", "1", "--threads", "2",
                              "--tmpdir", str(tmp_path)]) == 0  # fmt: skip
    assert "spool-link" in capsys.readouterr().out
