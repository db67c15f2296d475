"""Hostile user text on SQLite and Postgres: names are cleaned or refused, every message is
answered whatever characters it holds, a store failure ends the turn visibly, refused users get
one notice per window, and a body that is not a string is ignored."""

from __future__ import annotations

from typing import Any

from mautrix.types import MessageEvent

from surfaces_plugin import layout
from surfaces_plugin.dispatch import TURN_FAILED, RateLimiter
from surfaces_plugin.layout import Binding
from surfaces_plugin.store import Chat, Room, Stores

ALICE = "@alice:localhost"
# What a user can hide in a title: a right-to-left override, isolates, zero-width characters,
# a BOM, controls, an escape sequence and line breaks.
HOSTILE_TITLE = "\u202eevil\u202c \u2066Plans\u2069\u200b\u200d for\ufeff\n\ttoday\x07\x1b[0m"
SHOWN_TITLE = "evil Plans for today[0m"
NUL_MESSAGE = "before\x00after"
LONE_SURROGATE = "half a pair \ud83d here"


async def started(make_surfaces: Any, **overrides: Any) -> tuple[Any, str, str]:
    """alice with her Space: (harness, her DM, her first working room)."""
    h = await make_surfaces(**overrides)
    dm = h.dm(ALICE)
    await h.say(dm, ALICE, "!ai start")
    [room] = h.app.rooms.all_rooms()
    return h, dm, room.room_id


def binding_of(h: Any, room_id: str) -> Binding:
    binding = layout.parse_binding(h.client.rooms[room_id].state[("org.surfaces.binding", "")][1])
    assert binding is not None
    return binding


def new_room_titled(h: Any, title: str) -> str:
    [room] = [r.room_id for r in h.app.rooms.all_rooms() if r.title == title]
    return room


# -- names -----------------------------------------------------------------------------------------


async def test_a_hostile_title_is_cleaned_everywhere_it_shows(make_surfaces) -> None:
    h, dm, _ = await started(make_surfaces)
    await h.say(dm, ALICE, f"!ai new echo {HOSTILE_TITLE}")
    assert h.last_reply(dm).startswith(f"New working room [{SHOWN_TITLE}](")
    room_id = new_room_titled(h, SHOWN_TITLE)
    assert h.client.rooms[room_id].name == SHOWN_TITLE  # m.room.name
    assert binding_of(h, room_id).title == SHOWN_TITLE
    assert (await h.app.stores.rooms.get(room_id)).binding.title == SHOWN_TITLE
    await h.say(dm, ALICE, "!ai rooms")
    assert f"[{SHOWN_TITLE}](" in h.last_reply(dm)


async def test_a_title_with_nothing_visible_is_refused(make_surfaces) -> None:
    h, dm, _ = await started(make_surfaces)
    rooms_before = len(h.client.rooms)
    for invisible in ("\u200b\u200b\u200b", "\u202e\u202c", "\ufeff\u2060\x07", "echo \u3164"):
        await h.say(dm, ALICE, f"!ai new {invisible}")
        reply = h.last_reply(dm)
        assert reply.startswith("That title has nothing visible in it"), reply
        assert "Usage: `!ai new [agent] [title…]`" in reply
    assert len(h.client.rooms) == rooms_before  # no room was created
    await h.say(dm, ALICE, "!ai new echo")  # no title at all is still fine: the default
    assert "New working room [Chat with Echo]" in h.last_reply(dm)


async def test_the_title_limit_counts_what_is_shown(make_surfaces) -> None:
    h, dm, _ = await started(make_surfaces)
    padded = "\u200b".join("x" * 80)  # 80 visible characters, 159 in all
    await h.say(dm, ALICE, f"!ai new {padded}")
    assert f"New working room [{'x' * 80}]" in h.last_reply(dm)
    await h.say(dm, ALICE, "!ai new " + "\u200b".join("y" * 81))
    assert "That title has 81 characters; the limit is 80." in h.last_reply(dm)


async def test_the_space_name_cleans_the_users_displayname(make_surfaces) -> None:
    h = await make_surfaces()
    h.client.displaynames[ALICE] = "\u202eAl\u200bice\u202c\n"
    dm = h.dm(ALICE)
    await h.say(dm, ALICE, "!ai start")
    [space] = [r for r in h.client.rooms.values() if r.create_content.get("type") == "m.space"]
    assert space.name == "Alice's agents"


async def test_an_invisible_displayname_falls_back_to_the_localpart(make_surfaces) -> None:
    h = await make_surfaces()
    h.client.displaynames[ALICE] = "\u200b\u3164\u2066"
    dm = h.dm(ALICE)
    await h.say(dm, ALICE, "!ai start")
    [space] = [r for r in h.client.rooms.values() if r.create_content.get("type") == "m.space"]
    assert space.name == "alice's agents"


# -- text the store cannot hold as it is -------------------------------------------------------


async def test_a_message_with_nul_is_answered_and_stored(make_surfaces) -> None:
    h, _, room = await started(make_surfaces, streaming={"enabled": False})
    await h.say(room, ALICE, NUL_MESSAGE)
    await h.say(room, ALICE, LONE_SURROGATE)
    assert h.client.bodies(room) == ["echo: before\ufffdafter", "echo: half a pair \ufffd here"]
    pcid = h.app.rooms.room(room).platform_chat_id
    history = await h.app.stores.messages.history(pcid)
    assert [(m.role, m.content) for m in history] == [
        ("user", "before\ufffdafter"),
        ("assistant", "echo: before\ufffdafter"),
        ("user", "half a pair \ufffd here"),
        ("assistant", "echo: half a pair \ufffd here"),
    ]


async def test_a_system_prompt_with_nul_is_kept(make_surfaces) -> None:
    h, _, room = await started(make_surfaces)
    await h.say(room, ALICE, "!ai system Be\x00 brief")
    assert "system prompt is set" in h.last_reply(room)
    assert (await h.app.stores.rooms.get(room)).binding.system_prompt == "Be\ufffd brief"


async def test_every_text_column_stores_the_same_on_both_engines(stores: Stores) -> None:
    text = "a\x00b \ud800 c"
    kept = "a\ufffdb \ufffd c"
    binding = Binding(
        owner=ALICE, space_id="!s", agent="echo", title=text, platform_chat_id="c1",
        system_prompt=text,
    )
    await stores.rooms.upsert(Room(room_id="!r", kind="working", owner=ALICE, binding=binding))
    row = await stores.rooms.get("!r")
    assert row is not None and row.binding is not None
    assert (row.binding.title, row.binding.system_prompt) == (kept, kept)
    await stores.chats.upsert(Chat("c1", "!r", "echo", created_ms=1, summary=text, summary_upto_seq=0))
    assert (await stores.chats.get("c1")).summary == kept
    await stores.chats.set_summary("c1", text + "!", 0)
    assert (await stores.chats.get("c1")).summary == kept + "!"
    await stores.messages.append("c1", "user", text, event_id="$m")
    assert [m.content for m in await stores.messages.history("c1")] == [kept]
    await stores.memory.set(ALICE, [text])
    assert (await stores.memory.get(ALICE)).notes == ("a\x00b \ufffd c",)  # JSON escapes NUL


async def test_a_store_failure_ends_the_turn_with_one_notice(make_surfaces) -> None:
    h, _, room = await started(make_surfaces, streaming={"enabled": False})
    messages = h.app.stores.messages
    real_append = messages.append
    failures = [RuntimeError("connection to postgresql://surfaces:hunter2@db lost")]

    async def append_failing_once(*args: Any, **kwargs: Any) -> int:
        if failures:
            raise failures.pop()
        return await real_append(*args, **kwargs)

    messages.append = append_failing_once  # type: ignore[method-assign]
    await h.say(room, ALICE, "is anyone there?")
    assert h.client.bodies(room) == [TURN_FAILED]
    assert h.client.messages(room)[-1]["content"]["msgtype"] == "m.notice"
    assert "hunter2" not in TURN_FAILED and "postgresql" not in TURN_FAILED
    await h.say(room, ALICE, "and now?")  # the room keeps working
    assert h.client.bodies(room)[-1] == "echo: and now?"


async def test_a_failure_while_answering_closes_the_answer(make_surfaces) -> None:
    h, _, room = await started(make_surfaces, streaming={"enabled": False})
    history = h.app.history
    real_turns = history.turns
    failures = [RuntimeError("the database went away")]

    async def turns_failing_once(*args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        return await real_turns(*args, **kwargs)

    history.turns = turns_failing_once  # type: ignore[method-assign]
    await h.say(room, ALICE, "hello")
    assert h.client.bodies(room) == [TURN_FAILED]
    await h.say(room, ALICE, "hello again")
    assert h.client.bodies(room)[-1] == "echo: hello again"


# -- notices about limits ----------------------------------------------------------------------


def rate_notices(h: Any, room: str) -> list[str]:
    return [b for b in h.client.bodies(room) if "faster than the limit" in b]


async def test_a_rate_limited_user_gets_one_notice_per_window(make_surfaces) -> None:
    h, _, room = await started(
        make_surfaces, streaming={"enabled": False}, limits={"per_user_requests_per_minute": 2}
    )
    now = [1000.0]
    h.app.dispatcher.limiter = RateLimiter(clock=lambda: now[0])
    for i in range(7):
        await h.app.on_message(h.client.user_message(room, ALICE, f"m{i}"))
    await h.settle()
    assert h.client.bodies(room) == [
        "echo: m0",
        "echo: m1",
        "You are sending messages faster than the limit (2 a minute), so I am not answering "
        "them for now. Wait a little, then send again what you need answered.",
    ]
    last = [e for e in h.client.room_events(room) if e["sender"] == ALICE][-1]
    assert last["content"]["body"] == "m6"  # the last refused message
    mark = await h.app.stores.processed.get(room)
    assert mark is not None and mark.event_id == last["event_id"]  # refused ones are processed

    now[0] += 61  # the next window: answered again, and told again once when over the limit
    for i in range(7, 11):
        await h.app.on_message(h.client.user_message(room, ALICE, f"m{i}"))
    await h.settle()
    assert [b for b in h.client.bodies(room) if b.startswith("echo:")][-2:] == [
        "echo: m7",
        "echo: m8",
    ]
    assert len(rate_notices(h, room)) == 2


# -- bodies that are not strings (or hold nothing) --------------------------------------------


def odd_body_event(h: Any, room_id: str, body: Any) -> MessageEvent:
    raw = h.client.user_message(room_id, ALICE, "placeholder").serialize()
    raw["content"]["body"] = body
    h.client.rooms[room_id].timeline[-1] = raw
    return MessageEvent.deserialize(raw)


ODD_BODIES = [123, 1.5, True, {"text": "hi"}, ["!ai", "help"], None, "", " \n "]


async def test_a_body_that_is_not_a_string_is_ignored(make_surfaces) -> None:
    h, dm, room = await started(make_surfaces, streaming={"enabled": False})
    dm_replies = len(h.client.bodies(dm))
    for body in ODD_BODIES:
        await h.app.on_message(odd_body_event(h, room, body))
        await h.app.on_message(odd_body_event(h, dm, body))
    await h.say(room, ALICE, "a real one")  # answered after all of them: nothing is stuck
    assert h.client.bodies(room) == ["echo: a real one"]
    assert len(h.client.bodies(dm)) == dm_replies


async def test_a_missed_body_that_is_not_a_string_is_not_caught_up(make_surfaces) -> None:
    h, _, room = await started(make_surfaces, streaming={"enabled": False})
    await h.app.stop()
    for body in ODD_BODIES:  # sent while the bot was down: read back by catch-up
        odd_body_event(h, room, body)
    h.client.user_message(room, ALICE, "missed text")
    h2 = await make_surfaces(client=h.client, streaming={"enabled": False})
    assert h2.client.bodies(room) == ["echo: missed text"]
