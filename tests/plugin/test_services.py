"""Each service built alone, with only the collaborators its constructor names.

They run on a real database and the recording Matrix client; no `Surfaces` app is involved,
which is what shows that a service's constructor is all it depends on.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from surfaces_plugin import layout
from surfaces_plugin.access import AccessService
from surfaces_plugin.backends import BackendRegistry
from surfaces_plugin.catchup import CatchUp
from surfaces_plugin.config import Settings, parse_settings
from surfaces_plugin.context_builder import ContextBuilder
from surfaces_plugin.dispatch import Dispatcher
from surfaces_plugin.e2ee import E2EE
from surfaces_plugin.errors import Refusal
from surfaces_plugin.history import History
from surfaces_plugin.matrix import Gateway, MatrixIO
from surfaces_plugin.memory import MemoryService
from surfaces_plugin.onboarding import Onboarding
from surfaces_plugin.reconcile.runner import Reconciler
from surfaces_plugin.rooms import RoomDirectory, WorkingRoom
from surfaces_plugin.store import Stores
from surfaces_plugin.toolbox import ToolBox
from surfaces_plugin.usage import UsageLedger

from .conftest import config_with
from .fakes import FakeClient

ALICE = "@alice:localhost"
LOG = logging.getLogger("surfaces.test.services")


def io_of(client: FakeClient) -> MatrixIO:
    return MatrixIO(client, Gateway(base_delay_s=0.01), LOG)  # type: ignore[arg-type]


def settings_of(**overrides: object) -> Settings:
    return parse_settings(config_with(**overrides))


def room_in(client: FakeClient, owner: str = ALICE, pcid: str = "echo-1") -> WorkingRoom:
    """A working room that exists in the fake homeserver, with the owner joined."""
    room_id = client.add_room(str(client.mxid), {owner: "join", str(client.mxid): "join"})
    binding = layout.Binding(owner, "!space", "echo", "Ideas", platform_chat_id=pcid)
    return WorkingRoom(room_id, binding, order_key="1")


async def test_room_directory_writes_the_binding_to_matrix_then_routes_by_it(stores: Stores) -> None:
    client = FakeClient()
    rooms = RoomDirectory(io_of(client), stores.rooms, LOG)
    room = room_in(client)
    await rooms.remember(room)
    updated = await rooms.update_binding(room, agent="other", system_prompt="Be brief.")
    sender, content = client.rooms[room.room_id].state[(layout.BINDING_TYPE, "")]
    assert sender == client.mxid and content["agent"] == "other"
    assert content["system_prompt"] == "Be brief."
    assert rooms.room(room.room_id) == updated
    assert rooms.rooms_of(ALICE) == [updated]
    await rooms.lose(room.room_id)
    assert rooms.room(room.room_id) is None
    row = await stores.rooms.get(room.room_id)
    assert row is not None and row.bot_membership == "lost" and row.binding == updated.binding


async def test_history_stores_turns_marks_answers_and_resets(stores: Stores) -> None:
    client = FakeClient()
    io, settings = io_of(client), settings_of()
    rooms = RoomDirectory(io, stores.rooms, LOG)
    backends = BackendRegistry(settings, LOG)
    history = History(io, stores, rooms, backends, lambda: settings, LOG)
    room = room_in(client)
    await rooms.remember(room)
    await history.start_chat(room)
    await history.add_user_turn(room, "$q", ALICE, "hello", 10)
    await history.add_answer(room, "echo: hello", "$a", None)
    await history.mark_processed(room, "$q", 10)
    assert await history.is_answered(room, "$q", 10)
    assert not await history.is_answered(room, "$later", 11)
    _, turns = await history.turns(room)
    assert [(m.role, m.content) for m in turns] == [("user", "hello"), ("assistant", "echo: hello")]

    fresh = await history.reset(room)
    assert fresh.platform_chat_id != room.platform_chat_id
    assert fresh.platform_chat_id.startswith("echo-")
    binding = client.rooms[room.room_id].state[(layout.BINDING_TYPE, "")][1]
    assert binding["platform_chat_id"] == fresh.platform_chat_id
    [notice] = client.messages(room.room_id)
    assert layout.parse_reset_marker(notice["content"]).platform_chat_id == fresh.platform_chat_id
    assert (await history.turns(fresh))[1] == []
    old = await stores.chats.get(room.platform_chat_id)
    assert old is not None and old.archived


async def test_context_builder_puts_notes_and_turns_in_the_budget(stores: Stores) -> None:
    client = FakeClient()
    io, settings = io_of(client), settings_of()
    rooms = RoomDirectory(io, stores.rooms, LOG)
    backends = BackendRegistry(settings, LOG)
    history = History(io, stores, rooms, backends, lambda: settings, LOG)

    async def notes(user_id: str) -> tuple[str, ...]:
        return ("likes tea",) if user_id == ALICE else ()

    context = ContextBuilder(
        io, history, notes, backends, lambda: settings, UsageLedger(io, stores.usage, lambda: settings, LOG)
    )
    room = room_in(client)
    await history.start_chat(room)
    await history.add_user_turn(room, "$q", ALICE, "hello", 10)
    agent = context.agent_of(room)
    window = await context.window(room, agent)
    assert "- likes tea" in window.messages[0].content
    assert window.messages[-1].content == "hello" and window.turns_omitted == 0
    context.calibrate(agent.id, estimated=100, reported=1000)
    assert context.scale(agent.id) == 2.0  # bounded, however far off the estimate was


async def test_memory_service_keeps_notes_in_the_space(stores: Stores) -> None:
    client = FakeClient()
    settings = settings_of()
    memory = MemoryService(io_of(client), stores.memory, stores.users, lambda: settings, LOG)
    with pytest.raises(Refusal, match="you have none yet"):
        await memory.add(ALICE, "likes tea")
    space = client.add_room(str(client.mxid), {ALICE: "join", str(client.mxid): "join"})
    await stores.users.set_space(ALICE, space)
    assert await memory.add(ALICE, "likes   tea") == 1
    assert client.rooms[space].state[(layout.MEMORY_TYPE, "")][1]["notes"] == ["likes tea"]
    assert await memory.notes(ALICE) == ("likes tea",)
    assert await memory.forget(ALICE, "1") == "likes tea"
    assert await memory.current(ALICE) == ()


async def test_access_service_asks_for_approval_and_tells_the_user(stores: Stores) -> None:
    client = FakeClient()
    settings = settings_of(access={"mode": "approval", "admins": ["@admin:localhost"]})
    access = AccessService(io_of(client), stores.users, lambda: settings, LOG)
    dm = client.add_room(ALICE, {ALICE: "join", str(client.mxid): "join"})
    assert not await access.admit(ALICE, dm)
    assert access.pending() == [ALICE]
    replies: list[str] = []

    async def reply(text: str) -> None:
        replies.append(text)

    await access.decide("@admin:localhost", "approve", ALICE, reply)
    assert replies == [f"{ALICE} is now approved."]
    assert client.bodies(dm)[-1].startswith("You're approved!")
    assert access.has_access(ALICE) and access.pending() == []
    assert client.account_data[layout.ACCESS_TYPE]["users"][ALICE]["state"] == "approved"


async def test_onboarding_creates_a_space_and_a_linked_working_room(stores: Stores) -> None:
    client = FakeClient()
    io, settings = io_of(client), settings_of()
    current = lambda: settings  # noqa: E731
    rooms = RoomDirectory(io, stores.rooms, LOG)
    backends = BackendRegistry(settings, LOG)
    history = History(io, stores, rooms, backends, current, LOG)
    access = AccessService(io, stores.users, current, LOG)
    onboarding = Onboarding(io, stores, rooms, history, backends, access, current, LOG)
    reply = await onboarding.start(ALICE)
    assert reply.startswith("Your Space is ready")
    [room] = rooms.all_rooms()
    space = await onboarding.space_of(ALICE)
    assert space is not None and room.space_id == space
    link = client.rooms[space].state[("m.space.child", room.room_id)][1]
    assert link["via"] == ["localhost"] and link["order"] == room.order_key
    assert client.rooms[room.room_id].members[ALICE] == "invite"
    assert (await onboarding.start(ALICE)).startswith("Your Space already exists")
    assert len(rooms.all_rooms()) == 1


async def test_catch_up_finds_what_the_owner_sent_after_the_processed_mark(stores: Stores) -> None:
    client = FakeClient()
    io, settings = io_of(client), settings_of()
    rooms = RoomDirectory(io, stores.rooms, LOG)
    history = History(io, stores, rooms, BackendRegistry(settings, LOG), lambda: settings, LOG)
    e2ee = E2EE(io, lambda: settings, LOG)
    replayed: list[tuple[str, list[str]]] = []

    async def replay(room_id, events) -> None:
        replayed.append((room_id, [e["event_id"] for e in events]))

    catch_up = CatchUp(
        io, rooms, history, stores.processed, e2ee, lambda: settings, LOG, replay_commands=replay
    )
    room = room_in(client)
    answered = client.user_message(room.room_id, ALICE, "answered before the stop")
    await stores.processed.mark(room.room_id, answered.event_id, answered.timestamp)
    await asyncio.sleep(0.002)  # a later millisecond: the mark's own is "at or before"
    command = client.user_message(room.room_id, ALICE, "!ai rooms")  # a command is not a turn
    missed = client.user_message(room.room_id, ALICE, "sent while down")
    jobs = await catch_up.missed_in_room(room)
    assert [(j.event_id, j.body) for j in jobs] == [(missed.event_id, "sent while down")]
    assert replayed == [(room.room_id, [command.event_id])]  # the command goes to the commands


async def test_dispatcher_answers_the_owner_in_order_and_reports_catch_up(stores: Stores) -> None:
    client = FakeClient()
    io = io_of(client)
    settings = settings_of(streaming={"enabled": False})
    current = lambda: settings  # noqa: E731
    rooms = RoomDirectory(io, stores.rooms, LOG)
    backends = BackendRegistry(settings, LOG)
    history = History(io, stores, rooms, backends, current, LOG)

    async def notes(user_id: str) -> tuple[str, ...]:
        return ()

    usage = UsageLedger(io, stores.usage, current, LOG)
    context = ContextBuilder(io, history, notes, backends, current, usage)
    access = AccessService(io, stores.users, current, LOG)
    e2ee = E2EE(io, current, LOG)
    async def no_commands(room_id, events) -> None:
        assert not events

    catch_up = CatchUp(
        io, rooms, history, stores.processed, e2ee, current, LOG, replay_commands=no_commands
    )
    reports: list[tuple[int, int]] = []
    dispatcher = Dispatcher(
        io, rooms, history, context, access, backends, catch_up, current, LOG,
        on_caught_up=lambda messages, n_rooms, seconds: reports.append((messages, n_rooms)),
        usage=usage,
        tools=ToolBox(current, LOG),
    )
    room = room_in(client)
    await rooms.remember(room)
    await history.start_chat(room)
    client.user_message(room.room_id, ALICE, "missed")
    await dispatcher.start_catch_up([room])
    assert reports == [(1, 1)]
    dispatcher.submit(client.user_message(room.room_id, ALICE, "live"))
    dispatcher.submit(client.user_message(room.room_id, "@eve:localhost", "let me in"))
    while io.running_tasks():
        await asyncio.wait(io.running_tasks(), timeout=10)
    bodies = client.bodies(room.room_id)
    assert [b for b in bodies if b.startswith("echo:")] == ["echo: missed", "echo: live"]
    [refusal] = [b for b in bodies if not b.startswith("echo:")]
    assert refusal.startswith("@eve:localhost: this room is @alice:localhost's conversation")
    await dispatcher.stop()


async def test_reconciler_rebuilds_the_directory_from_matrix(stores: Stores) -> None:
    client = FakeClient()
    io, settings = io_of(client), settings_of()
    current = lambda: settings  # noqa: E731
    rooms = RoomDirectory(io, stores.rooms, LOG)
    backends = BackendRegistry(settings, LOG)
    history = History(io, stores, rooms, backends, current, LOG)
    access = AccessService(io, stores.users, current, LOG)
    onboarding = Onboarding(io, stores, rooms, history, backends, access, current, LOG)
    await onboarding.start(ALICE)
    [created] = rooms.all_rooms()
    await stores.db.execute("DELETE FROM rooms")  # the cache is lost

    fresh = RoomDirectory(io, stores.rooms, LOG)
    reconciler = Reconciler(
        io, stores, fresh, current, LOG, finish_onboarding=onboarding.finish, backends=backends
    )
    report = await reconciler.run(reason="test")
    assert report.writes == 0
    [rebuilt] = fresh.all_rooms()
    assert (rebuilt.room_id, rebuilt.binding, rebuilt.order_key) == (
        created.room_id, created.binding, created.order_key,
    )
