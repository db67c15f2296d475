"""Every send is sized: texts split to fit the homeserver's event limit, at natural breaks."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from surfaces_plugin import layout, replies
from surfaces_plugin.timeline import history_from_timeline

MARKER = layout.turn_marker("chat-1", "echo", answers="$q")


def test_a_long_hangul_answer_splits_into_parts_that_each_fit_once_edited() -> None:
    text = "가나다라마바사 " * 1200  # 9,600 characters, about 27 KB: one edit would carry 100 KB+
    parts = replies.split_to_fit(text, lambda t: replies.answer_fits(t, MARKER))
    assert len(parts) > 1 and "".join(parts) == text
    for part in parts:
        edit = replies.edit("$answer", replies.rendered(part, "m.text", MARKER))
        assert replies.content_bytes(edit) <= replies.MAX_CONTENT_BYTES
    assert all(part.endswith(" ") for part in parts[:-1])  # cut between words


def test_a_notice_that_fits_is_one_part_and_a_huge_one_is_cut_at_lines() -> None:
    assert replies.split_to_fit("short", replies.notice_fits) == ["short"]
    notes = "\n".join(f"{i}. " + "😀" * 500 for i in range(1, 21))  # 20 notes of 500 emoji
    parts = replies.split_to_fit(notes, replies.notice_fits)
    assert len(parts) > 1 and "".join(parts) == notes
    assert all(replies.fits(replies.notice(p)) for p in parts)
    assert all(p.endswith("\n") for p in parts[:-1])  # a note is never cut in the middle


@settings(max_examples=60, deadline=None)
@given(st.text(min_size=0, max_size=400), st.integers(min_value=1, max_value=120))
def test_parts_join_back_to_the_text_and_each_fits(text: str, limit: int) -> None:
    parts = replies.split_to_fit(text, lambda t: len(t.encode()) <= max(limit, 4))
    assert "".join(parts) == text
    assert all(len(p.encode()) <= max(limit, 4) or len(p) == 1 for p in parts)


def test_a_split_answer_is_rebuilt_as_one_turn_but_a_retry_is_not() -> None:
    def event(event_id: str, sender: str, body: str, marker: dict | None = None) -> dict:
        content = {"msgtype": "m.text", "body": body, **(marker or {})}
        return {"type": "m.room.message", "event_id": event_id, "sender": sender,
                "content": content, "origin_server_ts": 1}

    bot, owner = "@bot:x", "@alice:x"
    timeline = [
        event("$q", owner, "question"),
        event("$a1", bot, "first half, ", layout.turn_marker("c", "echo", answers="$q")),
        event("$a2", bot, "second half", layout.turn_marker("c", "echo", answers="$q", continues="$a1")),
        event("$r", bot, "a retried answer", layout.turn_marker("c", "echo", answers="$q")),
    ]
    history = history_from_timeline(
        list(reversed(timeline)), owner=owner, bot_id=bot, platform_chat_id="c",
        is_command=lambda body: False,
    )
    assert [(t.role, t.content, t.event_id) for t in history.turns] == [
        ("user", "question", "$q"),
        ("assistant", "first half, second half", "$a1"),
        ("assistant", "a retried answer", "$r"),
    ]
