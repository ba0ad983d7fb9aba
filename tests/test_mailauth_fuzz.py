"""Any header section gives verdicts, never an exception (DKIM parsing, From domains, A-R)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from postier.mailauth import AuthVerdicts, DkimResult, SpfResult
from postier.mailauth.dkim_verify import prepare
from postier.mailauth.dmarc import DmarcResult
from postier.mailauth.headers import HeaderSection, from_domains

FRAGMENTS = st.sampled_from(
    [
        b"DKIM-Signature:",
        b"From:",
        b" v=1;",
        b" a=rsa-sha256;",
        b" a=ed25519-sha256;",
        b" c=relaxed/simple;",
        b" d=example.test;",
        b" s=sel;",
        b" h=from:to;",
        b" bh=AAAA;",
        b" b=AAAA",
        b" l=12;",
        b" x=1;",
        b" t=99999999999;",
        b" i=@other.test;",
        b" <a@b.test>",
        b' "x@y" <',
        b"(",
        b"\\",
        b";",
        b"=",
        b":",
        b"\r\n",
        b"\r\n\t",
        b"\xff",
        b"\x00",
    ]
)
SECTION = st.lists(FRAGMENTS, max_size=40).map(b"".join)


@settings(max_examples=400, deadline=None, database=None)
@given(raw=SECTION)
def test_prepare_and_from_domains_never_raise(raw):
    raw = raw if raw.endswith(b"\r\n") else raw + b"\r\n"
    prepared = prepare(HeaderSection(raw, 0, False))
    for result in prepared.results.values():
        assert result.result == "permerror"
    domains = from_domains(raw)
    assert all(d and d == d.lower() for d in domains)
    verdicts = AuthVerdicts(
        SpfResult("none", "mailfrom", "", raw.decode("latin-1")),
        list(prepared.results.values()) or [DkimResult("none")],
        DmarcResult("none", domains[0] if domains else ""),
    )
    field = verdicts.header("mx.test")
    assert field.startswith(b"Authentication-Results: mx.test;\n\t") and b"\r" not in field
    assert all(line.startswith(b"\t") for line in field.split(b"\n")[1:-1])
