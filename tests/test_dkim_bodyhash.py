"""The streaming relaxed body hash equals dkimpy's whole-body canonicalization, byte for byte."""

from __future__ import annotations

import base64
import hashlib
import io
import re

from dkim.canonicalization import Relaxed
from hypothesis import given, settings
from hypothesis import strategies as st

from postier.dkim.bodyhash import RelaxedBodyHash, hash_stream


def dkimpy_bh(body: bytes) -> bytes:
    """What dkimpy computes: its parser joins the body's lines with CRLF, then canonicalizes."""
    joined = b"\r\n".join(re.split(b"\r?\n", body))
    return base64.b64encode(hashlib.sha256(Relaxed.canonicalize_body(joined)).digest())


def streamed(body: bytes, cuts: list[int]) -> bytes:
    hasher = RelaxedBodyHash()
    start = 0
    for cut in sorted(c % (len(body) + 1) for c in cuts):
        hasher.update(body[start:cut])
        start = max(start, cut)
    hasher.update(body[start:])
    return hasher.b64()


# Bodies made of the characters that matter to relaxed canonicalization.
bodies = st.lists(st.sampled_from([b"a", b"xy", b" ", b"\t", b"\n", b"\r\n", b"\r", b"\xe9"]))


@settings(max_examples=400, deadline=None)
@given(parts=bodies, cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=6))
def test_streaming_equals_dkimpy(parts: list[bytes], cuts: list[int]) -> None:
    body = b"".join(parts)
    assert streamed(body, cuts) == dkimpy_bh(body)


def test_known_edge_cases() -> None:
    for body in [
        b"",
        b"\n",
        b"\n\n\n",
        b"  \n\t\n",
        b"text\n",
        b"text",
        b"text  \n\n\n",
        b"a \t b\t\n\n c\n\n",
        b"last line without end  ",
        b"\xc3\xa9t\xc3\xa9 8-bit\n",
    ]:
        assert hash_stream(io.BytesIO(body), block=3) == dkimpy_bh(body), body


def test_empty_body_is_the_hash_of_nothing() -> None:
    # RFC 6376 §3.4.4: an empty body canonicalizes to the empty string.
    assert hash_stream(io.BytesIO(b"\n\n")) == b"47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
