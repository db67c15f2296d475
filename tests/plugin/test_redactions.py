"""Redactions are honoured: a retracted message is never sent to the agent, leaves the history
later requests carry, and stops its answer while it streams."""

from __future__ import annotations

import asyncio

from surfaces_plugin import layout
from surfaces_plugin.dispatch import REDACTED_TEXT

from .test_dispatch import ALICE, ScriptedBackend, onboarded

SECRET = "my password is hunter2"


def sent_to_agent(backend: ScriptedBackend) -> list[str]:
    """Every message text of every request the agent received."""
    return [m.content for request in backend.requests for m in request.messages]


async def stored(h, room_id: str) -> list[tuple[str, str]]:
    room = h.app.rooms.room(room_id)
    return [(m.role, m.content) for m in await h.app.stores.messages.history(room.platform_chat_id)]


async def answer_shows(h, room_id: str, text: str = "re: ") -> None:
    """Wait until the room's first answer is posted and shows `text`."""
    for _ in range(200):
        bodies = h.client.bodies(room_id)
        if bodies and text in bodies[0]:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"no answer showing {text!r} appeared in the room")


async def test_message_redacted_while_queued_never_reaches_the_agent(make_surfaces) -> None:
    h, room, backend = await onboarded(make_surfaces)
    backend.gate = asyncio.Event()  # the first answer is slow: the next message waits behind it
    await h.app.on_message(h.client.user_message(room, ALICE, "a slow question"))
    await answer_shows(h, room)
    secret = h.client.user_message(room, ALICE, SECRET)
    await h.app.on_message(secret)
    await h.app.on_redaction(h.client.redaction(room, ALICE, secret.event_id))
    await h.app.on_message(h.client.user_message(room, ALICE, "after it"))
    backend.gate.set()
    await h.settle()

    assert h.client.bodies(room) == ["re: a slow question", "re: after it"]
    assert not any("hunter2" in text for text in sent_to_agent(backend))
    assert [(m.role, m.content) for m in backend.requests[-1].messages[1:]] == [
        ("user", "a slow question"),
        ("assistant", "re: a slow question"),
        ("user", "after it"),
    ]
    assert not any("hunter2" in content for _, content in await stored(h, room))


async def test_redaction_of_a_message_held_at_start_up(make_surfaces) -> None:
    h = await make_surfaces(streaming={"enabled": False})
    dm = h.dm(ALICE)
    await h.say(dm, ALICE, "!ai start")
    [room] = h.app.rooms.all_rooms()
    await h.app.stop()
    h.client.user_message(room.room_id, ALICE, "sent while down")
    h.client.messages_delay = 0.3  # catch-up is still reading when the live messages arrive
    h2 = await make_surfaces(client=h.client, settle=False, streaming={"enabled": False})
    held = h2.client.user_message(room.room_id, ALICE, SECRET)
    await h2.app.on_message(held)
    assert room.room_id in h2.app.dispatcher._held  # not queued yet when its redaction comes
    await h2.redact(room.room_id, ALICE, held.event_id)
    await h2.say(room.room_id, ALICE, "and this one")

    assert h2.client.bodies(room.room_id) == ["echo: sent while down", "echo: and this one"]


async def test_redacted_answered_message_leaves_the_next_request(make_surfaces) -> None:
    h, room, backend = await onboarded(make_surfaces)
    secret = h.client.user_message(room, ALICE, SECRET)
    await h.app.on_message(secret)
    await h.settle()
    await h.say(room, ALICE, "second")
    assert "hunter2" in sent_to_agent(backend)[-3]  # it was in the history until redacted

    # The next message right behind the redaction, as one sync delivers them.
    await h.app.on_redaction(h.client.redaction(room, ALICE, secret.event_id))
    await h.say(room, ALICE, "third")

    # The answer to it goes too: it usually quotes the retracted text.
    assert [(m.role, m.content) for m in backend.requests[-1].messages[1:]] == [
        ("user", "second"),
        ("assistant", "re: second"),
        ("user", "third"),
    ]
    assert await stored(h, room) == [
        ("user", "second"),
        ("assistant", "re: second"),
        ("user", "third"),
        ("assistant", "re: third"),
    ]


async def test_redaction_while_streaming_cancels_the_answer(make_surfaces) -> None:
    h, room, backend = await onboarded(make_surfaces)
    backend.gate = asyncio.Event()  # the answer stays half-way until the test lets it go
    question = h.client.user_message(room, ALICE, SECRET)
    await h.app.on_message(question)
    await answer_shows(h, room, "re: my password")  # half of it streamed, the rest held

    await h.redact(room, ALICE, question.event_id)

    assert h.client.bodies(room) == [REDACTED_TEXT]  # ended visibly, none of the text left
    final = h.client.messages(room)[-1]["content"]["m.new_content"][layout.TURN_KEY]
    assert "partial" not in final  # not mistaken for an answer cut off by a crash
    assert backend.active == 0  # the agent's stream was closed
    assert await stored(h, room) == []

    backend.gate = None
    await h.say(room, ALICE, "next")
    assert h.client.bodies(room)[-1] == "re: next"
    assert [(m.role, m.content) for m in backend.requests[-1].messages[1:]] == [("user", "next")]


async def test_redaction_in_another_room_changes_nothing_here(make_surfaces) -> None:
    h, room_a, backend = await onboarded(make_surfaces)
    dm = next(r for r, fake in h.client.rooms.items() if fake.creator == ALICE)  # her DM
    await h.say(dm, ALICE, "!ai new Second")
    room_b = next(r.room_id for r in h.app.rooms.all_rooms() if r.title == "Second")
    backend.gate = asyncio.Event()
    await h.app.on_message(h.client.user_message(room_a, ALICE, "first"))
    await answer_shows(h, room_a)
    queued = h.client.user_message(room_a, ALICE, "queued")
    await h.app.on_message(queued)
    # A redaction sent in room B naming room A's message: the homeserver redacts nothing in A.
    await h.app.on_redaction(h.client.redaction(room_b, ALICE, queued.event_id))
    backend.gate.set()
    await h.settle()
    assert h.client.bodies(room_a) == ["re: first", "re: queued"]


async def test_store_deletes_a_user_turn_with_its_answers_only(stores) -> None:
    messages = stores.messages
    await messages.append("c1", "user", "one", event_id="$u1")
    await messages.append("c1", "assistant", "re: one", event_id="$a1")
    await messages.append("c1", "assistant", "re: one, again", event_id="$a1b")  # a retry
    await messages.append("c1", "user", "two", event_id="$u2")
    await messages.append("c1", "assistant", "re: two", event_id="$a2")
    await messages.append("c2", "user", "elsewhere", event_id="$u3")

    assert await messages.delete_user_turn("c2", "$u1") == 0  # another chat's id
    assert await messages.delete_user_turn("c1", "$a2") == 0  # an answer is not a user turn
    assert await messages.delete_user_turn("c1", "$u1") == 3
    assert [m.content for m in await messages.history("c1")] == ["two", "re: two"]
    assert await messages.delete_user_turn("c1", "$u2") == 2  # the last turn: to the chat's end
    assert await messages.history("c1") == []
    assert [m.content for m in await messages.history("c2")] == ["elsewhere"]
