"""Spaces and working rooms through commands, on the recording client."""

from __future__ import annotations

import asyncio

from surfaces_plugin import layout

from .fakes import FakeClient

ALICE = "@alice:localhost"
BOB = "@bob:localhost"
ADMIN = "@admin:localhost"

WRITER = {
    "agents": [
        {"id": "echo", "name": "Echo", "description": "echoes", "backend": "echo"},
        {"id": "writer", "name": "Writer", "description": "writes", "backend": "echo"},
    ]
}


def spaces_of(client: FakeClient, owner: str) -> list[str]:
    return [
        r.room_id for r in client.rooms.values()
        if r.create_content.get(layout.KIND_KEY) == "space"
        and r.create_content.get(layout.OWNER_KEY) == owner
    ]


def children(client: FakeClient, space_id: str) -> list[str]:
    return [
        key for (etype, key), (_, content) in client.rooms[space_id].state.items()
        if etype == "m.space.child" and content
    ]


async def test_start_creates_space_and_first_room_linked_both_ways(make_surfaces) -> None:
    h = await make_surfaces()
    dm = h.dm(ALICE)
    await h.say(dm, ALICE, "!ai start")
    assert "Your Space is ready" in h.last_reply(dm)
    [space] = spaces_of(h.client, ALICE)
    [room_id] = children(h.client, space)
    room = h.client.rooms[room_id]
    binding = layout.parse_binding(room.state[("org.surfaces.binding", "")][1])
    assert binding is not None and binding.owner == ALICE and binding.space_id == space
    assert binding.agent == "echo" and binding.platform_chat_id
    assert ("m.space.parent", space) in room.state
    assert h.client.rooms[space].members[ALICE] == "invite"
    assert room.members[ALICE] == "invite"


async def test_second_start_creates_nothing_and_reinvites(make_surfaces) -> None:
    h = await make_surfaces()
    dm = h.dm(ALICE)
    await h.say(dm, ALICE, "!ai start")
    [space] = spaces_of(h.client, ALICE)
    h.client.rooms[space].members[ALICE] = "leave"
    rooms_before = len(h.client.rooms)
    await h.say(dm, ALICE, "!ai start")
    assert "already exists" in h.last_reply(dm)
    assert len(h.client.rooms) == rooms_before
    assert h.client.rooms[space].members[ALICE] == "invite"


async def test_two_simultaneous_starts_make_one_space(make_surfaces) -> None:
    h = await make_surfaces()
    dm = h.dm(ALICE)
    await asyncio.gather(
        h.app.on_message(h.client.user_message(dm, ALICE, "!ai start")),
        h.app.on_message(h.client.user_message(dm, ALICE, "!ai start")),
    )
    await h.settle()
    assert len(spaces_of(h.client, ALICE)) == 1


async def test_new_with_agent_and_title_then_rooms_and_archive(make_surfaces) -> None:
    h = await make_surfaces(**WRITER)
    dm = h.dm(ALICE)
    await h.say(dm, ALICE, "!ai start")
    await h.say(dm, ALICE, "!ai new writer Draft of the essay")
    assert "New working room [Draft of the essay]" in h.last_reply(dm)
    [space] = spaces_of(h.client, ALICE)
    assert len(children(h.client, space)) == 2
    await h.say(dm, ALICE, "!ai rooms")
    listing = h.last_reply(dm)
    assert "General" in listing and "Draft of the essay" in listing and "`writer`" in listing
    assert "https://matrix.to/#/" in listing
    draft = next(r for r in h.app.rooms.all_rooms() if r.title == "Draft of the essay")
    await h.say(draft.room_id, ALICE, "!ai archive")
    assert "archived" in h.last_reply(draft.room_id)
    assert draft.room_id not in children(h.client, space)
    binding = layout.parse_binding(h.client.rooms[draft.room_id].state[("org.surfaces.binding", "")][1])
    assert binding is not None and binding.archived
    await h.say(dm, ALICE, "!ai rooms")
    assert "Draft of the essay" not in h.last_reply(dm)


async def test_new_without_agent_uses_default_and_words_as_title(make_surfaces) -> None:
    h = await make_surfaces(**WRITER)
    dm = h.dm(ALICE)
    await h.say(dm, ALICE, "!ai start")
    await h.say(dm, ALICE, "!ai new Plans for today")
    assert "[Plans for today]" in h.last_reply(dm) and "`echo`" in h.last_reply(dm)


async def test_new_before_start_and_too_long_title_explain(make_surfaces) -> None:
    h = await make_surfaces()
    dm = h.dm(ALICE)
    await h.say(dm, ALICE, "!ai new Hello")
    assert "You have no Space yet. Send `!ai start` first." == h.last_reply(dm)
    await h.say(dm, ALICE, "!ai new " + "x" * 81)
    reply = h.last_reply(dm)
    assert "the limit is 80" in reply and "Usage: `!ai new [agent] [title…]`" in reply


async def test_agent_switch_unknown_agent_lists_valid_ones(make_surfaces) -> None:
    h = await make_surfaces(**WRITER)
    dm = h.dm(ALICE)
    await h.say(dm, ALICE, "!ai start")
    [room] = h.app.rooms.all_rooms()
    await h.say(room.room_id, ALICE, "!ai agent nope")
    reply = h.last_reply(room.room_id)
    assert "There is no agent `nope`. Valid agents: `echo`, `writer`." in reply
    assert "Usage: `!ai agent <id>`" in reply
    await h.say(room.room_id, ALICE, "!ai agent")
    assert "Which agent?" in h.last_reply(room.room_id)
    await h.say(room.room_id, ALICE, "!ai agent writer")
    binding = layout.parse_binding(h.client.rooms[room.room_id].state[("org.surfaces.binding", "")][1])
    assert binding is not None and binding.agent == "writer"


async def test_permission_error_is_explained_without_traceback(make_surfaces) -> None:
    from mautrix.errors import MForbidden

    h = await make_surfaces()
    dm = h.dm(ALICE)
    h.client.fail_next["create_room"].append(MForbidden(403, "You are not allowed to create rooms"))
    await h.say(dm, ALICE, "!ai start")
    reply = h.last_reply(dm)
    assert "could not create your Space" in reply and "Traceback" not in reply


async def test_rate_limited_homeserver_is_retried(make_surfaces) -> None:
    h = await make_surfaces()
    h.app.io.gateway.base_delay_s = 0.01
    dm = h.dm(ALICE)
    h.client.rate_limit_next("create_room", times=2)
    await h.say(dm, ALICE, "!ai start")
    assert "Your Space is ready" in h.last_reply(dm)


async def test_allowlist_refuses_others(make_surfaces) -> None:
    h = await make_surfaces(access={"mode": "allowlist", "allowed": ["@alice:*"]})
    dm = h.dm(BOB)
    await h.say(dm, BOB, "!ai start")
    assert h.last_reply(dm) == "Sorry, this bot is not open to you."
    assert spaces_of(h.client, BOB) == []
    dm_a = h.dm(ALICE)
    await h.say(dm_a, ALICE, "!ai start")
    assert len(spaces_of(h.client, ALICE)) == 1


async def test_approval_flow(make_surfaces) -> None:
    h = await make_surfaces(access={"mode": "approval", "admins": [ADMIN]})
    dm = h.dm(BOB)
    await h.say(dm, BOB, "!ai start")
    assert "waiting for an admin's approval" in h.last_reply(dm)
    admin_dm = h.dm(ADMIN)
    await h.say(admin_dm, ADMIN, "!ai status")
    assert BOB in h.last_reply(admin_dm)
    await h.say(admin_dm, ADMIN, "!ai admin approve " + BOB)
    assert h.last_reply(admin_dm) == f"{BOB} is now approved."
    assert "You're approved" in h.last_reply(dm)
    decisions = layout.parse_access(h.client.account_data["org.surfaces.access"])
    assert decisions is not None and decisions.state_of(BOB) == "approved"
    await h.say(dm, BOB, "!ai start")
    assert len(spaces_of(h.client, BOB)) == 1
    await h.say(admin_dm, ADMIN, "!ai admin block " + BOB)
    await h.say(dm, BOB, "!ai rooms")
    assert h.last_reply(dm) == "Sorry, you are blocked from using this bot."


async def test_admin_usage_errors(make_surfaces) -> None:
    h = await make_surfaces(access={"admins": [ADMIN]})
    dm = h.dm(ADMIN)
    await h.say(dm, ADMIN, "!ai admin approve")
    assert "Usage: `!ai admin approve|block|unblock <@user>`" in h.last_reply(dm)
    await h.say(dm, ADMIN, "!ai admin approve bob")
    assert "is not a Matrix user id" in h.last_reply(dm)
