"""Restart reconciliation on a real Synapse: the bot process is stopped or killed and started again,
and what a user or operator sees afterwards is checked (contract §1, §3; reconciliation.md).

Each test drives its own bot account; Matrix is read as the bot (its access token) where the
layout is checked, and as the user where the user's view matters.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from devtools.e2e import BotFactory, MakeUser
from devtools.matrix_user import Event, MatrixUser, create_content
from devtools.maubot_server import MaubotServer
from devtools.maubot_standalone import SYNC_DONE, StandaloneBot
from devtools.procs import LogCursor
from devtools.synapse import SynapseServer
from surfaces_plugin import layout

pytestmark = pytest.mark.e2e

BINDING = layout.BINDING_TYPE
CHILD = layout.SPACE_CHILD_TYPE
TURN = layout.TURN_KEY
# maubot's own tables and mautrix's stores share the standalone SQLite file with the plugin.
# Cache columns that Matrix holds, so a rebuild must restore them exactly.
USER_COLUMNS = ("user_id", "space_id", "missing")
ROOM_COLUMNS = (
    "room_id",
    "kind",
    "owner",
    "space_id",
    "agent",
    "title",
    "platform_chat_id",
    "system_prompt",
    "archived",
    "order_key",
    "bot_membership",
    "missing",
)  # not owner_membership: the live cache never records it (only reconciliation does)
_DONE_RE = re.compile(
    r"Reconciliation done: \*\*Reconciliation\*\* \((?P<reason>[^)]*)\): "
    r"[\d.]+ s, (?P<writes>\d+) writes"
)


# ---------------------------------------------------------------------------------------------
# helpers


def _q(value: str) -> str:
    return quote(value, safe="")


def as_bot(bot: StandaloneBot, method: str, path: str, body: Any = None) -> Any:
    """A client-server call with the bot's own access token (raises on errors)."""
    status, data = bot.synapse.request(method, path, body, token=bot.access_token)
    assert status < 300, f"{method} {path} -> {status}: {data}"
    return data


def bot_state(bot: StandaloneBot, room_id: str, event_type: str, key: str = "") -> dict | None:
    """One state event's content as the bot reads it, None when absent."""
    path = f"/_matrix/client/v3/rooms/{_q(room_id)}/state/{_q(event_type)}/{_q(key)}"
    status, data = bot.synapse.request("GET", path, token=bot.access_token)
    if status == 404:
        return None
    assert status == 200, f"GET {path} -> {status}: {data}"
    return data


def bot_spaces(bot: StandaloneBot) -> list[str]:
    """Spaces the bot is joined to (by their create event)."""
    spaces = []
    for room_id in bot.synapse.joined_rooms(bot.access_token):
        create = bot_state(bot, room_id, "m.room.create") or {}
        if create.get("type") == "m.space":
            spaces.append(room_id)
    return spaces


def start_writes(log_text: str) -> list[int]:
    """Write counts of each start-up reconciliation logged so far, oldest first."""
    return [int(m["writes"]) for m in _DONE_RE.finditer(log_text) if m["reason"] == "start"]


def cache_rows(bot: StandaloneBot) -> dict[str, dict[str, dict[str, Any]]]:
    """The users and rooms rows (Matrix-restorable columns) by id."""
    result: dict[str, dict[str, dict[str, Any]]] = {}
    with sqlite3.connect(bot.data_dir / "bot.db") as conn:
        for table, columns in (("users", USER_COLUMNS), ("rooms", ROOM_COLUMNS)):
            rows = conn.execute(f"SELECT {', '.join(columns)} FROM {table}").fetchall()
            result[table] = {row[0]: dict(zip(columns[1:], row[1:], strict=True)) for row in rows}
    return result


def row_differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Readable differences between two `cache_rows` results."""
    diffs = []
    for table in before:
        for key in sorted(set(before[table]) | set(after[table])):
            old, new = before[table].get(key), after[table].get(key)
            if old is None or new is None:
                diffs.append(f"{table} {key}: {old} -> {new}")
                continue
            for column in old:
                if old[column] != new[column]:
                    diffs.append(f"{table} {key}.{column}: {old[column]!r} -> {new[column]!r}")
    return diffs


@dataclass
class Onboarded:
    dm: str
    space: str
    room: str


async def onboard(alice: MatrixUser, bot_id: str) -> Onboarded:
    """DM the bot, `!ai start`, accept both invites."""
    dm = await alice.open_dm(bot_id)
    await alice.wait_for_notice(dm, "!ai start", sender=bot_id)  # the greeting
    asked = await alice.send_text(dm, "!ai start")
    await alice.wait_for_notice(dm, "Space is ready", sender=bot_id, after=asked, timeout=15)
    space = await alice.wait_for_invite(lambda _, st: create_content(st).get("type") == "m.space")
    room = await alice.wait_for_invite(
        lambda _, st: create_content(st).get(layout.KIND_KEY) == "working"
    )
    await alice.join(space)
    await alice.join(room)
    return Onboarded(dm, space, room)


def answers(alice: MatrixUser, room_id: str, bot_id: str, after: str | None = None) -> list[Event]:
    """The bot's agent answers (original events carrying a turn marker) in a room."""
    return [
        e
        for e in alice.messages(room_id, sender=bot_id, after=after)
        if TURN in e.get("content", {})
    ]


async def chat(alice: MatrixUser, room_id: str, bot_id: str, text: str) -> Event:
    """Send a message and wait for the echo agent's complete answer to it."""
    sent = await alice.send_text(room_id, text)
    return await wait_answered(alice, room_id, bot_id, [text], after=sent, quiet=0.3)


async def wait_answered(
    alice: MatrixUser,
    room_id: str,
    bot_id: str,
    texts: list[str],
    after: str | None = None,
    timeout: float = 20.0,
    quiet: float = 1.0,
) -> Event:
    """Wait until the answers after `after` read `echo: <text>` for each text, in order, then
    for `quiet` seconds more, and check nothing was answered twice. Returns the last answer."""
    expected = [f"echo: {t}" for t in texts]

    def done() -> bool:
        got = [alice.latest_text(room_id, e) for e in answers(alice, room_id, bot_id, after)]
        return len(got) >= len(expected) and got[-1] == expected[-1]

    await alice.wait_until(done, timeout, what=f"answers {expected}")
    await asyncio.sleep(quiet)
    got = [alice.latest_text(room_id, e) for e in answers(alice, room_id, bot_id, after)]
    assert got == expected, "each message answered once, in order"
    return answers(alice, room_id, bot_id, after)[-1]


async def restart(bot: StandaloneBot, kill: bool = False) -> None:
    (bot.kill if kill else bot.stop)()
    await asyncio.to_thread(bot.start)


# ---------------------------------------------------------------------------------------------
# T1 / T17: the plugin database is lost


async def test_wiped_database_is_rebuilt_from_matrix(
    bot_factory: BotFactory, make_user: MakeUser
) -> None:
    bot = bot_factory()
    alice = await make_user()
    rooms = await onboard(alice, bot.user_id)
    await chat(alice, rooms.room, bot.user_id, "hello")
    replies = await alice.command(rooms.dm, "!ai new echo Second", bot.user_id)
    assert any("New working room" in r for r in replies), replies
    second = await alice.wait_for_invite()
    await alice.join(second)
    await chat(alice, second, bot.user_id, "hi second")
    before = cache_rows(bot)
    listed_before = await alice.command(rooms.dm, "!ai rooms", bot.user_id)
    assert len(before["rooms"]) == 3  # the Space and two working rooms

    bot.stop()
    dropped = bot.drop_plugin_tables()
    assert {"users", "rooms", "version"} <= set(dropped), dropped
    await asyncio.to_thread(bot.start)

    assert not row_differences(before, cache_rows(bot))
    listed_after = await alice.command(rooms.dm, "!ai rooms", bot.user_id)
    # Same rooms, titles, agents and links. Last activity is rebuilt from each room's timeline
    # (its newest event, which may be a little later than the cached time): known, not "never".
    assert "last activity never" not in listed_after[0], listed_after
    strip = re.compile(r" · last activity .*")
    assert [strip.sub("", t) for t in listed_after] == [strip.sub("", t) for t in listed_before]
    for room_id in (rooms.room, second):
        assert quote(room_id, safe="") in listed_after[0]
    # Conversations go on: answered once, nothing old answered again.
    await chat(alice, rooms.room, bot.user_id, "after the wipe")
    assert [alice.latest_text(rooms.room, e) for e in answers(alice, rooms.room, bot.user_id)] == [
        "echo: hello",
        "echo: after the wipe",
    ]
    # Matrix was already right: the restart wrote nothing.
    assert start_writes(bot.log_text())[-1] == 0


# ---------------------------------------------------------------------------------------------
# T2 / T3 / T6: a crash mid-onboarding left a Space and a room without cache rows or link


def _create_body(request: dict[str, Any]) -> dict[str, Any]:
    """layout's mautrix create_room kwargs as a client-server createRoom body."""
    body = {
        "preset": str(request["preset"].value),
        "room_version": request["room_version"],
        "creation_content": request["creation_content"],
        "initial_state": request["initial_state"],
        "power_level_content_override": request["power_level_override"],
        "invite": request["invitees"],
    }
    if request.get("name"):
        body["name"] = request["name"]
    return body


async def test_crash_mid_onboarding_is_adopted_and_linked(
    bot_factory: BotFactory, make_user: MakeUser
) -> None:
    bot = bot_factory()
    alice = await make_user()
    dm = await alice.open_dm(bot.user_id)
    bot.kill()
    # What onboarding had done when it crashed: both rooms created, nothing recorded or linked.
    server = bot.user_id.split(":", 1)[1]
    caps = as_bot(bot, "GET", "/_matrix/client/v3/capabilities")
    version = caps["capabilities"]["m.room_versions"]["default"]
    space_req = layout.space_create_request(
        alice.user_id, "alice's agents", bot.user_id, server, version
    )
    space = as_bot(bot, "POST", "/_matrix/client/v3/createRoom", _create_body(space_req))["room_id"]
    binding = layout.Binding(
        owner=alice.user_id,
        space_id=space,
        agent="echo",
        title="General",
        platform_chat_id="echo-crashed-onboarding",
    )
    room_req = layout.working_room_create_request(
        alice.user_id, space, binding, bot.user_id, server, version
    )
    room = as_bot(bot, "POST", "/_matrix/client/v3/createRoom", _create_body(room_req))["room_id"]
    assert bot_state(bot, space, CHILD, room) is None

    await asyncio.to_thread(bot.start)

    link = bot_state(bot, space, CHILD, room)
    assert link is not None and link.get("via") == [server], link
    # The owner, never invited before the crash, is invited to both now.
    await alice.wait_for_invite(lambda rid, _: rid == space, timeout=15)
    await alice.wait_for_invite(lambda rid, _: rid == room, timeout=15)
    replies = await alice.command(dm, "!ai start", bot.user_id)
    assert any("already exists" in r for r in replies), replies
    assert bot_spaces(bot) == [space]
    await alice.join(room)
    await chat(alice, room, bot.user_id, "after the crash")
    answer = answers(alice, room, bot.user_id)[-1]
    assert answer["content"][TURN]["platform_chat_id"] == "echo-crashed-onboarding"

    # T6-style idempotence: the repairs are done, a second restart writes nothing.
    writes_first = start_writes(bot.log_text())[-1]
    assert writes_first >= 3  # the link and two invites
    await restart(bot)
    assert start_writes(bot.log_text())[-1] == 0


# ---------------------------------------------------------------------------------------------
# T10 / T11 and the older layout: while the bot was down it upgraded one room (followed), another
# room's binding lost its platform_chat_id (given one); a user's fakes are ignored.


def _put_binding(bot: StandaloneBot, room_id: str, content: dict[str, Any]) -> None:
    as_bot(bot, "PUT", f"/_matrix/client/v3/rooms/{_q(room_id)}/state/{_q(BINDING)}/", content)


async def test_upgrade_and_older_binding_followed_fakes_ignored(
    bot_factory: BotFactory, make_user: MakeUser
) -> None:
    alice = await make_user()
    bot = bot_factory({"access": {"admins": [alice.user_id]}})
    rooms = await onboard(alice, bot.user_id)
    await chat(alice, rooms.room, bot.user_id, "before the upgrade")
    pcid = (bot_state(bot, rooms.room, BINDING) or {})["platform_chat_id"]
    asked = await alice.send_text(rooms.dm, "!ai new echo Older")
    await alice.wait_for_notice(rooms.dm, "New working room", sender=bot.user_id, after=asked)
    older_room = await alice.wait_for_invite()
    await alice.join(older_room)
    # Alice has no power over the layout of her working room.
    tombstone = {"body": "moved", "replacement_room": rooms.dm}
    assert await alice.send_state(rooms.room, "m.room.tombstone", "", tombstone) == 403
    assert await alice.send_state(rooms.room, BINDING, "", {"v": 1}) == 403

    bot.stop()
    caps = as_bot(bot, "GET", "/_matrix/client/v3/capabilities")["capabilities"]
    upgrade = {"new_version": caps["m.room_versions"]["default"]}
    path = f"/_matrix/client/v3/rooms/{_q(rooms.room)}/upgrade"
    new = as_bot(bot, "POST", path, upgrade)["replacement_room"]
    older = {
        k: v
        for k, v in (bot_state(bot, older_room, BINDING) or {}).items()
        if k != "platform_chat_id"
    }
    _put_binding(bot, older_room, older)
    await asyncio.to_thread(bot.start)

    # The upgrade is followed: binding copied, the Space links the new room instead of the old.
    binding = bot_state(bot, new, BINDING)
    assert binding is not None and binding["platform_chat_id"] == pcid
    assert binding["space_id"] == rooms.space
    new_link = bot_state(bot, rooms.space, CHILD, new)
    assert new_link is not None and new_link.get("via"), new_link
    assert "via" not in (bot_state(bot, rooms.space, CHILD, rooms.room) or {})
    await alice.wait_for_invite(lambda rid, _: rid == new, timeout=15)
    await alice.join(new)
    answer = await chat(alice, new, bot.user_id, "after the upgrade")
    assert answer["content"][TURN]["platform_chat_id"] == pcid
    # (The old room is read-only now: Synapse raised its events_default.)

    # The older binding got a platform_chat_id, written back into the state event.
    given = (bot_state(bot, older_room, BINDING) or {}).get("platform_chat_id")
    assert isinstance(given, str) and given and given != pcid
    assert bot_state(bot, older_room, BINDING) == {**older, "platform_chat_id": given}
    answer = await chat(alice, older_room, bot.user_id, "still there?")
    assert answer["content"][TURN]["platform_chat_id"] == given

    # A room alice made, with a fake binding and tombstone of her own: never ours.
    fake = await alice.create_room(preset="private_chat", name="fake", invite=[bot.user_id])
    await alice.wait_for_membership(fake, bot.user_id, "join", timeout=15)
    assert await alice.send_state(fake, BINDING, "", {**binding, "title": "fake"}) == 200
    tombstone = {"body": "moved", "replacement_room": new}
    assert await alice.send_state(fake, "m.room.tombstone", "", tombstone) == 200
    report = "\n".join(await alice.command(rooms.dm, "!ai reconcile", bot.user_id, timeout=20))
    assert "0 writes" in report, report
    assert f"{fake}: {BINDING} by {alice.user_id}" in report, report  # listed as ignored
    assert "adopted: 0" in report, report
    await alice.send_text(fake, "hello fake")
    await chat(alice, new, bot.user_id, "still routed")
    await asyncio.sleep(0.5)
    assert not any(
        alice.latest_text(fake, e).startswith("echo:")
        for e in alice.messages(fake, sender=bot.user_id)
    )

    # Stable across another restart: same ids, nothing to write.
    await restart(bot)
    assert (bot_state(bot, older_room, BINDING) or {}).get("platform_chat_id") == given
    assert (bot_state(bot, new, BINDING) or {}).get("platform_chat_id") == pcid
    assert start_writes(bot.log_text())[-1] == 0


# ---------------------------------------------------------------------------------------------
# catch-up: messages sent while the bot was down, and during its start


async def test_messages_while_down_and_during_start_answered_once(
    bot_factory: BotFactory, make_user: MakeUser
) -> None:
    bot = bot_factory({"reconciliation": {"concurrency": 1}})
    alice = await make_user()
    rooms = await onboard(alice, bot.user_id)
    first = await chat(alice, rooms.room, bot.user_id, "before")
    bot.kill()
    for text in ("one", "two", "three"):
        await alice.send_text(rooms.room, text)

    cursor = LogCursor(bot.log_path)
    starting = asyncio.create_task(asyncio.to_thread(bot.start))
    # Once the bot's first sync (which maubot drops) is over, while the plugin is still
    # starting, one more message: it arrives live during reconciliation.
    while not starting.done():
        text = cursor.new_text()
        if "Starting plugin" in text and SYNC_DONE in text.split("Starting plugin", 1)[1]:
            break
        await asyncio.sleep(0.01)
    await alice.send_text(rooms.room, "four")
    await starting

    await wait_answered(
        alice,
        rooms.room,
        bot.user_id,
        ["one", "two", "three", "four"],
        after=first["event_id"],
        quiet=1.0,
    )
    await chat(alice, rooms.room, bot.user_id, "five")
    texts = [alice.latest_text(rooms.room, e) for e in answers(alice, rooms.room, bot.user_id)]
    assert texts == [f"echo: {t}" for t in ("before", "one", "two", "three", "four", "five")]


# ---------------------------------------------------------------------------------------------
# the full maubot server (drops its first sync): a message sent while it was down


async def test_full_server_answers_message_sent_while_down(
    synapse: SynapseServer, maubot_server: MaubotServer, surfaces_mbp: Path, make_user: MakeUser
) -> None:
    maubot_server.upload_plugin(surfaces_mbp)
    bot = maubot_server.register_bot()
    maubot_server.create_instance("surfaces", bot, "org.surfaces.bot")
    alice = await make_user()
    rooms = await onboard(alice, bot)
    first = await chat(alice, rooms.room, bot, "hello server")

    maubot_server.stop()
    await alice.send_text(rooms.room, "sent while down")
    cursor = LogCursor(maubot_server.log_path)
    await asyncio.to_thread(maubot_server.restart)
    await asyncio.to_thread(maubot_server.wait_instance_started, "surfaces", cursor)

    await wait_answered(
        alice, rooms.room, bot, ["sent while down"], after=first["event_id"], quiet=1.0
    )
    await chat(alice, rooms.room, bot, "and live again")
