"""Conversations the provider keeps (server-state backends): the platform issues every
`platform_chat_id`, and the room follows when the platform loses or compacts a conversation."""

from __future__ import annotations

import copy

from surfaces_plugin import layout
from surfaces_plugin.store.migrations import CACHE_TABLES

from .conftest import BASE_CONFIG
from .fakes import ConversationsBackend

ALICE = "@alice:localhost"


def agents(**changes) -> list[dict]:
    agent = copy.deepcopy(BASE_CONFIG["agents"][0])
    agent.update(changes)
    return [agent]


async def with_provider(make_surfaces, **overrides):
    """Surfaces whose default agent's provider keeps conversations; alice's DM with the bot."""
    overrides.setdefault("streaming", {"enabled": False})
    h = await make_surfaces(**overrides)
    backend = ConversationsBackend(h.app.settings.backends["echo"])
    h.app.backends.put(backend)
    return h, backend, h.dm(ALICE)


async def onboarded(make_surfaces, **overrides):
    h, backend, dm = await with_provider(make_surfaces, **overrides)
    await h.say(dm, ALICE, "!ai start")
    [room] = h.app.rooms.all_rooms()
    return h, backend, room.room_id


def bound_chat_id(h, room_id: str) -> str | None:
    """The platform_chat_id the room's binding state event holds (what Matrix says)."""
    sender, content = h.client.rooms[room_id].state[(layout.BINDING_TYPE, "")]
    binding = layout.parse_binding(content)
    assert binding is not None and sender == str(h.client.mxid)
    return binding.platform_chat_id


def strip_chat_id(h, room_id: str) -> None:
    """The binding as an older layout wrote it: no platform_chat_id."""
    sender, content = h.client.rooms[room_id].state[(layout.BINDING_TYPE, "")]
    old = {k: v for k, v in content.items() if k != "platform_chat_id"}
    h.client.rooms[room_id].state[(layout.BINDING_TYPE, "")] = (sender, old)


async def wipe_cache(h) -> None:
    for table in CACHE_TABLES:
        await h.app.stores.db.execute(f"DELETE FROM {table}")


def texts(messages) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in messages]


# onboarding and reset


async def test_a_new_room_is_bound_to_the_conversation_the_provider_created(make_surfaces) -> None:
    h, backend, room = await onboarded(make_surfaces)
    assert bound_chat_id(h, room) == "conv_1"
    assert backend.seeds == [[]]
    await h.say(room, ALICE, "hello")
    assert h.last_reply(room) == "conv_1 holds 3 messages (2 new)"  # system prompt + hello
    events = h.client.messages(room)
    assert events[-1]["content"][layout.TURN_KEY]["platform_chat_id"] == "conv_1"


async def test_a_refused_conversation_creates_no_room_and_says_why(make_surfaces) -> None:
    h, backend, dm = await with_provider(make_surfaces)
    backend.refuse_creates = 1
    await h.say(dm, ALICE, "!ai start")
    reply = h.last_reply(dm)
    assert "The provider of `echo` did not create a new conversation (server, HTTP 503" in reply
    assert "No working room was created" in reply
    assert h.app.rooms.all_rooms() == []
    assert not any(
        (layout.BINDING_TYPE, "") in room.state for room in h.client.rooms.values()
    ), "no binding without a conversation"
    await h.say(dm, ALICE, "!ai start")
    [room] = h.app.rooms.all_rooms()
    assert bound_chat_id(h, room.room_id) == "conv_1"


async def test_reset_binds_a_new_platform_conversation(make_surfaces) -> None:
    h, backend, room = await onboarded(make_surfaces)
    await h.say(room, ALICE, "hello")
    await h.say(room, ALICE, "!ai reset")
    assert bound_chat_id(h, room) == "conv_2"
    assert backend.seeds[-1] == []  # a fresh conversation starts empty
    await h.say(room, ALICE, "again")
    assert h.last_reply(room) == "conv_2 holds 3 messages (2 new)"


async def test_a_refused_reset_keeps_the_current_conversation(make_surfaces) -> None:
    h, backend, room = await onboarded(make_surfaces)
    await h.say(room, ALICE, "hello")
    backend.refuse_creates = 1
    await h.say(room, ALICE, "!ai reset")
    reply = h.last_reply(room)
    assert "did not create a new conversation" in reply and "stays current" in reply
    assert bound_chat_id(h, room) == "conv_1"
    assert not any(layout.RESET_KEY in e["content"] for e in h.client.messages(room))
    await h.say(room, ALICE, "still here?")
    assert h.last_reply(room) == "conv_1 holds 5 messages (1 new)"


# reconciliation


async def test_reconciliation_asks_the_provider_for_a_missing_id_once(make_surfaces) -> None:
    h, backend, room = await onboarded(make_surfaces)
    strip_chat_id(h, room)
    await wipe_cache(h)  # nothing left that knows the room's id
    report = await h.app.reconciler.run(reason="test")
    assert bound_chat_id(h, room) == "conv_2"
    assert report.counts["platform_chat_ids backfilled"] == 1
    assert report.counts["platform conversations created"] == 1
    assert backend.seeds[-1] == []  # the cache held no history to seed it with

    again = await h.app.reconciler.run(reason="again")
    assert again.writes == 0
    assert len(backend.seeds) == 2  # no second conversation
    await h.say(room, ALICE, "hello")
    assert h.last_reply(room) == "conv_2 holds 3 messages (2 new)"


async def test_a_room_given_a_new_id_is_seeded_with_its_cached_history(make_surfaces) -> None:
    h, backend, dm = await with_provider(make_surfaces)
    await h.say(dm, ALICE, "!ai start")
    await h.say(dm, ALICE, "!ai new Second")
    first, second = (r.room_id for r in h.app.rooms.rooms_of(ALICE))
    await h.say(second, ALICE, "remember the second room")
    # Someone copied the first room's id into the second binding: a duplicate to split.
    sender, content = h.client.rooms[second].state[(layout.BINDING_TYPE, "")]
    h.client.rooms[second].state[(layout.BINDING_TYPE, "")] = (
        sender, {**content, "platform_chat_id": bound_chat_id(h, first)},
    )
    report = await h.app.reconciler.run(reason="test")
    assert report.counts["duplicate chat ids resolved"] == 1
    assert bound_chat_id(h, first) == "conv_1"
    assert bound_chat_id(h, second) == "conv_3"
    seed = texts(backend.seeds[-1])
    assert seed == [
        ("user", "remember the second room"),
        ("assistant", "conv_2 holds 3 messages (2 new)"),
    ]


async def test_a_refused_backfill_writes_nothing_and_the_next_run_fixes_it(make_surfaces) -> None:
    h, backend, room = await onboarded(make_surfaces)
    strip_chat_id(h, room)
    await wipe_cache(h)
    backend.refuse_creates = 1
    writes = h.app.io.gateway.writes
    report = await h.app.reconciler.run(reason="provider down")
    assert h.app.io.gateway.writes == writes and report.writes == 0
    assert bound_chat_id(h, room) is None
    assert report.counts["rooms left without a conversation"] == 1
    assert any(room in item and "HTTP 503" in item for item in report.ignored)
    assert h.app.rooms.room(room) is None  # not routed without a conversation

    report = await h.app.reconciler.run(reason="provider back")
    assert bound_chat_id(h, room) == "conv_2"
    assert report.counts["platform conversations created"] == 1
    await h.say(room, ALICE, "hello")
    assert h.last_reply(room) == "conv_2 holds 3 messages (2 new)"


async def test_a_dry_run_creates_no_platform_conversation(make_surfaces) -> None:
    h, backend, room = await onboarded(make_surfaces, reconciliation={"dry_run": True})
    strip_chat_id(h, room)
    await wipe_cache(h)
    report = await h.app.reconciler.run(reason="dry")
    assert report.counts["writes planned"] == 1
    assert len(backend.seeds) == 1
    assert bound_chat_id(h, room) is None


# a conversation the provider lost


async def test_a_lost_conversation_goes_on_in_a_seeded_one(make_surfaces) -> None:
    h, backend, room = await onboarded(make_surfaces)
    await h.say(room, ALICE, "one")
    backend.lost.add("conv_1")
    await h.say(room, ALICE, "two")
    bodies = h.client.bodies(room)
    assert bodies[-2].startswith("The provider of `echo` no longer had this conversation.")
    assert sum("no longer had this conversation" in b for b in bodies) == 1
    # Seeded with the window up to the last answer; the new question came in the request.
    assert [role for role, _ in texts(backend.seeds[-1])] == ["system", "user", "assistant"]
    assert texts(backend.seeds[-1])[1:] == [
        ("user", "one"), ("assistant", "conv_1 holds 3 messages (2 new)"),
    ]
    assert bodies[-1] == "conv_2 holds 5 messages (1 new)"
    assert bound_chat_id(h, room) == "conv_2"
    assert h.app.rooms.room(room).platform_chat_id == "conv_2"
    await h.say(room, ALICE, "!ai context")
    assert "- stored messages in this conversation: 4" in h.last_reply(room)


async def test_a_provider_that_keeps_losing_conversations_gets_one_notice(make_surfaces) -> None:
    h, backend, room = await onboarded(make_surfaces)
    backend.lost.add("conv_1")
    backend.lose_new_ones = True
    await h.say(room, ALICE, "hello")
    bodies = h.client.bodies(room)
    assert sum("no longer had this conversation" in b for b in bodies) == 1
    assert "provider no longer has this conversation" in bodies[-1]  # the usual error line
    assert len(backend.seeds) == 2  # one replacement, not a loop


# compaction


async def test_compaction_starts_a_conversation_holding_the_summary(make_surfaces) -> None:
    h, backend, room = await onboarded(make_surfaces, agents=agents(context_tokens=1000))
    for i in range(6):
        await h.say(room, ALICE, f"m{i} " + " ".join(["word"] * 100))
    await h.say(room, ALICE, "!ai context")
    reply = h.last_reply(room)
    assert "- held by the provider: yes" in reply
    held_words = sum(len(m.content.split()) for m in backend.conversations["conv_1"])
    assert f"- the provider's last count: {held_words} prompt tokens" in reply

    await h.say(room, ALICE, "!ai compact")
    assert h.client.bodies(room)[-2].endswith("summary of 2 messages")
    assert bound_chat_id(h, room) == "conv_2"
    seed = backend.seeds[-1]
    assert seed[0].role == "system" and "summary of 2 messages" in seed[0].content
    assert seed[-1].role == "assistant"
    assert len(seed) < len(backend.conversations["conv_1"])  # the provider's copy shrank
    marker = h.client.messages(room)[-2]["content"][layout.SUMMARY_KEY]
    assert marker["platform_chat_id"] == "conv_2"

    await h.say(room, ALICE, "!ai context")
    assert "- the provider's last count: none reported yet" in h.last_reply(room)
    await h.say(room, ALICE, "next")
    assert h.last_reply(room) == f"conv_2 holds {len(seed) + 2} messages (1 new)"


async def test_automatic_compaction_answers_in_the_new_conversation(make_surfaces) -> None:
    h, backend, room = await onboarded(make_surfaces, agents=agents(context_tokens=256))
    for i in range(5):
        await h.say(room, ALICE, f"m{i} " + " ".join(["word"] * 60))
    assert any(b.startswith("**Summary of the earlier conversation**") for b in h.client.bodies(room))
    newest = f"conv_{len(backend.seeds)}"
    assert newest != "conv_1" and bound_chat_id(h, room) == newest
    # The answer after the compaction came from the new, smaller conversation and is kept there.
    assert h.last_reply(room).startswith(f"{newest} holds ")
    stored = await h.app.stores.messages.history(newest)
    assert stored[-1].content == h.last_reply(room)
    assert stored[-2].content.startswith("m4 ")
    # Each answer's turn marker names the conversation it was kept in, the one answered right
    # after the compaction too (so a rebuild from Matrix finds it there).
    events = h.client.messages(room)
    summary = max(i for i, e in enumerate(events) if layout.SUMMARY_KEY in e["content"])
    after = next(e for e in events[summary:] if layout.TURN_KEY in e["content"])
    assert layout.parse_turn_marker(after["content"]).platform_chat_id == newest


# switching a room's agent to one whose provider keeps conversations

TWO_BACKENDS = [{"id": "echo", "type": "echo"}, {"id": "conv", "type": "echo"}]


async def room_switching_to_a_keeper(make_surfaces):
    """A room on the local echo agent; agent `keeper`'s provider keeps conversations."""
    keeper = {**agents()[0], "id": "keeper", "name": "Keeper", "backend": "conv"}
    h = await make_surfaces(
        streaming={"enabled": False}, backends=TWO_BACKENDS, agents=[*agents(), keeper]
    )
    backend = ConversationsBackend(h.app.settings.backends["conv"])
    h.app.backends.put(backend)
    dm = h.dm(ALICE)
    await h.say(dm, ALICE, "!ai start")
    [room] = h.app.rooms.all_rooms()
    await h.say(room.room_id, ALICE, "hello there")
    return h, backend, room.room_id


async def test_switching_to_an_agent_whose_provider_keeps_conversations_seeds_one(
    make_surfaces,
) -> None:
    h, backend, room = await room_switching_to_a_keeper(make_surfaces)
    await h.say(room, ALICE, "!ai agent keeper")
    assert h.last_reply(room) == "This room now talks to `keeper`. The conversation so far is kept."
    assert bound_chat_id(h, room) == "conv_1"
    assert [m.content for m in backend.seeds[0] if m.role != "system"] == [
        "hello there",
        "echo: hello there",
    ]
    await h.say(room, ALICE, "and now?")  # continues there: no "conversation lost" notice
    assert h.last_reply(room) == "conv_1 holds 5 messages (1 new)"  # seed: system + 2 turns
    assert not any("no longer had" in b for b in h.client.bodies(room))


async def test_a_refused_switch_keeps_the_room_as_it_was(make_surfaces) -> None:
    h, backend, room = await room_switching_to_a_keeper(make_surfaces)
    before = bound_chat_id(h, room)
    backend.refuse_creates = 1
    await h.say(room, ALICE, "!ai agent keeper")
    assert h.last_reply(room).startswith("This room still talks to `echo`: The provider of `keeper`")
    assert "503" in h.last_reply(room)
    assert bound_chat_id(h, room) == before and h.app.rooms.room(room).agent == "echo"
