"""Hostile input never raises: command lines, timeline events and raw room state of any shape.

The layout parsers have their own fuzz tests (test_layout_fuzz.py); these cover what reads
user text and homeserver JSON around them: command splitting and argument parsing, catch-up
and history read back from /messages, and the reconciliation inventory.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from surfaces_plugin import handlers, layout, replies
from surfaces_plugin.commands import split_command
from surfaces_plugin.config import parse_settings
from surfaces_plugin.reconcile.inventory import room_snapshot, state_entry
from surfaces_plugin.timeline import (
    ends_conversation,
    history_from_timeline,
    is_bot_answer,
    is_owner_text,
    scan_timeline,
)

BOT = "@bot:hs"
ALICE = "@alice:hs"
SETTINGS = parse_settings(
    YAML(typ="safe").load((Path(__file__).parents[2] / "base-config.yaml").read_text())
)

odd_text = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(categories=["Cc", "Cf", "Zs", "Zl", "Zp"]), max_size=20),
    st.text(alphabet=st.characters(min_codepoint=0x10000, max_codepoint=0x10FFFF), max_size=8),
    st.sampled_from(["", " ", "\x00", "\n\n", "!ai", "!AI", "!ai ", "!ai\u00a0new", "!ai\tnew\tx"]),
    st.just("!ai new " + "x" * 100_000),  # far beyond any title or prompt limit
)
# JSON values: small texts keep generation fast; the huge ones are in `odd_text` above.
small_text = st.one_of(st.text(max_size=8), st.sampled_from(["", "\x00", "m.replace", "$a"]))
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), small_text
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(small_text, inner, max_size=3)
    ),
    max_leaves=6,
)
EVENT_KEYS = ["type", "event_id", "sender", "origin_server_ts", "content", "state_key"]
CONTENT_KEYS = [
    "msgtype",
    "body",
    "m.relates_to",
    "m.new_content",
    "rel_type",
    "event_id",
    layout.TURN_KEY,
    layout.RESET_KEY,
    layout.SUMMARY_KEY,
]
content_like = st.one_of(
    json_values,
    st.dictionaries(st.sampled_from(CONTENT_KEYS), json_values, max_size=6),
)
event_like = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {},
        optional={
            "type": st.one_of(st.sampled_from(["m.room.message", "m.room.create"]), json_values),
            "event_id": st.one_of(st.sampled_from(["$a", "$b", "$c"]), json_values),
            "sender": st.one_of(st.sampled_from([BOT, ALICE]), json_values),
            "origin_server_ts": st.one_of(st.integers(), json_values),
            "content": content_like,
            "state_key": json_values,
        },
    ),
)
# Valid events mixed in make the malformed ones land next to real answers and edits.
VALID = [
    {"type": "m.room.message", "event_id": "$a", "sender": ALICE, "origin_server_ts": 5,
     "content": {"msgtype": "m.text", "body": "hi"}},
    {"type": "m.room.message", "event_id": "$b", "sender": BOT, "origin_server_ts": 6,
     "content": replies.rendered("echo", "m.text",
                                 layout.turn_marker("c1", "echo", answers="$a", partial=True))},
    {"type": "m.room.message", "event_id": "$c", "sender": BOT, "origin_server_ts": 7,
     "content": replies.edit("$b", replies.rendered("echo: hi", "m.text",
                                                    layout.turn_marker("c1", "echo")))},
]
timelines = st.lists(st.one_of(event_like, st.sampled_from(VALID)), max_size=12)


@settings(max_examples=300)
@given(odd_text, st.sampled_from(["ai", "AI", "bot", "x"]))
def test_split_command_never_raises(body: str, prefix: str) -> None:
    parsed = split_command(body, prefix)
    if parsed is not None:
        sub, args = parsed
        assert isinstance(sub, str) and isinstance(args, str)
        assert sub == sub.lower() and not any(c.isspace() for c in sub)
        assert args == args.strip()


def test_split_command_examples() -> None:
    assert split_command("!ai new writer Draft", "ai") == ("new", "writer Draft")
    assert split_command("!AI HELP", "ai") == ("help", "")
    assert split_command("!ai", "ai") == ("", "")
    assert split_command("!ai\tsystem\nline one\nline two", "ai") == (
        "system",
        "line one\nline two",
    )
    assert split_command("!aix help", "ai") is None
    assert split_command("", "ai") is None
    assert split_command("\x00!ai help", "ai") is None


@settings(max_examples=300)
@given(odd_text)
def test_new_room_arguments_never_raise(args: str) -> None:
    request: Any = SimpleNamespace(settings=SETTINGS)
    agent, title = handlers._split_agent_and_title(request, args)
    assert SETTINGS.agent(agent) is not None  # unknown words go into the title
    assert isinstance(title, str)


@settings(max_examples=200)
@given(odd_text)
def test_quoting_a_system_prompt_never_raises(text: str) -> None:
    quoted = handlers._quoted(text)
    assert all(line.startswith(">") for line in quoted.splitlines())


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(timelines, st.integers(min_value=-1, max_value=10))
def test_catch_up_scan_never_raises(events: list[Any], after_ts: int) -> None:
    scan = scan_timeline(events, ALICE, BOT, after_ts, lambda body: body.startswith("!ai"))
    for event in scan.missed:
        assert is_owner_text(event, ALICE)
        assert isinstance(event.get("event_id"), str)
    scan_timeline(events, ALICE, BOT, after_ts)  # without a command filter too


def test_catch_up_scan_sees_a_cut_off_answer_and_what_came_after() -> None:
    answer = VALID[1]
    later = {"type": "m.room.message", "event_id": "$d", "sender": ALICE,
             "origin_server_ts": 8, "content": {"msgtype": "m.text", "body": "more"}}
    # Newest first; the answer's only version is still partial.
    scan = scan_timeline([later, answer, VALID[0]], ALICE, BOT, 0)
    assert scan.interrupted is not None and scan.interrupted.event_id == "$b"
    assert [e["event_id"] for e in scan.missed] == ["$d"]
    # With its final edit, it is finished.
    scan = scan_timeline([later, VALID[2], answer, VALID[0]], ALICE, BOT, 0)
    assert scan.interrupted is None
    assert [e["event_id"] for e in scan.missed] == ["$d"]


def test_catch_up_finds_a_message_queued_behind_the_last_answer() -> None:
    queued = {"type": "m.room.message", "event_id": "$q", "sender": ALICE,
              "origin_server_ts": 5, "content": {"msgtype": "m.text", "body": "queued"}}
    # Timeline: $a, $q (sent while $a was being answered), then $a's answer $b.
    scan = scan_timeline([VALID[2], VALID[1], queued, VALID[0]], ALICE, BOT, 0)
    assert [e["event_id"] for e in scan.missed] == ["$q"]


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(timelines)
def test_history_from_timeline_never_raises(events: list[Any]) -> None:
    history = history_from_timeline(
        events,
        owner=ALICE,
        bot_id=BOT,
        platform_chat_id="c1",
        is_command=lambda body: body.startswith("!ai"),
    )
    for turn in history.turns:
        assert turn.role in ("user", "assistant") and isinstance(turn.content, str)
    for event in events:
        is_bot_answer(event, BOT)
        is_owner_text(event, ALICE)
        ends_conversation(event, BOT, "c1")


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(event_like, st.just({"type": "m.room.create", "state_key": "",
                                                 "sender": BOT, "content": None})), max_size=8))
def test_inventory_reads_any_raw_state(raw_state: list[Any]) -> None:
    snapshot = room_snapshot("!r:hs", raw_state)
    for (etype, key), event in snapshot.state.items():
        assert isinstance(etype, str) and isinstance(key, str)
        assert isinstance(event.content, dict)
    snapshot.room_version  # noqa: B018 - reading it must not raise
    snapshot.power_levels  # noqa: B018
    for raw in raw_state:
        if isinstance(raw, dict):
            state_entry(raw)
