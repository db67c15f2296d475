"""Spaces and access on a real Synapse: `!ai start`/`new`/`rooms`/`archive`, the Matrix layout
they leave behind, power levels that keep users from forging it, and the access modes."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from devtools.e2e import BotFactory, MakeUser
from devtools.matrix_user import MatrixUser, room_kind
from devtools.maubot_standalone import StandaloneBot
from devtools.synapse import SynapseServer
from tests.e2e.conftest import PLUGIN_DIR, watched

pytestmark = pytest.mark.e2e

ECHO_AGENT = {
    "id": "echo",
    "name": "Echo",
    "description": "Repeats what you say.",
    "backend": "echo",
    "model": "",
    "system_prompt": "You are a helpful assistant.",
    "context_tokens": 4096,
    "temperature": 0.7,
}
WRITER_AGENT = {**ECHO_AGENT, "id": "writer", "name": "Writer", "description": "Drafts prose."}
TWO_AGENTS = {"agents": [ECHO_AGENT, WRITER_AGENT], "default_agent": "echo"}


@pytest.fixture(scope="module")
def module_bot(
    synapse: SynapseServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StandaloneBot]:
    """One open-mode bot with the echo and writer agents for the tests that need no special
    access config (each test uses fresh users, so they stay independent)."""
    data_dir = tmp_path_factory.mktemp("spaces-bot")
    with StandaloneBot(synapse, TWO_AGENTS, data_dir=data_dir, repo_root=PLUGIN_DIR) as bot:
        yield bot


@pytest.fixture
def bot(module_bot: StandaloneBot, request: pytest.FixtureRequest) -> StandaloneBot:
    return watched(request, module_bot)


# -- helpers -----------------------------------------------------------------------------------


async def wait_invite_of_kind(user: MatrixUser, kind: str, timeout: float = 10.0) -> str:
    return await user.wait_for_invite(lambda _rid, state: room_kind(state) == kind, timeout=timeout)


async def greeted_dm(user: MatrixUser, bot: StandaloneBot) -> str:
    """A DM with the bot, once its greeting arrived (so it is not taken for a later reply)."""
    dm = await user.open_dm(bot.user_id)
    await user.wait_for_notice(dm, "Hi! I'm Surfaces", sender=bot.user_id)
    return dm


async def onboard(user: MatrixUser, bot: StandaloneBot) -> tuple[str, str, str]:
    """DM the bot, `!ai start`, accept both invites: (dm, space id, first working room id)."""
    dm = await greeted_dm(user, bot)
    replies = await user.command(dm, "!ai start", bot.user_id)
    assert any("Space is ready" in text for text in replies), replies
    space_id = await wait_invite_of_kind(user, "space")
    room_id = await wait_invite_of_kind(user, "working")
    await user.join(space_id)
    await user.join(room_id)
    return dm, space_id, room_id


async def space_children(user: MatrixUser, space_id: str) -> dict[str, dict[str, Any]]:
    """state_key → content of every m.space.child in the Space (including removed ones: {})."""
    return {
        e["state_key"]: e.get("content", {})
        for e in await user.get_state(space_id)
        if e.get("type") == "m.space.child"
    }


async def bot_answers(
    user: MatrixUser, room_id: str, bot: str, text: str, wait: float
) -> list[str]:
    """Send text; the bot's messages after it within `wait` seconds (none is a valid outcome)."""
    sent = await user.send_text(room_id, text)
    await asyncio.sleep(wait)
    return [user.latest_text(room_id, e) for e in user.messages(room_id, bot, after=sent)]


# -- tests -------------------------------------------------------------------------------------


async def test_start_creates_space_and_room_with_layout(
    bot: StandaloneBot, make_user: MakeUser, synapse: SynapseServer
) -> None:
    alice = await make_user()
    dm = await greeted_dm(alice, bot)

    replies = await alice.command(dm, "!ai start", bot.user_id)
    assert len(replies) == 1 and "Space is ready" in replies[0], replies
    greetings = [
        e for e in alice.messages(dm, bot.user_id) if "Hi! I'm" in alice.latest_text(dm, e)
    ]
    assert len(greetings) == 1, "the invite was handled more than once"

    # Invites: one Space and one working room, whose create events carry the markers.
    space_id = await wait_invite_of_kind(alice, "space")
    room_id = await wait_invite_of_kind(alice, "working")
    assert space_id in replies[0] or space_id.replace("!", "%21") in replies[0]
    await alice.join(space_id)
    await alice.join(room_id)

    space_create = await alice.get_state_event(space_id, "m.room.create")
    assert space_create is not None
    assert space_create["type"] == "m.space"
    assert space_create["org.surfaces.kind"] == "space"
    assert space_create["org.surfaces.owner"] == alice.user_id
    assert space_create["org.surfaces.v"] == 1
    room_create = await alice.get_state_event(room_id, "m.room.create")
    assert room_create is not None
    assert room_create["org.surfaces.kind"] == "working"
    assert room_create["org.surfaces.owner"] == alice.user_id
    assert room_create.get("type") != "m.space"

    # Linked both ways.
    children = await space_children(alice, space_id)
    assert list(children) == [room_id]
    assert children[room_id]["via"] == [synapse.server_name]
    parent = await alice.get_state_event(room_id, "m.space.parent", space_id)
    assert parent is not None and parent["canonical"] is True and parent["via"]

    binding = await alice.get_state_event(room_id, "org.surfaces.binding")
    assert binding is not None
    assert binding["v"] == 1
    assert binding["owner"] == alice.user_id
    assert binding["space_id"] == space_id
    assert binding["agent"] == "echo"
    assert isinstance(binding["platform_chat_id"], str) and binding["platform_chat_id"]
    assert binding["title"] == "General"
    assert not binding.get("archived")

    # A second start creates nothing and says the Space exists.
    bot_rooms = set(synapse.joined_rooms(bot.access_token))
    again = await alice.command(dm, "!ai start", bot.user_id)
    assert len(again) == 1 and "already exists" in again[0], again
    assert set(synapse.joined_rooms(bot.access_token)) == bot_rooms
    assert list(await space_children(alice, space_id)) == [room_id]
    assert not alice.invites

    # !ai new writer Draft: a second room with that agent and title.
    replies = await alice.command(dm, "!ai new writer Draft", bot.user_id)
    assert len(replies) == 1 and "Draft" in replies[0] and "writer" in replies[0], replies
    draft_id = await wait_invite_of_kind(alice, "working")
    assert draft_id != room_id
    await alice.join(draft_id)
    draft = await alice.get_state_event(draft_id, "org.surfaces.binding")
    assert draft is not None
    assert (draft["agent"], draft["title"], draft["space_id"]) == ("writer", "Draft", space_id)
    assert draft["platform_chat_id"] != binding["platform_chat_id"]
    name = await alice.get_state_event(draft_id, "m.room.name")
    assert name is not None and name["name"] == "Draft"
    children = await space_children(alice, space_id)
    assert set(children) == {room_id, draft_id} and children[draft_id]["via"]
    parent = await alice.get_state_event(draft_id, "m.space.parent", space_id)
    assert parent is not None and parent["canonical"] is True

    # !ai rooms lists both.
    (listing,) = await alice.command(dm, "!ai rooms", bot.user_id)
    assert "General" in listing and "Draft" in listing
    assert "`echo`" in listing and "`writer`" in listing

    # Draft answers before it is archived...
    answers = await alice.command(draft_id, "before archive", bot.user_id)
    assert answers == ["echo: before archive"]

    # ...and !ai archive unlinks it, marks the binding, and stops routing.
    (archived,) = await alice.command(draft_id, "!ai archive", bot.user_id)
    assert "archived" in archived
    children = await space_children(alice, space_id)
    assert children[draft_id] == {}
    assert children[room_id].get("via")
    draft = await alice.get_state_event(draft_id, "org.surfaces.binding")
    assert draft is not None and draft.get("archived") is True
    assert await bot_answers(alice, draft_id, bot.user_id, "after archive", wait=1.5) == []

    # The first room still answers, and rooms no longer lists the archived one.
    assert await alice.command(room_id, "still here", bot.user_id) == ["echo: still here"]
    (listing,) = await alice.command(dm, "!ai rooms", bot.user_id)
    assert "General" in listing and "Draft" not in listing


async def test_users_cannot_forge_layout_state(bot: StandaloneBot, make_user: MakeUser) -> None:
    alice = await make_user()
    _dm, space_id, room_id = await onboard(alice, bot)
    binding = await alice.get_state_event(room_id, "org.surfaces.binding")
    assert binding is not None

    room_power = await alice.get_state_event(room_id, "m.room.power_levels")
    space_power = await alice.get_state_event(space_id, "m.room.power_levels")
    assert room_power is not None and space_power is not None

    def promoted(power: dict[str, Any]) -> dict[str, Any]:
        return {**power, "users": {**power.get("users", {}), alice.user_id: 100}}

    forged = {**binding, "agent": "something-else", "owner": "@mallory:localhost"}
    other = "!other:localhost"
    attempts = [
        (room_id, "org.surfaces.binding", "", forged),
        (space_id, "org.surfaces.binding", "", forged),
        (space_id, "m.space.child", other, {"via": ["localhost"]}),
        (space_id, "m.space.child", room_id, {}),  # unlinking her own room
        (room_id, "m.space.parent", space_id, {}),
        (room_id, "m.space.parent", other, {"via": ["localhost"], "canonical": True}),
        (room_id, "m.room.power_levels", "", promoted(room_power)),
        (space_id, "m.room.power_levels", "", promoted(space_power)),
        (space_id, "org.surfaces.memory", "", {"v": 1, "notes": ["planted"]}),
    ]
    for target, event_type, state_key, content in attempts:
        status = await alice.send_state(target, event_type, state_key, content)
        assert status == 403, f"{event_type}/{state_key!r} in {target}: HTTP {status}"

    # Nothing changed, and the owner can still chat.
    assert await alice.get_state_event(room_id, "org.surfaces.binding") == binding
    assert list(await space_children(alice, space_id)) == [room_id]
    answers = await alice.command(room_id, "hello", bot.user_id)
    assert answers == ["echo: hello"]


async def test_simultaneous_starts_make_one_space(
    bot: StandaloneBot, make_user: MakeUser, synapse: SynapseServer
) -> None:
    carol = await make_user()
    dm = await greeted_dm(carol, bot)
    before = set(synapse.joined_rooms(bot.access_token))

    # Both sent before either is answered.
    await asyncio.gather(carol.send_text(dm, "!ai start"), carol.send_text(dm, "!ai start"))

    def start_replies() -> list[str]:
        texts = [carol.latest_text(dm, e) for e in carol.messages(dm, bot.user_id)]
        return [t for t in texts if "Space is ready" in t or "already exists" in t]

    await carol.wait_until(lambda: len(start_replies()) >= 2, timeout=15, what="two replies")
    await asyncio.sleep(0.5)  # a second Space's invites would show up by now
    kinds = sorted("ready" if "Space is ready" in t else "exists" for t in start_replies())
    assert kinds == ["exists", "ready"], start_replies()

    spaces = [rid for rid, state in carol.invites.items() if room_kind(state) == "space"]
    rooms = [rid for rid, state in carol.invites.items() if room_kind(state) == "working"]
    assert len(spaces) == 1 and len(rooms) == 1, carol.invites
    new_bot_rooms = set(synapse.joined_rooms(bot.access_token)) - before
    assert new_bot_rooms == {spaces[0], rooms[0]}


async def test_allowlist_refuses_and_declines(
    bot_factory: BotFactory, make_user: MakeUser, synapse: SynapseServer
) -> None:
    alice = await make_user()
    bot = bot_factory({"access": {"mode": "allowlist", "allowed": [alice.user_id], "admins": []}})
    bob = await make_user()

    # Bob's DM invite is declined: the bot ends up not in the room.
    bob_dm = await bob.create_dm(bot.user_id)
    await bob.wait_for_membership(bob_dm, bot.user_id, "leave", timeout=10)
    assert bob_dm not in synapse.joined_rooms(bot.access_token)

    # Alice is allowed; in a room shared with bob, bob's `!ai start` is refused.
    alice_dm = await greeted_dm(alice, bot)
    shared = await alice.create_room(preset="private_chat", invite=[bot.user_id, bob.user_id])
    await alice.wait_for_membership(shared, bot.user_id, "join", timeout=10)
    await bob.join(shared)
    before = set(synapse.joined_rooms(bot.access_token))
    replies = await bob.command(shared, "!ai start", bot.user_id)
    assert len(replies) == 1 and "not open to you" in replies[0], replies
    await asyncio.sleep(0.5)
    assert set(synapse.joined_rooms(bot.access_token)) == before
    assert not bob.invites
    (rooms_reply,) = await bob.command(shared, "!ai rooms", bot.user_id)
    assert "not open to you" in rooms_reply

    # Alice, on the list, gets her Space.
    replies = await alice.command(alice_dm, "!ai start", bot.user_id)
    assert any("Space is ready" in t for t in replies), replies
    await wait_invite_of_kind(alice, "space")


async def test_approval_flow(
    bot_factory: BotFactory, make_user: MakeUser, synapse: SynapseServer
) -> None:
    admin = await make_user()
    bot = bot_factory({"access": {"mode": "approval", "allowed": [], "admins": [admin.user_id]}})
    bob = await make_user()
    admin_dm = await greeted_dm(admin, bot)
    bob_dm = await greeted_dm(bob, bot)

    before = set(synapse.joined_rooms(bot.access_token))
    (waiting,) = await bob.command(bob_dm, "!ai start", bot.user_id)
    assert "waiting for an admin's approval" in waiting
    assert set(synapse.joined_rooms(bot.access_token)) == before and not bob.invites

    (status,) = await admin.command(admin_dm, "!ai status", bot.user_id)
    assert "waiting for approval" in status and bob.user_id in status
    # A non-admin cannot approve (bob is not an admin, and not even approved).
    (denied,) = await bob.command(bob_dm, f"!ai admin approve {bob.user_id}", bot.user_id)
    assert "waiting for an admin's approval" in denied and "is now approved" not in denied

    (done,) = await admin.command(admin_dm, f"!ai admin approve {bob.user_id}", bot.user_id)
    assert f"{bob.user_id} is now approved" in done
    await bob.wait_for_notice(bob_dm, "You're approved", sender=bot.user_id)

    replies = await bob.command(bob_dm, "!ai start", bot.user_id)
    assert any("Space is ready" in t for t in replies), replies
    space_id = await wait_invite_of_kind(bob, "space")
    await bob.join(space_id)
    create = await bob.get_state_event(space_id, "m.room.create")
    assert create is not None and create["org.surfaces.owner"] == bob.user_id
