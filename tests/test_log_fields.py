"""The text form of an event's fields: plain values as they are, the rest quoted and escaped.

`postier.log.render` is the hot-path version (seven events a message); these tests hold it
to the rule each value follows (`_quote` below), and check that a hostile value can neither
split a line nor forge a field (a client's HELO name, address or reply text lands here).
"""

from __future__ import annotations

import enum

import pytest

from postier.log import _escape, _plain, fields, parse_fields, render


def _quote(value: object) -> str:
    """The rule: a value's text as it is when plain, else escaped and quoted."""
    text = value if type(value) is str else str(value)
    return text if _plain(text) else _escape(text)


class _Code(enum.IntEnum):
    OK = 250


class _Reply:
    def __str__(self) -> str:
        return "250 2.0.0 OK: queued as 1K1MQF2WWGH00JQ4"


VALUES: list[object] = [
    0,
    -1,
    2194,
    True,
    False,
    1.5,
    _Code.OK,
    "",
    "plain",
    "<a@remote.example>",
    "127.0.0.1:53220",
    "with space",
    'a"quote',
    "k=v",
    "back\\slash",
    "line\nbreak",
    "carriage\rreturn",
    "x event=forged session=1",
    "ünïcode",
    _Reply(),
]


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_each_value_is_rendered_as_quote_renders_it(value: object) -> None:
    assert render({"k": value}) == f"k={_quote(value)}"


def test_none_is_left_out_and_order_is_kept() -> None:
    kv = {"qid": "Q1", "size": None, "to": "<b@example.org>", "nrcpt": 2}
    assert render(kv) == "qid=Q1 to=<b@example.org> nrcpt=2"
    assert fields(**kv) == render(kv)


def test_a_hostile_value_stays_one_field_on_one_line() -> None:
    kv = {"helo": 'evil\r\nINFO postier event=forged x="y', "session": "S1"}
    text = render(kv)
    assert "\n" not in text and "\r" not in text
    assert parse_fields(text) == {"helo": 'evil\r\nINFO postier event=forged x="y', "session": "S1"}
