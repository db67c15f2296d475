"""How a streamed answer appears: a first post that ends a sentence, live edits (MSC4357), the
final text, and `!ai stream on|off` kept in the binding."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from surfaces_plugin import layout
from surfaces_plugin.backends import Backend, Chunk, GenerationRequest
from surfaces_plugin.store.migrations import CACHE_TABLES

from .conftest import until
from .test_oversized import HANGUL, answer_messages

ALICE = "@alice:localhost"
# Short waits, so the pacing shows within a test; the rules are those of the shipped defaults.
QUICK = {"first_post_ms": 150, "edit_interval_ms": 50, "max_edit_interval_ms": 100}


class PiecesBackend(Backend):
    """Streams the given pieces; a `None` piece waits until the test opens the next gate."""

    def __init__(self, spec, pieces: list[str | None]) -> None:
        super().__init__(spec)
        self.pieces = pieces
        self.gates: list[asyncio.Event] = [asyncio.Event() for p in pieces if p is None]

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        gates = iter(self.gates)
        for piece in self.pieces:
            if piece is None:
                await next(gates).wait()
            else:
                yield Chunk(piece)
                await asyncio.sleep(0.005)


async def room_with(make_surfaces, pieces: list[str | None], **streaming):
    h = await make_surfaces(streaming={**QUICK, **streaming})
    await h.say(h.dm(ALICE), ALICE, "!ai start")
    [room] = h.app.rooms.all_rooms()
    backend = PiecesBackend(h.app.settings.backends["echo"], pieces)
    h.app.backends.put(backend)
    return h, room.room_id, backend


def is_live(content: dict) -> bool:
    return layout.LIVE_KEY in content


async def test_the_first_post_ends_a_sentence_and_only_the_final_text_is_not_live(
    make_surfaces,
) -> None:
    pieces = ["The answer is 4. It is", None, " even, as 4 is 2 times 2. And", None, " done."]
    h, room, backend = await room_with(make_surfaces, pieces)
    await h.app.on_message(h.client.user_message(room, ALICE, "what is 2+2?"))
    await until(lambda: h.client.messages(room), "the first post")
    [post] = h.client.messages(room)
    assert post["content"]["body"] == "The answer is 4."  # the fragment after it waits
    assert is_live(post["content"]) and post["content"][layout.TURN_KEY]["partial"] is True

    backend.gates[0].set()
    await until(lambda: len(h.client.messages(room)) == 2, "an edit while it streams")
    edit = h.client.messages(room)[1]["content"]
    assert edit["m.new_content"]["body"] == "The answer is 4. It is even, as 4 is 2 times 2."
    assert is_live(edit) and is_live(edit["m.new_content"])  # the fallback and the new content

    backend.gates[1].set()
    await h.settle()
    assert h.client.bodies(room) == ["The answer is 4. It is even, as 4 is 2 times 2. And done."]
    final = h.client.messages(room)[-1]["content"]
    assert not is_live(final) and not is_live(final["m.new_content"])
    assert "partial" not in final["m.new_content"][layout.TURN_KEY]
    assert all(is_live(m["content"]) for m in h.client.messages(room)[:-1])


async def test_without_a_sentence_end_the_first_post_comes_shortly_after_the_first_words(
    make_surfaces,
) -> None:
    h, room, backend = await room_with(make_surfaces, ["Let me think about", " th", None, "is."])
    await h.app.on_message(h.client.user_message(room, ALICE, "a hard one"))
    # The model stalls mid-word: the deadline after its first words posts what is complete.
    await until(lambda: h.client.messages(room), "the first post while the model stalls")
    assert h.client.bodies(room) == ["Let me think about"]
    backend.gates[0].set()
    await h.settle()
    assert h.client.bodies(room) == ["Let me think about this."]


async def test_an_answer_done_before_the_deadline_is_one_message(make_surfaces) -> None:
    h, room, _ = await room_with(make_surfaces, ["No sentence end", " in this short one"])
    await h.say(room, ALICE, "quick")
    assert [m["content"]["body"] for m in h.client.messages(room)] == [
        "No sentence end in this short one"
    ]
    assert not is_live(h.client.messages(room)[0]["content"])


async def test_a_long_answer_streamed_at_a_pace_continues_in_new_messages(make_surfaces) -> None:
    h = await make_surfaces(streaming=QUICK)
    await h.say(h.dm(ALICE), ALICE, "!ai start")
    [room] = h.app.rooms.all_rooms()
    await h.say(room.room_id, ALICE, HANGUL)  # the echo agent streams it word by word
    parts = answer_messages(h, room.room_id)
    assert len(parts) > 1
    assert "".join(p["body"] for p in parts) == f"echo: {HANGUL}".strip()
    assert all("partial" not in p[layout.TURN_KEY] and not is_live(p) for p in parts)
    assert [("continues" in p[layout.TURN_KEY]) for p in parts] == [False] + [True] * (
        len(parts) - 1
    )


def stream_choice(h, room_id: str) -> bool | None:
    sender, content = h.client.rooms[room_id].state[(layout.BINDING_TYPE, "")]
    binding = layout.parse_binding(content)
    assert binding is not None
    return binding.stream


async def test_stream_off_gives_one_message_and_survives_a_lost_database(make_surfaces) -> None:
    pieces = ["One sentence. ", "Two sentences. ", "Three."]
    h, room, _ = await room_with(make_surfaces, pieces, first_post_ms=0)
    await h.say(room, ALICE, "!ai stream")
    assert h.last_reply(room).startswith("Streaming is on") and "(the default)" in h.last_reply(room)
    before = len(h.client.messages(room))
    await h.say(room, ALICE, "streamed")
    assert len(h.client.messages(room)) - before > 1  # posted, then edited

    await h.say(room, ALICE, "!ai stream off")
    assert h.last_reply(room).startswith("Streaming is off here")
    assert stream_choice(h, room) is False  # Matrix holds it
    before = len(h.client.messages(room))
    await h.say(room, ALICE, "whole")
    assert len(h.client.messages(room)) - before == 1
    assert h.client.bodies(room)[-1] == "One sentence. Two sentences. Three."

    await h.app.stop()
    for table in CACHE_TABLES:
        await h.app.stores.db.execute(f"DELETE FROM {table}")
    h2 = await make_surfaces(client=h.client, streaming={**QUICK, "first_post_ms": 0})
    h2.app.backends.put(PiecesBackend(h2.app.settings.backends["echo"], pieces))
    assert (await h2.app.stores.rooms.get(room)).binding.stream is False  # the cache, rebuilt
    await h2.say(room, ALICE, "!ai stream")
    assert h2.last_reply(room).startswith("Streaming is off") and "this room's choice" in (
        h2.last_reply(room)
    )
    before = len(h2.client.messages(room))
    await h2.say(room, ALICE, "still whole")
    assert len(h2.client.messages(room)) - before == 1

    await h2.say(room, ALICE, "!ai stream on")
    assert stream_choice(h2, room) is True
    await h2.say(room, ALICE, "!ai stream sometimes")
    assert "neither `on` nor `off`" in h2.last_reply(room)
    assert "!ai stream [on | off]" in h2.last_reply(room)
