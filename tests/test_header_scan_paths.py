"""The header scanner's whole-chunk path agrees with its field-by-field pass."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from postier.inbound.header_scan import HeaderScanner, NamedDrop

NAMES = ["Received", "From", "To", "Subject", "X-Thing", "Authentication-Results", "Date"]
field = st.builds(
    lambda name, value, folds: f"{name}: {value}\n" + "".join(f"\t{f}\n" for f in folds),
    st.sampled_from(NAMES),
    st.text("abc xyz=;", max_size=20),
    st.lists(st.text("abc xyz", min_size=1, max_size=10), max_size=2),
)


def run(scanner: HeaderScanner, chunks: list[bytes]) -> tuple[bytes, set[bytes], int]:
    out = b"".join(scanner.feed(c) for c in chunks)
    if not scanner.done:
        out += scanner.close()
    return out, scanner.names, scanner.received


@given(st.lists(field, max_size=12), st.lists(st.integers(0, 20), max_size=4), st.booleans())
def test_both_paths_give_the_same_bytes_names_and_hops(
    fields: list[str], cuts: list[int], drop_ar: bool
) -> None:
    lines = [*"".join(fields).encode().splitlines(keepends=True), b"\n", b"body\n"]
    bounds = sorted({min(c, len(lines)) for c in cuts} | {0, len(lines)})
    chunks = [b"".join(lines[a:b]) for a, b in itertools.pairwise(bounds)]

    def decide(name: bytes, _field: bytes) -> bool:
        return drop_ar and name == b"authentication-results"

    fast = run(HeaderScanner(NamedDrop(frozenset({b"authentication-results"}), decide)), chunks)
    slow = run(HeaderScanner(decide), chunks)
    assert fast == slow
    plain = run(HeaderScanner(), chunks)
    assert plain[1:] == slow[1:]
