"""Tests for RFC 5321 path and ESMTP parameter parsing (postier.protocol.address).

The relay-trick cases matter most: whatever the client writes, the parsed domain must be the
one mail would actually be routed to, because that is what the relay policy checks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from postier.protocol.address import (
    Address,
    AddressError,
    decode_xtext,
    encode_xtext,
    parse_params,
    parse_path,
    split_path_and_params,
)


def rcpt(path: str, *, utf8: bool = False, postmaster: bool = True) -> Address | None:
    return parse_path(path, utf8=utf8, null_ok=False, bare_postmaster_ok=postmaster, sender=False)


def mail(path: str, *, utf8: bool = False) -> Address | None:
    return parse_path(path, utf8=utf8, null_ok=True, bare_postmaster_ok=False, sender=True)


def rcpt_error(path: str, *, utf8: bool = False) -> AddressError:
    with pytest.raises(AddressError) as info:
        rcpt(path, utf8=utf8)
    return info.value


def domain_of(octets: int) -> str:
    """A valid host name exactly `octets` long (labels of at most 63 letters)."""
    labels, left = [], octets
    while left > 64:
        labels.append("a" * 63)
        left -= 64
    labels.append("b" * left)
    return ".".join(labels)


# --- valid paths --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "local", "domain"),
    [
        ("<u@example.com>", "u", "example.com"),
        ("<User.Name+tag@Example.COM>", "User.Name+tag", "example.com"),
        ("<u@localhost>", "u", "localhost"),
        ("<a-b@x-1.y2.org>", "a-b", "x-1.y2.org"),
        ("<!#$%&'*+/=?^_`{|}~-@x.org>", "!#$%&'*+/=?^_`{|}~-", "x.org"),
        ('<"john doe"@x.org>', "john doe", "x.org"),
        ('<"a\\"b\\\\c"@x.org>', 'a"b\\c', "x.org"),
        ('<"\\a"@x.org>', "a", "x.org"),
        ('<"a..b"@x.org>', "a..b", "x.org"),
        ('<"<>"@x.org>', "<>", "x.org"),
        ("<u@xn--bcher-kva.example>", "u", "xn--bcher-kva.example"),
        ("<u@123.example>", "u", "123.example"),
        ("<u@a--b.example>", "u", "a--b.example"),
        (f"<u@{'a' * 63}.org>", "u", f"{'a' * 63}.org"),
    ],
)
def test_valid_paths(path: str, local: str, domain: str) -> None:
    assert rcpt(path) == Address(local, domain)
    assert mail(path) == Address(local, domain)


@pytest.mark.parametrize(
    ("path", "local", "domain"),
    [
        ("<u%foreign@local>", "u%foreign", "local"),
        ("<foreign!u@local>", "foreign!u", "local"),
        ("<@local:u@foreign>", "u", "foreign"),
        ("<@local,@other.example:u@foreign>", "u", "foreign"),
        ("<@[127.0.0.1]:u@foreign>", "u", "foreign"),
        ("<@[IPv6:::1],@x:u@foreign>", "u", "foreign"),
        ('<"u@foreign"@local>', "u@foreign", "local"),
        ('<"u%foreign"@local>', "u%foreign", "local"),
        ("<u@[127.0.0.1]>", "u", "[127.0.0.1]"),
        ("<u%[10.0.0.1]@local>", None, None),
    ],
)
def test_relay_tricks_give_the_routing_domain(path: str, local: str | None, domain: str) -> None:
    if local is None:  # `[` is not atext: a literal hidden in the local part is a syntax error
        assert rcpt_error(path).reply.code == 501
        return
    assert rcpt(path) == Address(local, domain)


def test_null_path() -> None:
    assert mail("<>") is None
    err = rcpt_error("<>")
    assert (err.reply.code, err.reply.enhanced) == (501, "5.1.3")


@pytest.mark.parametrize("path", ["<postmaster>", "<Postmaster>", "<POSTMASTER>"])
def test_bare_postmaster(path: str) -> None:
    addr = rcpt(path)
    assert addr == Address("postmaster", "")
    assert str(addr) == "postmaster"
    with pytest.raises(AddressError):
        rcpt(path, postmaster=False)
    with pytest.raises(AddressError):
        mail(path)


@pytest.mark.parametrize("path", ["<@x:postmaster>", "<postmaster2>", '<"postmaster">', "<root>"])
def test_bare_non_postmaster_rejected(path: str) -> None:
    assert rcpt_error(path).reply.code == 501


@pytest.mark.parametrize(
    ("path", "domain"),
    [
        ("<u@[192.0.2.1]>", "[192.0.2.1]"),
        ("<u@[IPv6:2001:db8::1]>", "[IPv6:2001:db8::1]"),
        ("<u@[ipv6:2001:DB8:0:0::1]>", "[IPv6:2001:db8::1]"),
        ("<u@[IPv6:::ffff:192.0.2.1]>", None),
    ],
)
def test_address_literals(path: str, domain: str | None) -> None:
    addr = rcpt(path)
    assert addr is not None and addr.is_address_literal
    if domain is not None:
        assert addr.domain == domain
    assert addr.domain_ascii == addr.domain
    assert isinstance(addr.literal_ip, ipaddress.IPv4Address | ipaddress.IPv6Address)
    assert rcpt(f"<{addr}>") == addr


def test_literal_ip_property() -> None:
    assert Address("u", "[192.0.2.1]").literal_ip == ipaddress.ip_address("192.0.2.1")
    assert Address("u", "[IPv6:::1]").literal_ip == ipaddress.ip_address("::1")
    assert Address("u", "example.com").literal_ip is None


# --- invalid paths ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "hint"),
    [
        ("<u@@x>", "more than one @"),
        ("<a@b@c>", "more than one @"),
        ("<u@>", "missing domain"),
        ("<@domain>", "missing local part"),
        ("<@a:@b>", "missing local part"),
        ("<user>", "domain is required"),
        ('<"u@x">', "domain is required"),
        ("<a..b@x>", "dot"),
        ("<.a@x>", "dot"),
        ("<a.@x>", "dot"),
        ('<a"b@x>', "quote"),
        ('<"ab@x>', "quote"),
        ("<u@x.>", "invalid domain"),
        ("<u@.x>", "invalid domain"),
        ("<u@x..y>", "invalid domain"),
        ("<u@-x.org>", "invalid domain"),
        ("<u@x-.org>", "invalid domain"),
        ("<u@ex_ample.org>", "invalid domain"),
        ("<u@ex ample.org>", ""),
        (f"<u@{'a' * 64}.org>", "invalid domain"),
        ("<u@1.2.3.4>", "not a domain name"),
        ("<u@123>", "not a domain name"),
        ("<u@[1.2.3.256]>", "invalid IP"),
        ("<u@[010.0.0.1]>", "invalid IP"),
        ("<u@[1.2.3]>", "invalid address literal"),
        ("<u@[IPv6:fe80::1%eth0]>", "invalid IP"),
        ("<u@[IPv6:2001:db8::g]>", "invalid IP"),
        ("<u@[IPv6:1.2.3.4]>", "invalid IP"),
        ("<u@[x-tag:stuff]>", "unsupported address literal"),
        ("<u@[]>", "invalid address literal"),
        ('<""@x>', "empty local part"),
        ("<u\x00@x>", "control"),
        ("<u\r\n@x>", "control"),
        ("<u@x\x7f>", "control"),
        ('<"a\tb"@x>', "control"),
        ("<u@x\udcff>", "control"),
        ("<u v@x>", ""),
        ("<u\\v@x>", ""),
        ('<"a\\é"@x>', ""),
        ("<@:u@x>", ""),
        ("<@a,:u@x>", ""),
        ("<@a@b:u@x>", ""),
        ("<u@x:25>", ""),
        ("<<u@x>>", ""),
    ],
)
def test_invalid_paths(path: str, hint: str) -> None:
    err = rcpt_error(path, utf8=True)
    assert (err.reply.code, err.reply.enhanced) == (501, "5.1.3")
    assert hint in str(err.reply.text)


def test_sender_errors_use_5_1_7() -> None:
    with pytest.raises(AddressError) as info:
        mail("<u@@x>")
    assert (info.value.reply.code, info.value.reply.enhanced) == (501, "5.1.7")
    assert "sender" in str(info.value.reply.text)


@pytest.mark.parametrize("path", ["", "<", ">", "u@x", "<u@x", "u@x>"])
def test_parse_path_needs_brackets(path: str) -> None:
    err = rcpt_error(path)
    assert (err.reply.code, err.reply.enhanced) == (501, "5.5.4")


# --- limits (RFC 5321 §4.5.3.1) -----------------------------------------------------------


def test_local_part_limit() -> None:
    assert rcpt(f"<{'a' * 64}@x.org>") == Address("a" * 64, "x.org")
    err = rcpt_error(f"<{'a' * 65}@x.org>")
    assert (err.reply.code, err.reply.enhanced) == (501, "5.1.3")
    assert "local part longer than 64" in str(err.reply.text)
    with pytest.raises(AddressError) as info:
        mail(f"<{'a' * 65}@x.org>")
    assert info.value.reply.enhanced == "5.1.7"


def test_local_part_limit_counts_quotes_and_octets() -> None:
    assert rcpt(f'<"{"a" * 62}"@x.org>') is not None  # 64 octets on the wire
    assert "local part" in str(rcpt_error(f'<"{"a" * 63}"@x.org>').reply.text)
    assert rcpt(f"<{'é' * 32}@x.org>", utf8=True) is not None  # 64 octets of UTF-8
    assert "local part" in str(rcpt_error(f"<{'é' * 33}@x.org>", utf8=True).reply.text)


def test_domain_limit() -> None:
    assert len(domain_of(256)) == 256
    err = rcpt_error(f"<u@{domain_of(256)}>")
    assert "domain longer than 255" in str(err.reply.text)
    # A 255-octet domain is within its own limit, but no path can carry it (1+1+1+255+1).
    assert "path longer than 256" in str(rcpt_error(f"<u@{domain_of(255)}>").reply.text)


def test_path_limit() -> None:
    at_limit = f"<{'a' * 64}@{domain_of(256 - 64 - 3)}>"
    assert len(at_limit) == 256
    assert rcpt(at_limit) is not None
    over = f"<{'a' * 64}@{domain_of(256 - 64 - 2)}>"
    assert len(over) == 257
    err = rcpt_error(over)
    assert (err.reply.code, err.reply.enhanced) == (501, "5.1.3")
    assert "path longer than 256" in str(err.reply.text)


def test_path_limit_includes_source_route_and_utf8_octets() -> None:
    route = "@r.org:"
    fits = f"<{route}u@{domain_of(256 - 4 - len(route))}>"
    assert len(fits) == 256 and rcpt(fits) is not None
    assert "path" in str(rcpt_error(f"<{route}u@{domain_of(257 - 4 - len(route))}>").reply.text)
    utf8_over = f"<{'é' * 32}@{domain_of(256 - 64 - 3)}>"  # 256 characters, 288 octets
    assert len(utf8_over) == 224 and "path" in str(
        rcpt_error(f"<{'é' * 32}@{domain_of(256 - 64 - 2)}>", utf8=True).reply.text
    )
    assert rcpt(utf8_over, utf8=True) is not None


# --- SMTPUTF8 and IDNA --------------------------------------------------------------------


@pytest.mark.parametrize("path", ["<ü@x.org>", "<u@bücher.example>", '<"ü"@x.org>', "<@bü:u@x>"])
def test_non_ascii_needs_smtputf8(path: str) -> None:
    err = rcpt_error(path)
    assert (err.reply.code, err.reply.enhanced) == (553, "5.6.7")


def test_utf8_addresses() -> None:
    addr = rcpt("<Jürgen@BÜCHER.example>", utf8=True)
    assert addr == Address("Jürgen", "bücher.example")
    assert addr.needs_smtputf8
    assert addr.domain_ascii == "xn--bcher-kva.example"
    assert str(addr) == "Jürgen@bücher.example"
    assert rcpt("<用户@例子.中国>", utf8=True) == Address("用户", "例子.中国")
    assert rcpt('<"ü ü"@x.org>', utf8=True) == Address("ü ü", "x.org")
    ascii_addr = rcpt("<u@xn--bcher-kva.example>")
    assert ascii_addr is not None and not ascii_addr.needs_smtputf8
    assert Address("ü", "x.org").needs_smtputf8


@pytest.mark.parametrize(
    "path",
    [
        "<u@bücher。example>",  # only "." separates labels
        "<u@bü_cher.example>",
        "<u@-bücher.example>",
        "<u@bücher..example>",
        "<u@bücher.example.>",
        "<u@xn--zz.bücher>",
        "<u@bü\u0085.example>",  # C1 control
        "<u@a\u200db.example>",  # ZWJ outside its context
        "<u@\u2603\u2603.bücher\u0301.example>",  # not NFC
    ],
)
def test_bad_internationalized_domains(path: str) -> None:
    assert rcpt_error(path, utf8=True).reply.code == 501


# --- str() and the wire form -------------------------------------------------------------


@pytest.mark.parametrize(
    ("addr", "wire"),
    [
        (Address("u", "x.org"), "u@x.org"),
        (Address("john doe", "x.org"), '"john doe"@x.org'),
        (Address('a"b\\c', "x.org"), '"a\\"b\\\\c"@x.org'),
        (Address("a..b", "x.org"), '"a..b"@x.org'),
        (Address(".a", "x.org"), '".a"@x.org'),
        (Address("u@foreign", "local"), '"u@foreign"@local'),
        (Address("postmaster", ""), "postmaster"),
    ],
)
def test_str_wire_form(addr: Address, wire: str) -> None:
    assert str(addr) == wire
    assert rcpt(f"<{wire}>", utf8=True) == addr


def test_address_is_frozen_and_hashable() -> None:
    addr = Address("u", "x.org")
    with pytest.raises(dataclasses.FrozenInstanceError):
        addr.local = "v"  # type: ignore[misc]
    assert {addr, Address("u", "x.org")} == {addr}


# --- split_path_and_params ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("arg", "path", "rest"),
    [
        ("<u@x>", "<u@x>", ""),
        (" <u@x>", "<u@x>", ""),
        ("  <u@x>  ", "<u@x>", ""),
        ("<u@x> SIZE=100 BODY=8BITMIME", "<u@x>", "SIZE=100 BODY=8BITMIME"),
        ("<u@x>\tSIZE=100", "<u@x>", "SIZE=100"),
        ("<>", "<>", ""),
        ("<> SIZE=1", "<>", "SIZE=1"),
        ('<"a>b"@x> SIZE=1', '<"a>b"@x>', "SIZE=1"),
        ('<"a\\">b"@x>', '<"a\\">b"@x>', ""),
        ('<a"b@x> X', '<a"b@x>', "X"),  # unbalanced quote: cut at `>`, parse_path says why
    ],
)
def test_split(arg: str, path: str, rest: str) -> None:
    assert split_path_and_params(arg) == (path, rest)


@pytest.mark.parametrize("arg", ["", " ", "u@x", "u@x SIZE=1", "<u@x", '<"u>@x', "<u@x>SIZE=1"])
def test_split_errors(arg: str) -> None:
    with pytest.raises(AddressError) as info:
        split_path_and_params(arg)
    assert (info.value.reply.code, info.value.reply.enhanced) == (501, "5.5.4")


def test_split_then_parse_quoted_gt() -> None:
    path, rest = split_path_and_params(' <"a>b"@x.org> SMTPUTF8')
    assert rcpt(path) == Address("a>b", "x.org")
    assert parse_params(rest) == {"SMTPUTF8": None}


# --- parse_params -------------------------------------------------------------------------


def test_params() -> None:
    assert parse_params("") == {}
    assert parse_params("   ") == {}
    assert parse_params("size=100  body=8BITMIME SMTPUTF8") == {
        "SIZE": "100",
        "BODY": "8BITMIME",
        "SMTPUTF8": None,
    }
    assert parse_params("ORCPT=rfc822;u+40x.org NOTIFY=SUCCESS,FAILURE") == {
        "ORCPT": "rfc822;u+40x.org",
        "NOTIFY": "SUCCESS,FAILURE",
    }
    assert parse_params("X-1=~!") == {"X-1": "~!"}


@pytest.mark.parametrize(
    "text",
    ["SIZE=", "=1", "-X", "X_Y=1", "X=a=b", "X=a\tb", "X=\x7f", "X=ü", "É=1", "X=\x00", "SIZE:1"],
)
def test_malformed_params(text: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_params(text)
    assert (info.value.reply.code, info.value.reply.enhanced) == (501, "5.5.4")


def test_duplicate_params() -> None:
    with pytest.raises(AddressError) as info:
        parse_params("SIZE=1 size=2")
    assert (info.value.reply.code, info.value.reply.enhanced) == (501, "5.5.4")
    assert "SIZE" in str(info.value.reply.text)


def test_utf8_param_values() -> None:
    assert parse_params("X=ü", utf8=True) == {"X": "ü"}
    with pytest.raises(AddressError):
        parse_params("X=\x85", utf8=True)


# --- xtext --------------------------------------------------------------------------------


def test_xtext() -> None:
    assert decode_xtext("rfc822;u+40x.org") == "rfc822;u@x.org"
    assert decode_xtext("a+2Bb+3Dc") == "a+b=c"
    assert decode_xtext("a+2bb") == "a+b"
    assert decode_xtext("") == ""
    assert decode_xtext("+C3+BC") == "ü"
    assert encode_xtext("a+b=c d") == "a+2Bb+3Dc+20d"


@pytest.mark.parametrize("bad", ["+", "+4", "+GG", "a=b", "a b", "ü", "\x00", "+FF"])
def test_bad_xtext(bad: str) -> None:
    with pytest.raises(ValueError):
        decode_xtext(bad)


# --- properties ---------------------------------------------------------------------------

FLAGS = st.fixed_dictionaries(
    {
        "utf8": st.booleans(),
        "null_ok": st.booleans(),
        "bare_postmaster_ok": st.booleans(),
        "sender": st.booleans(),
    }
)
# Characters that steer the parser into its interesting corners.
TOKENS = [*'<>@"\\.:,[]-+%! \taAzZ09éü\x00\x85\udcff', "IPv6:", "postmaster", "127.0.0.1", "::1"]
SMTPISH = st.lists(st.sampled_from(TOKENS), max_size=40).map("".join)
ANY_TEXT = st.text(max_size=300) | SMTPISH


def check_path(path: str, flags: dict[str, bool]) -> None:
    try:
        addr = parse_path(path, **flags)
    except AddressError as exc:
        assert 500 <= exc.reply.code < 600
        return
    if addr is None:
        assert path == "<>" and flags["null_ok"]
        return
    # Whatever parsed once parses again, identically, from its wire form.
    assert parse_path(f"<{addr}>", **flags) == addr
    if not flags["utf8"]:
        assert not addr.needs_smtputf8
    addr.domain_ascii  # noqa: B018 - must not raise for anything the parser accepted


@settings(max_examples=500)
@given(text=ANY_TEXT, flags=FLAGS)
def test_parse_path_never_crashes(text: str, flags: dict[str, bool]) -> None:
    check_path(text, flags)
    check_path(f"<{text}>", flags)


@settings(max_examples=500)
@given(text=ANY_TEXT, flags=FLAGS)
def test_split_then_parse_never_crashes(text: str, flags: dict[str, bool]) -> None:
    try:
        path, rest = split_path_and_params(text)
    except AddressError as exc:
        assert exc.reply.code == 501
        return
    assert path.startswith("<") and path.endswith(">")
    assert rest == rest.strip(" \t")
    check_path(path, flags)
    try:
        parse_params(rest, utf8=flags["utf8"])
    except AddressError as exc:
        assert exc.reply.code == 501


@settings(max_examples=300)
@given(text=ANY_TEXT, utf8=st.booleans())
def test_parse_params_never_crashes(text: str, utf8: bool) -> None:
    try:
        params = parse_params(text, utf8=utf8)
    except AddressError as exc:
        assert (exc.reply.code, exc.reply.enhanced) == (501, "5.5.4")
        return
    assert all(key == key.upper() for key in params)


@given(text=ANY_TEXT)
def test_decode_xtext_only_value_error(text: str) -> None:
    with contextlib.suppress(ValueError):
        decode_xtext(text)


@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=100))
def test_xtext_round_trip(text: str) -> None:
    encoded = encode_xtext(text)
    assert encoded.isascii()
    assert decode_xtext(encoded) == text


LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
HOSTNAME = (
    st.lists(LABEL, min_size=1, max_size=4)
    .map(".".join)
    .filter(lambda d: not d.rpartition(".")[2].isdigit())
)
LITERAL = st.ip_addresses(v=4).map(lambda ip: f"[{ip}]") | st.ip_addresses(v=6).map(
    lambda ip: f"[IPv6:{ip.compressed}]"
)
LOCAL = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E) | st.sampled_from("éü用"),
    min_size=1,
    max_size=40,
)


@settings(max_examples=300)
@given(local=LOCAL, domain=HOSTNAME | LITERAL)
def test_str_round_trips(local: str, domain: str) -> None:
    addr = Address(local, domain)
    assume(len(str(addr).encode()) <= 254)
    assume(len(str(addr).rpartition("@")[0].encode()) <= 64)
    assert rcpt(f"<{addr}>", utf8=True) == addr
    if addr.local.isascii():
        assert rcpt(f"<{addr}>", utf8=False) == addr
