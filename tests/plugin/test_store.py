"""The plugin database behaves the same on SQLite and PostgreSQL (each test runs on both)."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3

import pytest
from asyncpg.exceptions import CheckViolationError
from mautrix.util.async_db import Database, UnsupportedDatabaseVersion

from surfaces_plugin.layout import Binding
from surfaces_plugin.store import (
    Chat,
    DuplicateEventError,
    Room,
    Stores,
    User,
    upgrade_table,
)
from surfaces_plugin.store.migrations import CACHE_TABLES

ALICE = "@alice:example.org"
BOB = "@bob:example.org"
TABLES = CACHE_TABLES


def working_room(
    room_id: str, owner: str = ALICE, *, title: str = "", system_prompt: str | None = None,
    archived: bool = False, **kw: object
) -> Room:
    binding = Binding(
        owner=owner,
        space_id="!space",
        agent="echo",
        title=title or f"room {room_id}",
        platform_chat_id=f"chat-{room_id}",
        system_prompt=system_prompt,
        archived=archived,
    )
    return Room(room_id=room_id, kind="working", owner=owner, binding=binding, **kw)  # type: ignore[arg-type]


async def owned_rooms(stores: Stores, owner: str, **kw: object) -> list[str]:
    return [r.room_id for r in await stores.rooms.list_all(**kw) if r.owner == owner]  # type: ignore[arg-type]


# --- migrations ---------------------------------------------------------------------------


async def test_migrations_create_every_table(db: Database) -> None:
    for table in TABLES:
        # Not db.table_exists(): on Postgres it looks in every schema, not just ours.
        assert await db.fetchval(f"SELECT COUNT(*) FROM {table}") == 0, table
    assert await db.fetchval("SELECT version FROM version") == len(upgrade_table.upgrades)


async def test_running_migrations_again_is_a_noop_and_keeps_data(db_factory, stores) -> None:
    await stores.processed.mark("!r", "$kept", 1)
    reopened = await db_factory.open()  # a restart: the upgrade table runs again
    assert await Stores(reopened).processed.get("!r") is not None
    assert await reopened.fetchval("SELECT version FROM version") == len(upgrade_table.upgrades)


async def test_database_newer_than_code_refuses_to_start(db_factory, db) -> None:
    await db.execute("UPDATE version SET version=$1", len(upgrade_table.upgrades) + 5)
    with pytest.raises(UnsupportedDatabaseVersion):
        await db_factory.open()


# --- users --------------------------------------------------------------------------------


async def test_user_round_trip_with_bools(stores: Stores) -> None:
    user = User(
        user_id=ALICE,
        space_id="!space",
        access_state="approved",
        access_by="@admin:example.org",
        access_ts=1_700_000_000_123,
        dm_room_id="!dm",
        missing=True,
        updated_at=1_700_000_000_456,
    )
    await stores.users.upsert_many([user])
    got = await stores.users.get(ALICE)
    assert got == user
    assert got is not None and got.missing is True
    assert await stores.users.get(BOB) is None


async def test_user_defaults_and_updated_at_stamped(stores: Stores) -> None:
    await stores.users.upsert_many([User(user_id=BOB)])
    got = await stores.users.get(BOB)
    assert got is not None
    assert got.missing is False and got.access_state is None
    assert isinstance(got.updated_at, int) and got.updated_at > 1_600_000_000_000


async def test_set_access_creates_then_updates_the_user(stores: Stores) -> None:
    await stores.users.set_access(ALICE, "pending", ts=5)
    await stores.users.set_space(ALICE, "!space")
    await stores.users.set_access(ALICE, "approved", by="@admin:x", ts=10)
    got = await stores.users.get(ALICE)
    assert got is not None
    assert (got.access_state, got.access_by, got.access_ts, got.space_id) == (
        "approved",
        "@admin:x",
        10,
        "!space",
    )
    with pytest.raises(ValueError):
        await stores.users.set_access(ALICE, "maybe")  # type: ignore[arg-type]


async def test_upsert_keeps_a_known_dm_room(stores: Stores) -> None:
    await stores.users.set_dm_room(ALICE, "!dm")
    await stores.users.upsert_many([User(user_id=ALICE, space_id="!space")])
    got = await stores.users.get(ALICE)
    assert got is not None and got.dm_room_id == "!dm" and got.space_id == "!space"
    await stores.users.set_dm_room(ALICE, None)
    got = await stores.users.get(ALICE)
    assert got is not None and got.dm_room_id is None


# --- rooms --------------------------------------------------------------------------------


async def test_room_round_trip_with_bools(stores: Stores) -> None:
    room = working_room(
        "!r1",
        system_prompt="be brief",
        archived=True,
        order_key="a",
        bot_membership="lost",
        owner_membership="leave",
        last_activity_ms=1_700_000_000_999,
        created_ms=1_600_000_000_000,
    )
    await stores.rooms.upsert(room)
    got = await stores.rooms.get("!r1")
    assert got == room
    assert got is not None and got.binding is not None
    assert got.binding.archived is True and got.missing is False
    assert got.binding.system_prompt == "be brief"
    space = Room(room_id="!space", kind="space", owner=ALICE)
    await stores.rooms.upsert(space)
    assert await stores.rooms.get("!space") == space  # a Space has no binding


async def test_rooms_list_in_space_order_with_filters(stores: Stores) -> None:
    await stores.rooms.upsert(Room(room_id="!space", kind="space", owner=ALICE))
    await stores.rooms.upsert(working_room("!c", order_key=None, created_ms=1))
    await stores.rooms.upsert(working_room("!b", order_key="b"))
    await stores.rooms.upsert(working_room("!a", order_key="a", archived=True))
    await stores.rooms.upsert(working_room("!m", order_key="c", missing=True))
    await stores.rooms.upsert(working_room("!bob", owner=BOB))

    ids = await owned_rooms(stores, ALICE, kind="working")
    assert ids == ["!a", "!b", "!c"]  # NULL order keys last on both engines
    everything = await owned_rooms(stores, ALICE, include_missing=True)
    assert set(everything) == {"!space", "!a", "!b", "!c", "!m"}
    assert [r.room_id for r in await stores.rooms.list_all(kind="space")] == ["!space"]


async def test_last_activity_only_moves_forward(stores: Stores) -> None:
    await stores.rooms.upsert(working_room("!r"))
    await stores.rooms.upsert(working_room("!r", last_activity_ms=200))
    await stores.rooms.upsert(working_room("!r", last_activity_ms=100))
    got = await stores.rooms.get("!r")
    assert got is not None and got.last_activity_ms == 200
    # A rebuilt row does not know the activity: the stored value stays.
    await stores.rooms.upsert(working_room("!r", title="renamed"))
    got = await stores.rooms.get("!r")
    assert got is not None and got.last_activity_ms == 200
    assert got.binding is not None and got.binding.title == "renamed"


# --- chats --------------------------------------------------------------------------------


async def test_chat_round_trip_summary_and_archive(stores: Stores) -> None:
    chat = Chat(platform_chat_id="c1", room_id="!r", agent="echo", created_ms=1_700_000_000_000)
    await stores.chats.upsert(chat)
    assert await stores.chats.get("c1") == chat

    await stores.chats.set_summary("c1", "they talked about cats", 12)
    await stores.chats.upsert(chat)  # a rebuild must not erase the summary
    got = await stores.chats.get("c1")
    assert got is not None
    assert (got.summary, got.summary_upto_seq) == ("they talked about cats", 12)

    await stores.chats.set_archived("c1")
    await stores.chats.upsert(Chat(platform_chat_id="c2", room_id="!r", agent=None, created_ms=2))
    got = await stores.chats.get("c1")
    assert got is not None and got.archived is True
    assert [c.platform_chat_id for c in await stores.chats.list_all()] == ["c2", "c1"]

    await stores.chats.set_summary("c1", None, None)
    got = await stores.chats.get("c1")
    assert got is not None and got.summary is None and got.summary_upto_seq is None
    with pytest.raises(ValueError):
        await stores.chats.set_summary("c1", "text", None)


# --- messages -----------------------------------------------------------------------------


async def test_messages_are_numbered_per_chat_and_read_in_order(stores: Stores) -> None:
    m = stores.messages
    assert await m.append("c1", "user", "hello", event_id="$u1", sender=ALICE, ts=10) == 1
    assert await m.append("c1", "assistant", "hi!", event_id="$a1", ts=11, tokens=3) == 2
    assert await m.append("c2", "user", "other chat", ts=12) == 1
    assert await m.append("c1", "user", "how are you", event_id="$u2", sender=ALICE) == 3
    assert await m.append("c1", "assistant", "fine", ts=14) == 4

    history = await m.history("c1")
    assert [(x.seq, x.role, x.content) for x in history] == [
        (1, "user", "hello"),
        (2, "assistant", "hi!"),
        (3, "user", "how are you"),
        (4, "assistant", "fine"),
    ]
    first = history[0]
    assert (first.event_id, first.sender, first.ts, first.tokens) == ("$u1", ALICE, 10, None)
    assert history[1].tokens == 3
    assert [x.seq for x in await m.history("c1", after_seq=2)] == [3, 4]
    assert [x.seq for x in await m.history("c1", limit=2)] == [3, 4]  # the newest, in order
    assert [x.seq for x in await m.history("c1", after_seq=1, limit=10)] == [2, 3, 4]
    assert await m.count("c1") == 4 and await m.count("c1", after_seq=3) == 1

    last = await m.last_user_message("c1")
    assert last is not None and (last.seq, last.event_id) == (3, "$u2")
    assert await m.last_user_message("nope") is None


async def test_concurrent_appends_get_distinct_seqs(stores: Stores) -> None:
    seqs = await asyncio.gather(
        *(stores.messages.append("c1", "user", f"m{i}", event_id=f"$e{i}") for i in range(25))
    )
    assert sorted(seqs) == list(range(1, 26))
    history = await stores.messages.history("c1")
    assert [x.seq for x in history] == list(range(1, 26))
    assert {x.content for x in history} == {f"m{i}" for i in range(25)}


async def test_an_event_id_is_stored_once(stores: Stores) -> None:
    await stores.messages.append("c1", "user", "hello", event_id="$same")
    with pytest.raises(DuplicateEventError):
        await stores.messages.append("c2", "assistant", "again", event_id="$same")
    [stored] = await stores.messages.history("c1")
    assert stored.event_id == "$same" and stored.content == "hello"
    assert await stores.messages.count("c2") == 0
    # Messages without an event id never collide.
    await stores.messages.append("c1", "assistant", "s1")
    await stores.messages.append("c1", "assistant", "s2")
    assert await stores.messages.count("c1") == 3


async def test_unknown_role_is_refused(stores: Stores) -> None:
    with pytest.raises(ValueError):
        await stores.messages.append("c1", "system", "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError):  # summaries live on the chat, never as messages
        await stores.messages.append("c1", "summary", "x")  # type: ignore[arg-type]


# --- memory, processed --------------------------------------------------------------------


async def test_memory_round_trip(stores: Stores) -> None:
    assert await stores.memory.get(ALICE) is None
    await stores.memory.set(ALICE, ["likes tea", "Zeitzone: Europe/Berlin ☕"])
    memory = await stores.memory.get(ALICE)
    assert memory is not None and memory.notes == ("likes tea", "Zeitzone: Europe/Berlin ☕")
    await stores.memory.set(ALICE, [])
    memory = await stores.memory.get(ALICE)
    assert memory is not None and memory.notes == ()


async def test_processed_mark_never_moves_back(stores: Stores) -> None:
    assert await stores.processed.get("!r") is None
    await stores.processed.mark("!r", "$2", 200)
    await stores.processed.mark("!r", "$1", 100)
    got = await stores.processed.get("!r")
    assert got is not None and (got.event_id, got.ts) == ("$2", 200)
    await stores.processed.mark("!r", "$3", 300)
    got = await stores.processed.get("!r")
    assert got is not None and got.event_id == "$3"


# --- transactions and the cache rebuild ---------------------------------------------------


async def test_replace_topology_flags_unseen_rows_missing_and_keeps_them(stores: Stores) -> None:
    chat = Chat(platform_chat_id="chat-!r1", room_id="!r1", agent="echo", created_ms=1)
    await stores.replace_topology(
        [User(user_id=ALICE, space_id="!space"), User(user_id=BOB)],
        [Room(room_id="!space", kind="space", owner=ALICE), working_room("!r1")],
        [chat],
        memories={ALICE: ["note"]},
    )
    assert set(await owned_rooms(stores, ALICE)) == {"!space", "!r1"}
    await stores.rooms.upsert(working_room("!r1", last_activity_ms=500))
    await stores.chats.set_summary("chat-!r1", "summary", 4)

    # Next start: Bob and !r1 are gone from Matrix, !r2 is new.
    await stores.replace_topology(
        [User(user_id=ALICE, space_id="!space")],
        [Room(room_id="!space", kind="space", owner=ALICE), working_room("!r2")],
        [Chat(platform_chat_id="chat-!r2", room_id="!r2", agent="echo", created_ms=2)],
    )
    bob = await stores.users.get(BOB)
    gone_room = await stores.rooms.get("!r1")
    gone_chat = await stores.chats.get("chat-!r1")
    assert bob is not None and bob.missing is True
    assert gone_room is not None and gone_room.missing is True
    assert gone_chat is not None and gone_chat.missing is True
    assert [u.user_id for u in await stores.users.list_all()] == [ALICE]
    assert await owned_rooms(stores, ALICE, kind="working") == ["!r2"]
    memory = await stores.memory.get(ALICE)
    assert memory is not None and memory.notes == ("note",)

    # A room that comes back is present again, with what only the cache knew.
    await stores.replace_topology([], [], [])
    assert await stores.rooms.list_all() == []
    await stores.replace_topology([], [working_room("!r1")], [chat])
    room = await stores.rooms.get("!r1")
    assert room is not None and room.missing is False and room.last_activity_ms == 500
    restored = await stores.chats.get("chat-!r1")
    assert restored is not None and restored.missing is False and restored.summary == "summary"


async def test_replace_topology_is_all_or_nothing(stores: Stores) -> None:
    await stores.replace_topology([User(user_id=ALICE)], [working_room("!r1")], [])
    bad = dataclasses.replace(working_room("!bad"), kind="lobby")  # violates the CHECK
    # The database refuses the row (each driver with its own error), not something before it.
    with pytest.raises((sqlite3.IntegrityError, CheckViolationError), match="(?i)check constraint"):
        await stores.replace_topology([User(user_id=BOB)], [working_room("!r2"), bad], [])
    assert await stores.users.get(BOB) is None
    assert await stores.rooms.get("!r2") is None
    room = await stores.rooms.get("!r1")
    assert room is not None and room.missing is False


async def test_stores_share_one_transaction(db: Database, stores: Stores) -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        async with db.acquire() as conn, conn.transaction():
            await stores.messages.append("c1", "user", "hi", event_id="$u", conn=conn)
            await stores.processed.mark("!r", "$u", 1, conn=conn)
            raise Boom
    assert await stores.messages.count("c1") == 0
    assert await stores.processed.get("!r") is None

    async with db.acquire() as conn, conn.transaction():
        await stores.messages.append("c1", "user", "hi", event_id="$u", conn=conn)
        await stores.processed.mark("!r", "$u", 1, conn=conn)
    assert [m.event_id for m in await stores.messages.history("c1")] == ["$u"]
    assert await stores.processed.get("!r") is not None


async def test_rebuilt_chat_without_a_start_time_keeps_the_stored_one(stores: Stores) -> None:
    await stores.chats.upsert(Chat(platform_chat_id="c", room_id="!r", agent="echo", created_ms=42))
    await stores.chats.upsert(Chat(platform_chat_id="c", room_id="!r", agent="echo", created_ms=0))
    chat = await stores.chats.get("c")
    assert chat is not None and chat.created_ms == 42
