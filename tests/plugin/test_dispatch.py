"""Messages in working rooms: answers, order, streaming, cancel, retry, limits and failures."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from surfaces_plugin import layout
from surfaces_plugin.backends import Backend, BackendError, Chunk, ErrorKind, GenerationRequest

ALICE = "@alice:localhost"
BOB = "@bob:localhost"


class ScriptedBackend(Backend):
    """Answers `re: <text>` in three chunks; can be held open, or fail once."""

    def __init__(self, spec) -> None:
        super().__init__(spec)
        self.gate: asyncio.Event | None = None
        self.fail_with: BackendError | None = None
        self.requests: list[GenerationRequest] = []
        self.active = 0
        self.max_active = 0

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        self.requests.append(request)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.fail_with is not None:
                error, self.fail_with = self.fail_with, None
                raise error
            text = request.messages[-1].content
            yield Chunk("re: ")
            await asyncio.sleep(0.01)
            yield Chunk(text[: len(text) // 2])
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(0.01)
            yield Chunk(text[len(text) // 2 :])
        finally:
            self.active -= 1


async def onboarded(make_surfaces, **overrides):
    overrides.setdefault("streaming", {"edit_interval_ms": 0})
    h = await make_surfaces(**overrides)
    dm = h.dm(ALICE)
    await h.say(dm, ALICE, "!ai start")
    [room] = h.app.rooms.all_rooms()
    backend = ScriptedBackend(h.app.settings.backends["echo"])
    h.app.backends.put(backend)
    return h, room.room_id, backend


async def test_echo_answer_is_streamed_with_turn_marker(make_surfaces) -> None:
    h = await make_surfaces(streaming={"edit_interval_ms": 0})
    dm = h.dm(ALICE)
    await h.say(dm, ALICE, "!ai start")
    [room] = h.app.rooms.all_rooms()
    await h.say(room.room_id, ALICE, "hello there my agent")
    assert h.client.bodies(room.room_id) == ["echo: hello there my agent"]
    first_user = h.client.room_events(room.room_id)[0]["event_id"]
    events = h.client.messages(room.room_id)
    assert len(events) > 1  # first chunk posted, then edited
    first = events[0]["content"]
    assert first[layout.TURN_KEY] == {
        "platform_chat_id": room.platform_chat_id,
        "agent": "echo",
        "answers": first_user,
        "partial": True,  # streaming; the final edit drops it
    }
    final = events[-1]["content"]["m.new_content"][layout.TURN_KEY]
    assert "partial" not in final and final["answers"] == first_user


async def test_streaming_off_sends_one_message(make_surfaces) -> None:
    h = await make_surfaces(streaming={"enabled": False})
    dm = h.dm(ALICE)
    await h.say(dm, ALICE, "!ai start")
    [room] = h.app.rooms.all_rooms()
    await h.say(room.room_id, ALICE, "one two three")
    assert len(h.client.messages(room.room_id)) == 1
    assert h.client.bodies(room.room_id) == ["echo: one two three"]


async def test_order_per_room_and_rooms_concurrent(make_surfaces) -> None:
    h, room_a, backend = await onboarded(make_surfaces)
    dm = next(r for r, fake in h.client.rooms.items() if fake.creator == ALICE)  # her DM
    await h.say(dm, ALICE, "!ai new Second")
    room_b = next(r.room_id for r in h.app.rooms.all_rooms() if r.title == "Second")
    for i in range(5):
        await h.app.on_message(h.client.user_message(room_a, ALICE, f"a{i}"))
        await h.app.on_message(h.client.user_message(room_b, ALICE, f"b{i}"))
    await h.settle()
    assert h.client.bodies(room_a) == [f"re: a{i}" for i in range(5)]
    assert h.client.bodies(room_b) == [f"re: b{i}" for i in range(5)]
    assert backend.max_active == 2  # one generation per room, both rooms at once


async def test_history_is_sent_to_the_backend(make_surfaces) -> None:
    h, room, backend = await onboarded(make_surfaces)
    await h.say(room, ALICE, "first")
    await h.say(room, ALICE, "second")
    roles = [(m.role, m.content) for m in backend.requests[-1].messages]
    assert roles == [
        ("system", "You are a helpful assistant."),
        ("user", "first"),
        ("assistant", "re: first"),
        ("user", "second"),
    ]


async def test_cancel_marks_the_partial_answer(make_surfaces) -> None:
    h, room, backend = await onboarded(make_surfaces)
    backend.gate = asyncio.Event()
    await h.app.on_message(h.client.user_message(room, ALICE, "a long question"))
    for _ in range(100):
        if h.client.messages(room):
            break
        await asyncio.sleep(0.01)
    await h.say(room, ALICE, "!ai cancel")
    assert h.client.bodies(room)[0].endswith("*(cancelled)*")
    backend.gate = None
    await h.say(room, ALICE, "next")
    assert h.client.bodies(room)[-1] == "re: next"


async def test_cancel_with_nothing_running(make_surfaces) -> None:
    h, room, _ = await onboarded(make_surfaces)
    await h.say(room, ALICE, "!ai cancel")
    assert h.last_reply(room) == "Nothing is being generated in this room."


async def test_retry_answers_the_last_message_again(make_surfaces) -> None:
    h, room, backend = await onboarded(make_surfaces)
    await h.say(room, ALICE, "!ai retry")
    assert "no message in this conversation" in h.last_reply(room)
    await h.say(room, ALICE, "question")
    await h.say(room, ALICE, "!ai retry")
    assert h.client.bodies(room)[1:] == ["re: question", "re: question"]
    history = await h.app.stores.messages.history(h.app.rooms.room(room).platform_chat_id)
    assert [m.role for m in history] == ["user", "assistant", "assistant"]


async def test_rate_limit_and_length_limit_notices(make_surfaces) -> None:
    h, room, _ = await onboarded(
        make_surfaces, limits={"per_user_requests_per_minute": 2, "max_message_chars": 20}
    )
    await h.say(room, ALICE, "x" * 21)
    assert h.last_reply(room) == "That message has 21 characters; the limit is 20. Send a shorter one."
    await h.say(room, ALICE, "one")
    await h.say(room, ALICE, "two")
    await h.say(room, ALICE, "three")
    assert "faster than the limit (2 a minute)" in h.last_reply(room)
    assert h.client.bodies(room)[:3][1:] == ["re: one", "re: two"]


async def test_backend_failure_is_one_clear_notice_and_room_keeps_working(make_surfaces) -> None:
    h, room, backend = await onboarded(make_surfaces)
    backend.fail_with = BackendError(ErrorKind.TIMEOUT, "read timeout", timeout_s=60)
    await h.say(room, ALICE, "hello")
    notice = h.client.messages(room)[-1]["content"]
    assert notice["msgtype"] == "m.notice"
    assert notice["body"] == "The agent `echo` did not answer within 60 s. Send `!ai retry` to try again."
    await h.say(room, ALICE, "again")
    assert h.client.bodies(room)[-1] == "re: again"


async def test_non_owner_is_told_once_and_ignored(make_surfaces) -> None:
    h, room, backend = await onboarded(make_surfaces)
    await h.say(room, BOB, "hi")
    await h.say(room, BOB, "hi again")
    assert len(h.client.bodies(room)) == 1 and "only they can talk" in h.last_reply(room)
    assert backend.requests == []


async def test_edits_and_notices_are_not_new_turns(make_surfaces) -> None:
    from mautrix.types import MessageEvent

    h, room, backend = await onboarded(make_surfaces)
    raw = {
        "type": "m.room.message", "event_id": "$edit", "sender": ALICE, "room_id": room,
        "origin_server_ts": 1,
        "content": {"msgtype": "m.text", "body": "* fixed", "m.new_content": {"msgtype": "m.text", "body": "fixed"},
                    "m.relates_to": {"rel_type": "m.replace", "event_id": "$orig"}},
    }
    await h.app.on_message(MessageEvent.deserialize(raw))
    await h.say(room, ALICE, "hello")
    await h.app.on_message(h.client.user_message(room, ALICE, "notice", msgtype="m.notice"))
    await h.settle()
    assert [r.messages[-1].content for r in backend.requests] == ["hello"]


async def test_messages_during_startup_are_answered_after_once(make_surfaces) -> None:
    h, room, backend = await onboarded(make_surfaces)
    h.app.gate.close()
    evt = h.client.user_message(room, ALICE, "while starting")
    await h.app.on_message(evt)
    await h.app.on_message(evt)  # delivered twice (e.g. live and by catch-up)
    await h.settle()
    assert h.client.bodies(room) == []
    h.app.open_gate()
    await h.settle()
    assert h.client.bodies(room) == ["re: while starting"]


async def test_live_message_waits_for_the_rooms_missed_ones(make_surfaces) -> None:
    h = await make_surfaces(streaming={"enabled": False})
    dm = h.dm(ALICE)
    await h.say(dm, ALICE, "!ai start")
    [room] = h.app.rooms.all_rooms()
    await h.app.stop()
    h.client.user_message(room.room_id, ALICE, "sent while down")  # maubot would drop it
    h.client.messages_delay = 0.3  # catch-up is still reading when the live message arrives
    h2 = await make_surfaces(client=h.client, settle=False, streaming={"enabled": False})
    assert h2.app.gate.is_open  # live traffic is routed while catch-up runs
    await h2.say(room.room_id, ALICE, "sent after the restart")
    assert h2.client.bodies(room.room_id) == [
        "echo: sent while down",
        "echo: sent after the restart",
    ]


async def test_fast_answer_is_one_message_without_typing_notice(make_surfaces) -> None:
    h = await make_surfaces()  # streaming on, 800 ms between edits: the echo answer is faster
    dm = h.dm(ALICE)
    await h.say(dm, ALICE, "!ai start")
    [room] = h.app.rooms.all_rooms()
    await h.say(room.room_id, ALICE, "quick one")
    assert h.client.bodies(room.room_id) == ["echo: quick one"]
    assert len(h.client.messages(room.room_id)) == 1  # posted once, never edited
    assert h.client.typing == []


async def test_answer_in_flight_at_stop_says_it_was_interrupted(make_surfaces) -> None:
    h, room, backend = await onboarded(make_surfaces)
    backend.gate = asyncio.Event()  # the answer is half-way when the plugin stops
    await h.app.on_message(h.client.user_message(room, ALICE, "a long question"))
    for _ in range(100):
        if h.client.messages(room):
            break
        await asyncio.sleep(0.01)
    await h.app.stop()
    [answer] = h.client.bodies(room)
    assert answer.endswith("*(interrupted by a restart; send `!ai retry` for a full answer)*")
