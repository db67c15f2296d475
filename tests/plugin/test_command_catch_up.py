"""`!ai` commands sent while the bot was down: answered once after the restart (issue 16).

A command that only shows something is run late; one that changes state is not, and its
sender gets one notice saying so. Neither is answered again after a further restart, and a
command the live path answered before the stop is never caught up.
"""

from __future__ import annotations

import asyncio
import time

from mautrix.types import StateEvent

from surfaces_plugin import layout

from .test_dispatch import ALICE, BOB, onboarded

ADMIN = "@admin:localhost"
CAROL = "@carol:localhost"
NOT_RUN = "arrived while I was offline or restarting"


async def restart(make_surfaces, h, **overrides):
    """Stop this Surfaces and start another on the same homeserver and database."""
    await h.app.stop()
    await asyncio.sleep(0.002)  # starts in a later millisecond than anything sent while down
    overrides.setdefault("streaming", {"edit_interval_ms": 0})
    return await make_surfaces(h.client, **overrides)


def sent_while_down(h, room_id: str, sender: str, body: str) -> str:
    """A message maubot never delivers (the bot is stopped): it is only in the timeline."""
    return h.client.user_message(room_id, sender, body).event_id


def for_command(h, room_id: str, event_id: str) -> list[dict]:
    """The bot's messages that say they were sent for the command `event_id`."""
    return [
        e for e in h.client.messages(room_id)
        if layout.parse_command_marker(e["content"]) == event_id
    ]


async def invited_dm(h, user: str) -> str:
    """A DM the user invited the bot to, as the live path sees it (so the bot knows it)."""
    room_id = h.client.add_room(user, {user: "join"})
    h.client.rooms[room_id].members[str(h.client.mxid)] = "invite"
    await h.app.on_member(StateEvent.deserialize({
        "type": "m.room.member", "state_key": str(h.client.mxid), "sender": user,
        "event_id": f"$invite-{room_id}", "room_id": room_id,
        "origin_server_ts": int(time.time() * 1000), "content": {"membership": "invite"},
    }))
    await h.settle()
    return room_id


async def test_a_read_only_command_sent_while_down_is_answered_once(make_surfaces) -> None:
    h, room, _ = await onboarded(make_surfaces)
    await h.say(room, ALICE, "hello")
    await h.app.stop()
    command = sent_while_down(h, room, ALICE, "!ai context")
    h2 = await restart(make_surfaces, h)
    [reply] = for_command(h2, room, command)
    assert reply["content"]["body"].startswith("**Context of the next request to `echo`**")
    assert "- messages: 3 (2 turns plus the system message)" in reply["content"]["body"]
    shown = h2.client.bodies(room)
    h3 = await restart(make_surfaces, h2)
    assert h3.client.bodies(room) == shown  # nothing again after a second restart
    await h3.say(room, ALICE, "still there?")  # the positive signal: the bot is running
    assert h3.client.bodies(room) == [*shown, "echo: still there?"]
    assert len(for_command(h3, room, command)) == 1


async def test_a_state_changing_command_gets_one_notice_and_is_not_run(make_surfaces) -> None:
    h, room, _ = await onboarded(make_surfaces)
    await h.say(room, ALICE, "hello")
    chat_before = h.app.rooms.room(room).platform_chat_id
    await h.app.stop()
    command = sent_while_down(h, room, ALICE, "!ai reset")
    missed = sent_while_down(h, room, ALICE, "after the reset")
    h2 = await restart(make_surfaces, h)
    [notice] = for_command(h2, room, command)
    body = notice["content"]["body"]
    assert body.startswith(f"`!ai reset` {NOT_RUN} (sent at ")
    assert body.endswith("Send it again if you still want it.")
    assert h2.app.rooms.room(room).platform_chat_id == chat_before  # not reset
    # The message after it is answered in the same conversation, after the notice.
    assert h2.client.bodies(room)[-2:] == [body, "echo: after the reset"]
    history = await h2.app.stores.messages.history(chat_before)
    assert [m.content for m in history] == ["hello", "re: hello", "after the reset", "echo: after the reset"]
    assert missed == history[2].event_id
    shown = h2.client.bodies(room)
    h3 = await restart(make_surfaces, h2)
    await h3.say(room, ALICE, "ping")
    assert h3.client.bodies(room) == [*shown, "echo: ping"]


async def test_new_and_memory_edits_are_told_and_showing_memory_is_run(make_surfaces) -> None:
    h, room, _ = await onboarded(make_surfaces)
    await h.app.stop()
    new = sent_while_down(h, room, ALICE, "!ai new Research")
    add = sent_while_down(h, room, ALICE, "!ai memory add I like tea")
    show = sent_while_down(h, room, ALICE, "!ai memory")
    h2 = await restart(make_surfaces, h)
    assert len(h2.app.rooms.all_rooms()) == 1  # no room was made
    [told_new] = for_command(h2, room, new)
    assert told_new["content"]["body"].startswith(f"`!ai new Research` {NOT_RUN}")
    [told_add] = for_command(h2, room, add)
    assert told_add["content"]["body"].startswith(f"`!ai memory add I like tea` {NOT_RUN}")
    [shown] = for_command(h2, room, show)
    assert shown["content"]["body"].startswith("You have no shared notes yet.")
    # In the order they were sent.
    assert [e["event_id"] for e in h2.client.messages(room)][-3:] == [
        told_new["event_id"], told_add["event_id"], shown["event_id"]
    ]


async def test_commands_answered_before_the_stop_are_not_caught_up(make_surfaces) -> None:
    h, room, backend = await onboarded(make_surfaces)
    await h.say(room, ALICE, "question")
    await h.say(room, ALICE, "!ai context")
    await h.say(room, ALICE, "!ai retry")  # its answer is its only trace
    backend.gate = asyncio.Event()  # the next answer is cancelled half-way
    await h.app.on_message(h.client.user_message(room, ALICE, "a long question"))
    for _ in range(100):  # until the answer is posted
        if len(h.client.bodies(room)) == 4:
            break
        await asyncio.sleep(0.01)
    await h.say(room, ALICE, "!ai cancel")  # its trace: the answer's ending
    await h.say(room, ALICE, "!ai reset")  # its trace: the reset notice
    await h.say(room, ALICE, "!ai system Be brief.")
    shown = h.client.bodies(room)
    assert shown[-1].startswith("This room's system prompt is set")
    h2 = await restart(make_surfaces, h)
    await h2.say(room, ALICE, "after")
    assert h2.client.bodies(room) == [*shown, "echo: after"]


async def test_a_command_in_a_dm_sent_while_down_is_answered_once(make_surfaces) -> None:
    h = await make_surfaces()
    dm = await invited_dm(h, ALICE)
    assert h.client.bodies(dm)[-1].startswith("Hi! I'm Surfaces")
    await h.app.stop()
    start = sent_while_down(h, dm, ALICE, "!ai start")
    h2 = await restart(make_surfaces, h)
    [reply] = for_command(h2, dm, start)
    assert reply["content"]["body"].startswith("Your Space is ready")
    assert len(h2.app.rooms.rooms_of(ALICE)) == 1
    shown = h2.client.bodies(dm)
    h3 = await restart(make_surfaces, h2)
    await h3.say(dm, ALICE, "!ai agents")
    assert h3.client.bodies(dm)[:-1] == shown
    assert h3.client.bodies(dm)[-1].startswith("**Agents**")


async def test_late_commands_get_the_live_refusals_once(make_surfaces) -> None:
    access = {"admins": [ADMIN]}
    h, room, _ = await onboarded(make_surfaces, access=access)
    admin_dm = await invited_dm(h, ADMIN)
    await h.say(admin_dm, ADMIN, f"!ai admin block {BOB}")
    await h.app.stop()
    guest = sent_while_down(h, room, CAROL, "!ai reset")  # in Alice's room
    blocked = sent_while_down(h, room, BOB, "!ai rooms")
    status = sent_while_down(h, room, ALICE, "!ai status")  # admins only
    help_ = sent_while_down(h, room, BOB, "!ai help")  # help answers anyone
    h2 = await restart(make_surfaces, h, access=access)
    assert [e["content"]["body"] for e in for_command(h2, room, guest)] == [
        "`!ai reset` works in one of your working rooms. Send `!ai rooms` to find them."
    ]
    assert [e["content"]["body"] for e in for_command(h2, room, blocked)] == [
        "Sorry, you are blocked from using this bot."
    ]
    assert [e["content"]["body"] for e in for_command(h2, room, status)] == [
        "`!ai status` is for admins only."
    ]
    [help_reply] = for_command(h2, room, help_)
    assert help_reply["content"]["body"].startswith("**Surfaces commands**")
    shown = h2.client.bodies(room)
    h3 = await restart(make_surfaces, h2, access=access)
    await h3.say(room, ALICE, "hi")
    assert h3.client.bodies(room) == [*shown, "echo: hi"]


async def test_a_command_from_before_the_start_delivered_live_is_late_too(make_surfaces) -> None:
    """maubot may deliver what was sent while the bot was down in a later sync: the command is
    still one that arrived while it was down (told once, not run), whichever path sees it."""
    h, room, _ = await onboarded(make_surfaces)
    await h.app.stop()
    evt = h.client.user_message(room, ALICE, "!ai archive")
    await asyncio.sleep(0.002)  # the restart begins a millisecond later
    h2 = await make_surfaces(h.client, settle=False)
    await h2.app.on_message(evt)  # delivered live, racing catch-up
    await h2.settle()
    [told] = for_command(h2, room, evt.event_id)
    assert told["content"]["body"].startswith(f"`!ai archive` {NOT_RUN}")
    assert not h2.app.rooms.room(room).archived
    await h2.say(room, ALICE, "!ai archive")  # sent now: run
    assert h2.last_reply(room).startswith("This room is archived")


async def test_stream_off_sent_while_down_is_told_and_showing_the_mode_is_run(
    make_surfaces,
) -> None:
    h, room, _ = await onboarded(make_surfaces)
    await h.app.stop()
    off = sent_while_down(h, room, ALICE, "!ai stream off")
    show = sent_while_down(h, room, ALICE, "!ai stream")
    h2 = await restart(make_surfaces, h)
    [told] = for_command(h2, room, off)
    assert told["content"]["body"].startswith(f"`!ai stream off` {NOT_RUN}")
    [shown] = for_command(h2, room, show)
    assert shown["content"]["body"].startswith("Streaming is on")  # the late `off` did not run
    assert h2.app.rooms.room(room).binding.stream is None
