"""Parsers never raise: any JSON-ish input gives a valid object or None."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from surfaces_plugin import layout

KEYS = [
    "v",
    "owner",
    "space_id",
    "agent",
    "title",
    "platform_chat_id",
    "system_prompt",
    "archived",
    "voice",
    "of",
    "body",
    "via",
    "order",
    "suggested",
    "canonical",
    "notes",
    "users",
    "state",
    "by",
    "ts",
    "type",
    "predecessor",
    "room_id",
    "room_version",
    "replacement_room",
    "m.new_content",
    layout.KIND_KEY,
    layout.OWNER_KEY,
    layout.VERSION_KEY,
    layout.TURN_KEY,
    layout.RESET_KEY,
    layout.TRANSCRIPT_KEY,
]

odd_text = st.one_of(
    st.text(max_size=30),
    st.sampled_from(
        ["", "@alice:hs", "!room:hs", "!r", "space", "working", "m.space", "\x00", "@", "!"]
    ),
    st.text(alphabet=st.characters(min_codepoint=0x10000, max_codepoint=0x10FFFF), max_size=5),
    st.just("x" * 70_000),  # larger than any Matrix event may be
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    odd_text,
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), odd_text), inner, max_size=6),
    ),
    max_leaves=20,
)
# Objects built from our keys: reach deeper into the parsers than random dicts would.
keyed = st.dictionaries(st.sampled_from(KEYS), json_values, max_size=10)
anything = st.one_of(json_values, keyed)

PARSERS = {
    layout.parse_create_markers: layout.RoomMarkers,
    layout.parse_binding: layout.Binding,
    layout.parse_space_child: layout.SpaceChild,
    layout.parse_memory: layout.Memory,
    layout.parse_access: layout.AccessDecisions,
    layout.parse_turn_marker: layout.TurnMarker,
    layout.parse_reset_marker: layout.ResetMarker,
    layout.parse_transcript: layout.Transcript,
    layout.parse_tombstone: str,
    layout.create_predecessor: str,
}


def _mutations(valid: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A valid content with some keys replaced by arbitrary values or removed."""
    return st.builds(
        lambda changes, drop: {k: v for k, v in {**valid, **changes}.items() if k not in drop},
        st.dictionaries(st.sampled_from(sorted(valid)), json_values, max_size=3),
        st.sets(st.sampled_from(sorted(valid)), max_size=2),
    )


def _check(content: object) -> None:
    for parse, kind in PARSERS.items():
        result = parse(content)
        assert result is None or isinstance(result, kind), (parse, result)
    layout.create_room_version(content)
    layout.has_our_markers(content)
    layout.additional_creators(content)


@settings(max_examples=150)
@given(anything)
def test_parsers_never_raise_on_arbitrary_json(content: object) -> None:
    _check(content)


VALID = [
    layout.Binding("@a:hs", "!s", "echo", "T", "c1", "p", True).to_content(),
    layout.Binding("@a:hs", "!s", "echo", "T", "c1", voice=False).to_content(),
    {"body": layout.transcript_notice_text("hi\nthere"), **layout.transcript_marker("$a")},
    layout.space_creation_content("@a:hs"),
    layout.working_creation_content("@a:hs"),
    layout.space_child_content("hs", "0001"),
    layout.space_parent_content("hs"),
    layout.Memory(("n",)).to_content(),
    {"users": {"@a:hs": {"state": "approved", "by": "@b:hs", "ts": 1}}},
    layout.turn_marker("c1", "echo"),
    {"m.new_content": layout.turn_marker("c1", "echo")},
    layout.reset_marker("c1"),
    layout.tombstone_content("!new", "body"),
]


@settings(max_examples=200)
@given(st.sampled_from(VALID).flatmap(_mutations))
def test_parsers_never_raise_on_near_valid_content(content: dict[str, Any]) -> None:
    _check(content)


@settings(max_examples=200)
@given(st.sampled_from(VALID).flatmap(_mutations))
def test_whatever_parses_round_trips(content: dict[str, Any]) -> None:
    """Anything accepted is re-emitted as content that parses to the same value."""
    for parse in (layout.parse_binding, layout.parse_memory, layout.parse_access):
        value = parse(content)
        if value is not None:
            assert parse(value.to_content()) == value
    child = layout.parse_space_child(content)
    if child is not None:
        rebuilt = layout.space_child_content(child.via[0], child.order)
        assert layout.parse_space_child(rebuilt) is not None
        assert child.order is None or layout.is_valid_order(child.order)


@given(st.integers(min_value=-(2**64), max_value=2**64))
def test_order_key_is_always_a_valid_order(n: int) -> None:
    assert layout.is_valid_order(layout.order_key(n))
