"""Reconciliation in the running service: rebuild from Matrix, repair, write nothing twice."""

from __future__ import annotations

from surfaces_plugin import layout
from surfaces_plugin.store.migrations import CACHE_TABLES

ALICE = "@alice:localhost"


async def wipe_cache(h) -> None:
    for table in CACHE_TABLES:
        await h.app.stores.db.execute(f"DELETE FROM {table}")


async def test_wiped_cache_is_rebuilt_identically_and_second_run_writes_nothing(make_surfaces) -> None:
    h = await make_surfaces()
    dm = h.dm(ALICE)
    await h.say(dm, ALICE, "!ai start")
    await h.say(dm, ALICE, "!ai new Second")
    before = sorted(await h.app.stores.rooms.list_all(), key=lambda r: r.room_id)
    await h.app.stop()
    await wipe_cache(h)

    h2 = await make_surfaces(client=h.client)
    after = sorted(await h2.app.stores.rooms.list_all(), key=lambda r: r.room_id)
    strip = lambda rows: [(r.room_id, r.kind, r.owner, r.binding, r.order_key)  # noqa: E731
                          for r in rows]
    assert strip(after) == strip(before)
    user = await h2.app.stores.users.get(ALICE)
    space = next(r.room_id for r in before if r.kind == "space")
    assert user is not None and user.space_id == space
    await h2.say(dm, ALICE, "!ai rooms")
    assert "General" in h2.last_reply(dm) and "Second" in h2.last_reply(dm)
    writes_before = h2.app.io.gateway.writes
    report = await h2.app.reconciler.run(reason="again")
    assert report.writes == 0
    assert h2.app.io.gateway.writes == writes_before


async def test_missing_platform_chat_id_is_backfilled_once(make_surfaces) -> None:
    h = await make_surfaces()
    dm = h.dm(ALICE)
    await h.say(dm, ALICE, "!ai start")
    [room] = h.app.rooms.all_rooms()
    sender, content = h.client.rooms[room.room_id].state[(layout.BINDING_TYPE, "")]
    old_layout = {k: v for k, v in content.items() if k != "platform_chat_id"}
    h.client.rooms[room.room_id].state[(layout.BINDING_TYPE, "")] = (sender, old_layout)
    await h.app.stop()
    await wipe_cache(h)

    h2 = await make_surfaces(client=h.client)
    binding = layout.parse_binding(h.client.rooms[room.room_id].state[(layout.BINDING_TYPE, "")][1])
    assert binding is not None and binding.platform_chat_id
    assert h2.app.reconciler.last is not None
    assert h2.app.reconciler.last.counts["platform_chat_ids backfilled"] == 1
    assert (await h2.app.reconciler.run(reason="again")).writes == 0
    await h2.say(room.room_id, ALICE, "hello")
    assert h2.client.bodies(room.room_id)[-1] == "echo: hello"


async def test_reconcile_command_prints_report_for_admins(make_surfaces) -> None:
    h = await make_surfaces(access={"admins": [ALICE]})
    dm = h.dm(ALICE)
    await h.say(dm, ALICE, "!ai start")
    await h.say(dm, ALICE, "!ai reconcile")
    reply = h.last_reply(dm)
    assert "**Reconciliation** (requested by @alice:localhost)" in reply
    assert "0 writes" in reply and "- working rooms: 1" in reply
    await h.say(dm, ALICE, "!ai status")
    assert "working rooms: 1 routed" in h.last_reply(dm)


async def test_bot_kicked_from_a_room_stops_routing_and_is_recorded_lost(make_surfaces) -> None:
    from mautrix.types import StateEvent

    h = await make_surfaces()
    dm = h.dm(ALICE)
    await h.say(dm, ALICE, "!ai start")
    [room] = h.app.rooms.all_rooms()
    h.client.kick(room.room_id, str(h.client.mxid), by=ALICE)  # as the homeserver records it
    kick = StateEvent.deserialize({
        "type": "m.room.member", "room_id": room.room_id, "event_id": "$kick", "sender": ALICE,
        "state_key": str(h.client.mxid), "origin_server_ts": 1, "content": {"membership": "leave"},
    })
    await h.app.on_member(kick)
    assert h.app.rooms.room(room.room_id) is None
    row = await h.app.stores.rooms.get(room.room_id)
    assert row is not None and row.bot_membership == "lost"
    await h.say(room.room_id, ALICE, "anyone there?")
    assert h.client.bodies(room.room_id) == []


async def test_last_activity_is_restored_from_the_timeline_after_a_wipe(make_surfaces) -> None:
    h = await make_surfaces()
    dm = h.dm(ALICE)
    await h.say(dm, ALICE, "!ai start")
    [room] = h.app.rooms.all_rooms()
    await h.say(room.room_id, ALICE, "hello")
    await h.app.stop()
    await wipe_cache(h)
    h2 = await make_surfaces(client=h.client)
    await h2.say(dm, ALICE, "!ai rooms")
    assert "last activity never" not in h2.last_reply(dm)
    assert "last activity 20" in h2.last_reply(dm)


async def test_report_counts_messages_caught_up(make_surfaces) -> None:
    h = await make_surfaces(access={"admins": [ALICE]})
    dm = h.dm(ALICE)
    await h.say(dm, ALICE, "!ai start")
    [room] = h.app.rooms.all_rooms()
    await h.app.stop()
    h.client.user_message(room.room_id, ALICE, "one")
    h.client.user_message(room.room_id, ALICE, "two")
    h2 = await make_surfaces(client=h.client, access={"admins": [ALICE]})
    assert h2.client.bodies(room.room_id) == ["echo: one", "echo: two"]
    await h2.say(dm, ALICE, "!ai status")
    assert "- messages caught up: 2" in h2.last_reply(dm)


async def test_room_changed_during_reconciliation_is_read_again(make_surfaces, monkeypatch) -> None:
    from mautrix.types import StateEvent

    from surfaces_plugin.reconcile import runner

    h = await make_surfaces()
    dm = h.dm(ALICE)
    await h.say(dm, ALICE, "!ai start")
    [room] = h.app.rooms.all_rooms()
    h.client.rooms[room.room_id].members[ALICE] = "join"
    await h.app.reconciler.run(reason="joined")
    assert (await h.app.stores.rooms.get(room.room_id)).owner_membership == "join"

    original = runner.read_snapshot

    async def read_then_alice_leaves(app, concurrency):
        snapshot = await original(app, concurrency)  # read while alice is still in the room
        h.client.rooms[room.room_id].members[ALICE] = "leave"
        h.app.on_layout_state(StateEvent.deserialize({
            "type": "m.room.member", "room_id": room.room_id, "event_id": "$leave",
            "sender": ALICE, "state_key": ALICE, "origin_server_ts": 1,
            "content": {"membership": "leave"},
        }))
        return snapshot

    monkeypatch.setattr(runner, "read_snapshot", read_then_alice_leaves)
    report = await h.app.reconciler.run(reason="live change")
    assert report.counts["rooms re-read after live changes"] == 1
    assert (await h.app.stores.rooms.get(room.room_id)).owner_membership == "leave"
