"""User text made safe where it lands: names show what they say (`clean_name`), stored text is
the same on SQLite and Postgres (`storable`), refused users are told once (`RateLimiter`)."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from surfaces_plugin.dispatch import RateLimiter
from surfaces_plugin.errors import UsageError
from surfaces_plugin.handlers import MAX_TITLE_CHARS, _title
from surfaces_plugin.names import clean_name
from surfaces_plugin.store.base import storable

BIDI = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c"
ZERO_WIDTH = "\u200b\u200c\u200d\u2060\ufeff"
CONTROLS = "".join(chr(c) for c in (*range(0x00, 0x09), 0x0B, 0x0E, 0x1B, 0x7F, 0x80, 0x9F))
HANGUL_FILLERS = "\u115f\u1160\u3164\uffa0"
HIDDEN = BIDI + ZERO_WIDTH + CONTROLS + HANGUL_FILLERS

# Any text, weighted towards what hides in names: invisible, control and space characters.
names = st.text(
    alphabet=st.one_of(
        st.characters(),
        st.sampled_from(HIDDEN + "\n\r\t\u2028\u2029\u00a0\u3000 "),
        st.characters(categories=["Cc", "Cf", "Zs", "Zl", "Zp", "Mn"]),
    ),
    max_size=60,
)


def _visible(text: str) -> str:
    """The characters a name keeps, in order, without the spaces."""
    return "".join(
        c
        for c in text
        if not c.isspace()
        and c not in HANGUL_FILLERS
        and unicodedata.category(c) not in ("Cc", "Cf", "Cs")
    )


@settings(max_examples=500)
@given(names)
def test_a_clean_name_is_one_visible_line(text: str) -> None:
    name = clean_name(text)
    assert not any(unicodedata.category(c) in ("Cc", "Cf", "Cs") for c in name)
    assert not set(name) & set(HIDDEN)
    assert name == name.strip() and "  " not in name
    assert all(c == " " or not c.isspace() for c in name)  # the only whitespace is one space
    assert name.replace(" ", "") == _visible(text)  # nothing visible is lost or reordered
    assert clean_name(name) == name


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("\u202eevil\u202c room", "evil room"),  # a right-to-left override that reverses the rest
        ("Pay\u200b\u200bments", "Payments"),
        ("\u2067Report\u2069 \u200fQ3\u200e", "Report Q3"),
        ("line one\nline two\r\n\tthree", "line one line two three"),
        ("bell\x07 and \x1b[31mred", "bell and [31mred"),  # the escape goes, its text stays
        ("  spaced\u00a0\u00a0out\u3000", "spaced out"),
        ("\ufeffBOM first", "BOM first"),
        ("\u3164", ""),  # a Hangul filler looks like a name but shows nothing
        (ZERO_WIDTH + BIDI, ""),
        ("שלום עולם", "שלום עולם"),  # right-to-left scripts stay as they are
        ("مرحبا", "مرحبا"),
        ("Cafe\u0301 🚀 日本語", "Cafe\u0301 🚀 日本語"),  # combining marks and emoji stay
    ],
)
def test_clean_name_examples(raw: str, shown: str) -> None:
    assert clean_name(raw) == shown


@settings(max_examples=300)
@given(st.one_of(names, st.text(min_size=75, max_size=90)))
def test_a_title_is_a_clean_name_within_the_limit_or_refused(raw: str) -> None:
    try:
        title = _title(raw)
    except UsageError as e:
        assert "nothing visible" in str(e) or f"the limit is {MAX_TITLE_CHARS}" in str(e)
        return
    assert title == clean_name(raw) and len(title) <= MAX_TITLE_CHARS
    assert title or not raw  # empty only when no title was given: the agent's default


@settings(max_examples=300)
@given(st.text(alphabet=st.one_of(st.characters(), st.sampled_from("\x00\ud800\udfff")), max_size=40))
def test_storable_text_encodes_and_keeps_the_rest(text: str) -> None:
    stored = storable(text)
    assert "\x00" not in stored
    stored.encode("utf-8")  # what the drivers do; a lone surrogate would raise here
    assert len(stored) == len(text)  # replaced one for one, so positions stay
    assert all(s == t or s == "\ufffd" for s, t in zip(stored, text, strict=True))
    assert storable(stored) == stored


def test_storable_examples() -> None:
    assert storable("before\x00after") == "before\ufffdafter"
    assert storable("half a pair \ud83d") == "half a pair \ufffd"
    assert storable("a whole pair 😀 and\ttabs\n") == "a whole pair 😀 and\ttabs\n"
    assert storable(None) is None


def test_a_limited_user_is_told_once_per_window() -> None:
    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    assert [limiter.allow("@a:hs", 2) for _ in range(2)] == [True, True]
    refused = [limiter.allow("@a:hs", 2) for _ in range(5)]
    told = [limiter.first_refusal("@a:hs") for _ in refused]
    assert refused == [False] * 5 and told == [True, False, False, False, False]
    assert limiter.allow("@b:hs", 2) and limiter.first_refusal("@b:hs")  # per user
    now[0] = 60.0  # the window has room again: the next refusal is told again
    assert limiter.allow("@a:hs", 2) and limiter.allow("@a:hs", 2)
    assert not limiter.allow("@a:hs", 2)
    assert limiter.first_refusal("@a:hs") and not limiter.first_refusal("@a:hs")
