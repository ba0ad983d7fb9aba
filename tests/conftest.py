"""Shared fixtures: a live postier server per test (see tests/server.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server import PostierServer, make_server
from tests.sinks import public_tmpdir

# Every `python -m postier` a test starts runs this checkout's code, also when another
# checkout is the one installed (`pip install -e` from a second work tree): the servers,
# sendmail and queue commands the tests spawn inherit this path.
_CHECKOUT = str(Path(__file__).resolve().parent.parent)
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (_CHECKOUT, os.environ.get("PYTHONPATH", "")) if p
)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PostierServer]:
    """A running server: mx on 127.0.0.1, users alice, bob, carol at example.org."""
    srv = make_server(tmp_path / "srv").start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def pub() -> Iterator[Path]:
    """A temporary directory that daemons running as other users can enter."""
    with public_tmpdir() as path:
        yield path
