"""Sends the homeserver would refuse for size (the fake refuses them as Synapse does)."""

from __future__ import annotations

from surfaces_plugin import layout
from surfaces_plugin.dispatch import TURN_FAILED
from surfaces_plugin.memory import MAX_NOTE_CHARS, MAX_NOTES

ALICE = "@alice:localhost"
HANGUL = ("가나다라마바사아자차카타파하" * 7 + " ") * 80  # 7,920 characters in 80 words


async def started(make_surfaces, **overrides):
    h = await make_surfaces(**overrides)
    dm = h.dm(ALICE)
    await h.say(dm, ALICE, "!ai start")
    [room] = h.app.rooms.all_rooms()
    return h, dm, room


def answer_messages(h, room_id: str) -> list[dict]:
    """The bot's answer messages (not edits), oldest first, as their latest version."""
    latest: dict[str, dict] = {}
    order: list[str] = []
    for event in h.client.messages(room_id):
        content = event["content"]
        relates = content.get("m.relates_to") or {}
        if relates.get("rel_type") == "m.replace":
            latest[relates["event_id"]] = content["m.new_content"]
        elif layout.TURN_KEY in content:
            latest[event["event_id"]] = content
            order.append(event["event_id"])
    return [latest[e] for e in order]


async def test_a_long_non_ascii_answer_arrives_whole_over_several_messages(make_surfaces) -> None:
    h, _, room = await started(make_surfaces, streaming={"edit_interval_ms": 0})
    await h.say(room.room_id, ALICE, HANGUL)
    parts = answer_messages(h, room.room_id)
    assert len(parts) > 1
    assert "".join(p["body"] for p in parts) == f"echo: {HANGUL}".strip()
    markers = [p[layout.TURN_KEY] for p in parts]
    assert all("partial" not in m for m in markers)  # every part ended, none left "streaming"
    assert markers[1]["continues"] and "continues" not in markers[0]
    # The conversation keeps it as one answer.
    history = await h.app.stores.messages.history(room.platform_chat_id)
    assert [m.role for m in history] == ["user", "assistant"]
    assert history[1].content == f"echo: {HANGUL}".strip()


async def test_a_long_answer_without_streaming_is_split_too(make_surfaces) -> None:
    h, _, room = await started(make_surfaces, streaming={"enabled": False})
    await h.say(room.room_id, ALICE, HANGUL)
    parts = answer_messages(h, room.room_id)
    assert len(parts) > 1 and "".join(p["body"] for p in parts) == f"echo: {HANGUL}".strip()


async def test_every_accepted_note_can_be_listed(make_surfaces) -> None:
    h, dm, _ = await started(make_surfaces)
    for i in range(MAX_NOTES):
        await h.say(dm, ALICE, f"!ai memory add {i} " + "😀" * (MAX_NOTE_CHARS - 3))
    before = len(h.client.bodies(dm))
    await h.say(dm, ALICE, "!ai memory")
    listing = h.client.bodies(dm)[before:]
    assert len(listing) > 1  # too long for one event: several notices
    text = "".join(listing)
    assert text.startswith(f"**Your shared notes** ({MAX_NOTES}")
    assert all(f"\n{i + 1}. {i} 😀" in text for i in range(MAX_NOTES))


async def test_a_send_that_fails_mid_answer_ends_it_visibly(make_surfaces) -> None:
    h, _, room = await started(make_surfaces, streaming={"edit_interval_ms": 0})
    # The first post goes through, then the homeserver refuses the next edit once.
    h.client.fail_next["send_message_event"] = []
    sent = len(h.client.messages(room.room_id))
    real_send = h.client.send_message_event

    async def refuse_second(room_id, event_type, content, **kw):
        if len(h.client.messages(room.room_id)) == sent + 1 and "m.new_content" in content:
            h.client.send_message_event = real_send  # only once
            from mautrix.errors import MatrixRequestError

            raise MatrixRequestError(400, "refused")
        return await real_send(room_id, event_type, content, **kw)

    h.client.send_message_event = refuse_second
    await h.say(room.room_id, ALICE, "one two three four five six")
    [answer] = answer_messages(h, room.room_id)
    assert "partial" not in answer[layout.TURN_KEY]  # not left looking like it still streams
    assert answer["body"].endswith("*(the answer stopped here)*")
    assert h.client.bodies(room.room_id)[-1] == TURN_FAILED
    await h.say(room.room_id, ALICE, "still there?")  # the room keeps working
    assert h.client.bodies(room.room_id)[-1] == "echo: still there?"
