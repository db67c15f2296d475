"""Edit to regenerate and reactions: the owner's edit of their last message (or 🔁 on its
answer) gets a new answer in place of the old one; ⏹️/❌ stop an answer while it streams."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from surfaces_plugin import layout
from surfaces_plugin.backends import Backend, Chunk, GenerationRequest
from surfaces_plugin.dispatch import EDITS_EXPLAINED, RETRY_EXPLAINED

from .conftest import until
from .test_context import forget_messages

ALICE = "@alice:localhost"
BOB = "@bob:localhost"


class NumberedBackend(Backend):
    """Answers `answer <n>: <last message>` in two chunks; `holds[n]` keeps answer n open
    after its first chunk until the event is set."""

    def __init__(self, spec) -> None:
        super().__init__(spec)
        self.requests: list[GenerationRequest] = []
        self.holds: dict[int, asyncio.Event] = {}

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        self.requests.append(request)
        n = len(self.requests)
        yield Chunk(f"answer {n}: ")
        if n in self.holds:
            await self.holds[n].wait()
        yield Chunk(request.messages[-1].content)

    def turns(self, index: int = -1) -> list[tuple[str, str]]:
        return [(m.role, m.content) for m in self.requests[index].messages if m.role != "system"]


async def onboarded(make_surfaces, **overrides):
    overrides.setdefault("streaming", {"edit_interval_ms": 0})
    h = await make_surfaces(**overrides)
    await h.say(h.dm(ALICE), ALICE, "!ai start")
    [room] = h.app.rooms.all_rooms()
    backend = NumberedBackend(h.app.settings.backends["echo"])
    h.app.backends.put(backend)
    return h, room.room_id, backend


def answers(h, room: str) -> list[dict]:
    """The bot's answer events (not their edits), oldest first."""
    return [
        e for e in h.client.messages(room)
        if layout.TURN_KEY in e["content"] and "m.relates_to" not in e["content"]
    ]


def latest_marker(h, room: str, answer_id: str) -> layout.TurnMarker | None:
    edits = [
        e["content"] for e in h.client.messages(room)
        if (e["content"].get("m.relates_to") or {}).get("event_id") == answer_id
    ]
    return layout.parse_turn_marker(edits[-1] if edits else None)


async def stored(h, room: str) -> list[tuple[str, str]]:
    pcid = h.app.rooms.room(room).platform_chat_id
    return [(m.role, m.content) for m in await h.app.stores.messages.history(pcid)]


async def posted(h, room: str, n: int) -> None:
    await until(lambda: any(f"answer {n}" in b for b in h.client.bodies(room)), f"answer {n} shown")


# edits


async def test_editing_the_last_message_replaces_its_answer_in_place(make_surfaces) -> None:
    h, room, backend = await onboarded(make_surfaces)
    await h.say(room, ALICE, "warm up")
    question = h.client.user_message(room, ALICE, "what is 2+2")
    await h.app.on_message(question)
    await h.settle()
    edit = h.client.edit(room, ALICE, question.event_id, "what is 3+3")
    await h.app.on_message(edit)
    await h.settle()

    assert h.client.bodies(room) == ["answer 1: warm up", "answer 3: what is 3+3"]
    assert len(answers(h, room)) == 2  # the answer was edited, not sent again
    assert backend.turns() == [
        ("user", "warm up"), ("assistant", "answer 1: warm up"), ("user", "what is 3+3"),
    ]
    assert await stored(h, room) == [
        ("user", "warm up"), ("assistant", "answer 1: warm up"),
        ("user", "what is 3+3"), ("assistant", "answer 3: what is 3+3"),
    ]
    marker = latest_marker(h, room, answers(h, room)[1]["event_id"])
    assert marker is not None and not marker.partial
    assert (marker.answers, marker.revision) == (question.event_id, edit.event_id)

    await h.say(room, ALICE, "and then?")  # the conversation goes on from the edited turn
    assert backend.turns()[-3:] == [
        ("user", "what is 3+3"), ("assistant", "answer 3: what is 3+3"), ("user", "and then?"),
    ]


async def test_editing_an_older_message_explains_once(make_surfaces) -> None:
    h, room, backend = await onboarded(make_surfaces)
    first = h.client.user_message(room, ALICE, "one")
    await h.app.on_message(first)
    await h.settle()
    await h.say(room, ALICE, "two")
    await h.edit(room, ALICE, first.event_id, "uno")
    await h.edit(room, ALICE, first.event_id, "eins")
    await h.say(room, ALICE, "three")

    assert h.client.bodies(room) == [
        "answer 1: one", "answer 2: two", EDITS_EXPLAINED, "answer 3: three",
    ]
    assert ("user", "one") in backend.turns() and len(backend.requests) == 3


async def test_an_edit_while_its_answer_streams_replaces_that_answer(make_surfaces) -> None:
    h, room, backend = await onboarded(make_surfaces)
    backend.holds[1] = asyncio.Event()  # never set: only the edit ends the first answer
    question = h.client.user_message(room, ALICE, "first text")
    await h.app.on_message(question)
    await posted(h, room, 1)
    await h.edit(room, ALICE, question.event_id, "second text")

    assert h.client.bodies(room) == ["answer 2: second text"]
    assert len(answers(h, room)) == 1
    assert backend.turns() == [("user", "second text")]
    assert await stored(h, room) == [("user", "second text"), ("assistant", "answer 2: second text")]


async def test_an_edit_of_a_message_still_waiting_is_answered_once_with_the_new_text(
    make_surfaces,
) -> None:
    h, room, backend = await onboarded(make_surfaces)
    backend.holds[1] = release = asyncio.Event()
    await h.app.on_message(h.client.user_message(room, ALICE, "slow"))
    await posted(h, room, 1)
    waiting = h.client.user_message(room, ALICE, "draft")
    await h.app.on_message(waiting)
    await h.app.on_message(h.client.edit(room, ALICE, waiting.event_id, "final"))
    release.set()
    await h.settle()

    assert h.client.bodies(room) == ["answer 1: slow", "answer 2: final"]
    assert len(backend.requests) == 2


async def test_edits_of_commands_and_into_commands_and_by_others_do_nothing(make_surfaces) -> None:
    h, room, backend = await onboarded(make_surfaces)
    question = h.client.user_message(room, ALICE, "hello")
    await h.app.on_message(question)
    await h.settle()
    command = h.client.user_message(room, ALICE, "!ai agents")
    await h.app.on_message(command)
    await h.settle()
    shown = h.client.bodies(room)
    await h.edit(room, ALICE, command.event_id, "!ai help")
    await h.edit(room, ALICE, question.event_id, "!ai reset")
    await h.edit(room, BOB, question.event_id, "bob's words")  # a forged edit of Alice's message
    await h.say(room, ALICE, "next")

    assert h.client.bodies(room) == [*shown, "answer 2: next"]
    assert backend.turns()[0] == ("user", "hello")


# reactions


async def test_retry_reaction_regenerates_the_last_answer_in_place(make_surfaces) -> None:
    h, room, backend = await onboarded(make_surfaces)
    await h.say(room, ALICE, "tell me a joke")
    [answer] = answers(h, room)
    reaction = h.client.reaction(room, ALICE, answer["event_id"], "🔁")
    await h.app.on_reaction(reaction)
    await h.settle()

    assert h.client.bodies(room) == ["answer 2: tell me a joke"]
    assert len(answers(h, room)) == 1
    assert backend.turns() == [("user", "tell me a joke")]  # not the answer it replaces
    assert latest_marker(h, room, answer["event_id"]).revision == reaction.event_id
    assert await stored(h, room) == [("user", "tell me a joke"), ("assistant", "answer 2: tell me a joke")]


async def test_retry_reaction_on_a_streaming_answer_starts_it_again(make_surfaces) -> None:
    h, room, backend = await onboarded(make_surfaces)
    backend.holds[1] = asyncio.Event()
    await h.app.on_message(h.client.user_message(room, ALICE, "hi"))
    await posted(h, room, 1)
    [answer] = answers(h, room)
    await h.react(room, ALICE, answer["event_id"], "🔁")

    assert h.client.bodies(room) == ["answer 2: hi"]
    assert len(answers(h, room)) == 1


async def test_retry_reaction_on_an_older_answer_explains_once(make_surfaces) -> None:
    h, room, backend = await onboarded(make_surfaces)
    await h.say(room, ALICE, "a")
    await h.say(room, ALICE, "b")
    older = answers(h, room)[0]["event_id"]
    await h.react(room, ALICE, older, "🔁")
    await h.react(room, ALICE, older, "🔁")
    await h.say(room, ALICE, "c")

    assert h.client.bodies(room) == ["answer 1: a", "answer 2: b", RETRY_EXPLAINED, "answer 3: c"]


@pytest.mark.parametrize("key", ["⏹️", "⏹", "❌"])
async def test_stop_reaction_cancels_a_streaming_answer(make_surfaces, key) -> None:
    h, room, backend = await onboarded(make_surfaces)
    backend.holds[1] = asyncio.Event()  # never set: only the reaction ends it
    await h.app.on_message(h.client.user_message(room, ALICE, "long story"))
    await posted(h, room, 1)
    [answer] = answers(h, room)
    await h.react(room, ALICE, answer["event_id"], key)

    [shown] = h.client.bodies(room)
    assert shown.startswith("answer 1") and shown.endswith("*(cancelled)*")
    await h.say(room, ALICE, "next")
    assert h.client.bodies(room)[-1] == "answer 2: next"


async def test_other_users_reactions_are_ignored(make_surfaces) -> None:
    h, room, backend = await onboarded(make_surfaces)
    backend.holds[1] = release = asyncio.Event()
    await h.app.on_message(h.client.user_message(room, ALICE, "mine"))
    await posted(h, room, 1)
    [answer] = answers(h, room)
    for key in ("⏹️", "❌", "🔁"):
        await h.app.on_reaction(h.client.reaction(room, BOB, answer["event_id"], key))
    release.set()
    await h.settle()
    await h.say(room, ALICE, "next")

    assert h.client.bodies(room) == ["answer 1: mine", "answer 2: next"]
    assert len(backend.requests) == 2


# restarts: catch-up and the rebuild after a database loss


async def test_an_edit_sent_while_the_bot_was_down_is_answered_once(make_surfaces) -> None:
    h = await make_surfaces(streaming={"enabled": False})
    await h.say(h.dm(ALICE), ALICE, "!ai start")
    [room] = h.app.rooms.all_rooms()
    question = h.client.user_message(room.room_id, ALICE, "first words")
    await h.app.on_message(question)
    await h.settle()
    await h.app.stop()
    h.client.edit(room.room_id, ALICE, question.event_id, "second words")
    h.client.edit(room.room_id, ALICE, question.event_id, "last words")
    await asyncio.sleep(0.002)  # catch-up orders by time: the next message in a later ms
    sent_too = h.client.user_message(room.room_id, ALICE, "draft while down")
    h.client.edit(room.room_id, ALICE, sent_too.event_id, "sent while down")
    await asyncio.sleep(0.002)  # the bot starts in a later ms than anything sent while down

    h2 = await make_surfaces(client=h.client, streaming={"enabled": False})
    assert h2.client.bodies(room.room_id) == ["echo: last words", "echo: sent while down"]
    assert len(answers(h2, room.room_id)) == 2
    await h2.app.stop()
    events = len(h2.client.messages(room.room_id))
    h3 = await make_surfaces(client=h.client, streaming={"enabled": False})
    await h3.say(room.room_id, ALICE, "still there?")
    assert h3.client.bodies(room.room_id)[-1] == "echo: still there?"
    assert len(h3.client.messages(room.room_id)) == events + 1  # nothing answered twice


async def test_a_rebuilt_history_has_the_edited_text(make_surfaces) -> None:
    h, room, backend = await onboarded(make_surfaces)
    question = h.client.user_message(room, ALICE, "original question")
    await h.app.on_message(question)
    await h.settle()
    await h.edit(room, ALICE, question.event_id, "edited question")
    await forget_messages(h, h.app.rooms.room(room).platform_chat_id)
    await h.app.stop()

    h2 = await make_surfaces(client=h.client, streaming={"edit_interval_ms": 0})
    backend2 = NumberedBackend(h2.app.settings.backends["echo"])
    h2.app.backends.put(backend2)
    await h2.say(room, ALICE, "next")
    assert backend2.turns() == [
        ("user", "edited question"), ("assistant", "answer 2: edited question"), ("user", "next"),
    ]


async def test_edits_and_retries_count_against_the_rate_limit(make_surfaces) -> None:
    h, room, backend = await onboarded(make_surfaces, limits={"per_user_requests_per_minute": 2})
    question = h.client.user_message(room, ALICE, "one")
    await h.app.on_message(question)
    await h.settle()
    await h.edit(room, ALICE, question.event_id, "uno")
    [answer] = answers(h, room)
    await h.react(room, ALICE, answer["event_id"], "🔁")

    assert h.client.bodies(room)[0] == "answer 2: uno"
    assert "faster than the limit (2 a minute)" in h.client.bodies(room)[1]
    assert len(backend.requests) == 2
