"""SASL PLAIN and LOGIN exchanges, and the failure throttle. No sockets anywhere."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postier.auth import sasl
from postier.auth.sasl import Challenge, Credentials, Failure
from postier.auth.throttle import FailureThrottle, throttle_key


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def codes(step: sasl.Step) -> tuple[int, str]:
    assert isinstance(step, Failure), step
    return step.code, step.enhanced


# --- PLAIN --------------------------------------------------------------------------------


def test_plain_with_initial_response():
    step = sasl.start("PLAIN", b64("\0alice@example.org\0s3cret"))
    assert step == Credentials("", "alice@example.org", "s3cret")


def test_plain_mechanism_name_is_case_insensitive_and_authzid_may_equal_authcid():
    step = sasl.start("plain", b64("bob\0bob\0pw"))
    assert step == Credentials("bob", "bob", "pw")


def test_plain_without_initial_response_sends_empty_challenge():
    step = sasl.start("PLAIN", None)
    assert isinstance(step, Challenge) and step.b64_text == ""
    done = step.exchange.step(b64("\0u\0p"))
    assert done == Credentials("", "u", "p")
    # A finished exchange cannot be fed again.
    assert codes(step.exchange.step(b64("\0u\0p"))) == (535, "5.7.8")


def test_plain_utf8_password():
    step = sasl.start("PLAIN", b64("\0jörg@exämple.org\0pässwörd"))
    assert step == Credentials("", "jörg@exämple.org", "pässwörd")


@pytest.mark.parametrize(
    "message",
    [
        b"other\0alice\0pw",  # authzid differs from authcid
        b"alice\0pw",  # one NUL
        b"\0alice\0pw\0",  # three NULs
        b"\0\0pw",  # empty authcid
        b"\0alice\0",  # empty password
        b"\0al\rice\0pw",  # CR in username
        b"\0al\nice\0pw",  # LF in username
        b"x\ny\0x\ny\0pw",  # LF in authzid
        b"\0alice\0p\r\nw",  # CRLF in password
        b"\0alice\0\xff\xfe",  # not UTF-8
        b"",  # `=`: empty initial response
    ],
)
def test_plain_bad_messages_fail_535(message: bytes):
    ir = "=" if message == b"" else b64(message)
    assert codes(sasl.start("PLAIN", ir)) == (535, "5.7.8")


def test_failure_reason_is_for_logs_and_reply_matches_catalogue():
    step = sasl.start("PLAIN", b64("other\0alice\0pw"))
    assert isinstance(step, Failure)
    assert step.reason == "authorization identity differs"
    assert step.reply.to_bytes() == b"535 5.7.8 Authentication credentials invalid\r\n"


# --- LOGIN --------------------------------------------------------------------------------


def test_login_full_exchange():
    step = sasl.start("LOGIN", None)
    assert isinstance(step, Challenge) and step.b64_text == "VXNlcm5hbWU6"
    assert base64.b64decode(step.b64_text) == b"Username:"
    step = step.exchange.step(b64("alice@example.org"))
    assert isinstance(step, Challenge) and step.b64_text == "UGFzc3dvcmQ6"
    assert base64.b64decode(step.b64_text) == b"Password:"
    assert step.exchange.step(b64("pw")) == Credentials("", "alice@example.org", "pw")


def test_login_initial_response_is_the_username():
    step = sasl.start("LOGIN", b64("alice"))
    assert isinstance(step, Challenge) and step.b64_text == sasl.PASSWORD_CHALLENGE
    assert step.exchange.step(b64("pw")) == Credentials("", "alice", "pw")


def test_login_empty_initial_response_then_fails():
    step = sasl.start("LOGIN", "=")
    assert isinstance(step, Challenge) and step.b64_text == sasl.PASSWORD_CHALLENGE
    assert codes(step.exchange.step(b64("pw"))) == (535, "5.7.8")


@pytest.mark.parametrize("username", [b"a\r\nMAIL FROM:<x>", b"a\0b", b"a\nb", b"\xc3"])
def test_login_refuses_bad_usernames(username: bytes):
    step = sasl.start("LOGIN", b64(username))
    if isinstance(step, Challenge):
        step = step.exchange.step(b64("pw"))
    assert codes(step) == (535, "5.7.8")


# --- cancellation, base64, unknown mechanisms ---------------------------------------------


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_cancel_at_every_stage(mechanism: str):
    assert codes(sasl.start(mechanism, "*")) == (501, "5.0.0")
    step = sasl.start(mechanism, None)
    assert isinstance(step, Challenge)
    assert codes(step.exchange.step("*")) == (501, "5.0.0")
    if mechanism == "LOGIN":
        step = sasl.start(mechanism, None)
        assert isinstance(step, Challenge)
        step = step.exchange.step(b64("u"))
        assert isinstance(step, Challenge)
        assert codes(step.exchange.step("*")) == (501, "5.0.0")


@pytest.mark.parametrize("garbage", ["not base64!", "AAA", "QUJD=", "ü", "QU JD", "="])
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_bad_base64_is_501_5_5_2(mechanism: str, garbage: str):
    step = sasl.start(mechanism, None)
    assert isinstance(step, Challenge)
    # `=` is only the empty *initial* response; in a continuation it is bad base64.
    assert codes(step.exchange.step(garbage)) == (501, "5.5.2")
    if garbage != "=":
        assert codes(sasl.start(mechanism, garbage)) == (501, "5.5.2")


@pytest.mark.parametrize("mechanism", ["CRAM-MD5", "XOAUTH2", "", "PLAIN\r\n"])
def test_unknown_mechanism_504(mechanism: str):
    step = sasl.start(mechanism, None)
    assert codes(step) == (504, "5.5.4")
    assert isinstance(step, Failure) and step.reply.code == 504


def test_mechanisms_advertised():
    assert sasl.MECHANISMS == ("PLAIN", "LOGIN")


@given(
    mechanism=st.sampled_from(["PLAIN", "LOGIN", "X"]),
    initial=st.none() | st.text(max_size=40),
    lines=st.lists(st.text(max_size=40) | st.binary(max_size=30).map(b64), max_size=4),
)
def test_any_input_yields_a_step_never_an_exception(mechanism, initial, lines):
    step = sasl.start(mechanism, initial)
    for line in lines:
        if not isinstance(step, Challenge):
            break
        step = step.exchange.step(line)
    assert isinstance(step, Challenge | Credentials | Failure)
    if isinstance(step, Failure):
        assert step.code in (501, 504, 535)
    if isinstance(step, Credentials):
        for text in (step.username, step.authzid):
            assert not any(c in text for c in "\r\n\0")
        assert step.username and step.password


# --- throttle -----------------------------------------------------------------------------


def test_throttle_grows_doubles_and_caps():
    t = FailureThrottle(base=1.0, cap=30.0)
    assert t.delay_for("192.0.2.1", now=0) == 0.0
    delays = [t.record_failure("192.0.2.1", now=float(i)) for i in range(8)]
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30]
    assert t.delay_for("192.0.2.1", now=8) == 30
    assert t.delay_for("192.0.2.2", now=8) == 0


def test_throttle_decays_after_quiet_period_and_success_clears():
    t = FailureThrottle(base=1.0, cap=30.0, quiet=60.0)
    for _ in range(3):
        t.record_failure("192.0.2.1", now=100.0)
    assert t.delay_for("192.0.2.1", now=159.0) == 4
    assert t.delay_for("192.0.2.1", now=160.0) == 2
    assert t.delay_for("192.0.2.1", now=220.0) == 1
    assert t.delay_for("192.0.2.1", now=280.0) == 0
    assert len(t) == 0
    t.record_failure("192.0.2.1", now=0.0)
    t.record_success("192.0.2.1")
    assert t.delay_for("192.0.2.1", now=0.0) == 0


def test_throttle_bounded_memory_evicts_oldest():
    t = FailureThrottle(max_tracked=3)
    for i in range(5):
        t.record_failure(f"192.0.2.{i}", now=float(i))
    assert len(t) == 3
    assert t.delay_for("192.0.2.0", now=5) == 0 and t.delay_for("192.0.2.1", now=5) == 0
    assert t.delay_for("192.0.2.4", now=5) == 1
    # A fresh failure from a tracked address makes it the newest, so it survives.
    t.record_failure("192.0.2.2", now=6)
    t.record_failure("192.0.2.9", now=7)
    assert t.failures("192.0.2.2", now=7) == 2 and t.failures("192.0.2.3", now=7) == 0


def test_throttle_uses_injected_clock_and_ipv6_slash64():
    clock = [1000.0]
    t = FailureThrottle(clock=lambda: clock[0])
    t.record_failure("2001:db8:1:2::1")
    t.record_failure("2001:db8:1:2:ffff::9")
    assert t.delay_for("2001:db8:1:2::abcd") == 2
    assert t.delay_for("2001:db8:1:3::1") == 0
    clock[0] += 120
    assert t.delay_for("2001:db8:1:2::1") == 0
    assert throttle_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert throttle_key("fe80::1%eth0") == "fe80::/64"
    assert throttle_key("/run/sock") == "/run/sock"


def test_throttle_rejects_nonsense_settings():
    with pytest.raises(ValueError):
        FailureThrottle(base=10, cap=1)
    with pytest.raises(ValueError):
        FailureThrottle(max_tracked=0)


def test_throttle_huge_failure_count_stays_capped():
    t = FailureThrottle(base=1.0, cap=30.0)
    for i in range(2000):
        t.record_failure("192.0.2.1", now=float(i) / 1000)
    assert t.delay_for("192.0.2.1", now=2.0) == 30.0
