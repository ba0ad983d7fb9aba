"""The streaming DKIM body hash equals dkimpy's whole-body canonicalization, for any body."""

from __future__ import annotations

import hashlib
import io

import pytest
from dkim.canonicalization import Relaxed, Simple
from hypothesis import given, settings
from hypothesis import strategies as st

from postier.mailauth import bodyhash
from postier.mailauth.bodyhash import BodySpec, hash_bodies

LINE = st.text(alphabet=" \tab", max_size=12)
BODY = st.lists(LINE, max_size=12).map(lambda lines: "".join(x + "\r\n" for x in lines).encode())
CANON = {"simple": Simple, "relaxed": Relaxed}


def reference(body: bytes, canonicalization: str, length: int | None = None) -> bytes:
    canonical = CANON[canonicalization].canonicalize_body(body)
    if length is not None:
        canonical = canonical[:length]
    return hashlib.sha256(canonical).digest()


@settings(max_examples=300, deadline=None)
@given(body=BODY, block=st.integers(1, 9), lf=st.booleans(), length=st.none() | st.integers(0, 40))
def test_streaming_matches_dkimpy(body, block, lf, length):
    original = bodyhash.BLOCK
    bodyhash.BLOCK = block  # tiny blocks: every split point, long-line pieces included
    try:
        stored = body.replace(b"\r\n", b"\n") if lf else body
        specs = [BodySpec(c, "sha256", length) for c in CANON]
        got = hash_bodies(io.BytesIO(stored), specs)
    finally:
        bodyhash.BLOCK = original
    for spec in specs:
        assert got[spec] == reference(body, spec.canonicalization, length), spec


@pytest.mark.parametrize("canonicalization", ["simple", "relaxed"])
def test_empty_body(canonicalization):
    spec = BodySpec(canonicalization, "sha256")
    assert hash_bodies(io.BytesIO(b""), [spec])[spec] == reference(b"", canonicalization)


def test_a_long_line_is_hashed_in_pieces():
    body = b"x" * 3_000_000 + b"  \t  y \r\n\r\n"
    specs = [BodySpec(c, "sha256") for c in CANON]
    got = hash_bodies(io.BytesIO(body.replace(b"\r\n", b"\n")), specs)
    for spec in specs:
        assert got[spec] == reference(body, spec.canonicalization)
