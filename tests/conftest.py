"""Shared fixtures: a live postier server per test (see tests/server.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server import PostierServer, make_server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PostierServer]:
    """A running server: mx on 127.0.0.1, users alice, bob, carol at example.org."""
    srv = make_server(tmp_path / "srv").start()
    try:
        yield srv
    finally:
        srv.stop()
