"""Commands sent while the bot is stopped, on a real Synapse: after the restart a command that
only shows something is answered, a state-changing one gets one "not run" notice; a second
restart sends neither again (issue 16)."""

from __future__ import annotations

import asyncio

import pytest

from devtools.e2e import BotFactory, MakeUser
from devtools.matrix_user import Event, MatrixUser
from surfaces_plugin import layout

from .test_restart import chat, onboard, restart

pytestmark = pytest.mark.e2e

NOT_RUN = "arrived while I was offline or restarting"


def for_command(user: MatrixUser, room_id: str, bot_id: str, command_id: str) -> list[Event]:
    """The bot's messages that say they were sent for the command `command_id`."""
    return [
        e
        for e in user.messages(room_id, sender=bot_id)
        if layout.parse_command_marker(e.get("content")) == command_id
    ]


async def test_commands_sent_while_stopped_are_answered_once(
    bot_factory: BotFactory, make_user: MakeUser
) -> None:
    bot = bot_factory()
    alice = await make_user()
    rooms = await onboard(alice, bot.user_id)
    await chat(alice, rooms.room, bot.user_id, "before")
    bot.stop()
    show = await alice.send_text(rooms.dm, "!ai rooms")
    new = await alice.send_text(rooms.dm, "!ai new Research")
    context = await alice.send_text(rooms.room, "!ai context")

    await asyncio.to_thread(bot.start)  # waits until the bot is ready
    shown = await alice.wait_for_notice(rooms.dm, "Your working rooms", bot.user_id, 30, after=show)
    told = await alice.wait_for_notice(rooms.dm, NOT_RUN, bot.user_id, 30, after=new)
    counted = await alice.wait_for_notice(rooms.room, "Context of the next", bot.user_id, 30)
    assert alice.latest_text(rooms.dm, shown).startswith("**Your working rooms** (1)")
    assert alice.latest_text(rooms.dm, told).startswith(f"`!ai new Research` {NOT_RUN}")
    assert [e["event_id"] for e in for_command(alice, rooms.dm, bot.user_id, show)] == [
        shown["event_id"]
    ]
    assert [e["event_id"] for e in for_command(alice, rooms.dm, bot.user_id, new)] == [
        told["event_id"]
    ]
    assert [e["event_id"] for e in for_command(alice, rooms.room, bot.user_id, context)] == [
        counted["event_id"]
    ]
    assert not alice.invites, "`!ai new` was not run: no room, no invite"

    before = {
        room_id: [e["event_id"] for e in alice.messages(room_id, sender=bot.user_id)]
        for room_id in (rooms.dm, rooms.room)
    }
    await restart(bot)
    # The positive signals that the restarted bot is up and caught up: fresh answers.
    await chat(alice, rooms.room, bot.user_id, "after")
    agents = await alice.send_text(rooms.dm, "!ai agents")
    listed = await alice.wait_for_notice(rooms.dm, "**Agents**", bot.user_id, 30, after=agents)
    assert [e["event_id"] for e in alice.messages(rooms.dm, sender=bot.user_id)] == [
        *before[rooms.dm],
        listed["event_id"],
    ]
    room_after = [e["event_id"] for e in alice.messages(rooms.room, sender=bot.user_id)]
    assert room_after[: len(before[rooms.room])] == before[rooms.room]
    assert len(room_after) == len(before[rooms.room]) + 1  # only the answer to "after"
