"""devtools.worlds.World.created: rooms as Synapse makes them from our createRoom requests
(the shape bench.planner_scale builds at scale) are ours, healthy and need no writes."""

from __future__ import annotations

from devtools.worlds import ALICE, BOT, HS, World, apply_to_snapshot, apply_writes
from surfaces_plugin import layout
from surfaces_plugin.reconcile.model import CacheView, Invite, SetState
from surfaces_plugin.reconcile.plan import plan

BOB = "@bob:hs"


def test_rooms_created_from_our_requests_need_no_writes() -> None:
    w = World()
    space = w.created(
        "!s", layout.space_create_request(ALICE, "Agents", BOT, HS, "12"), ALICE, ts=1
    )
    binding = layout.Binding(
        owner=ALICE, space_id=space, agent="echo", title="T", platform_chat_id="c"
    )
    request = layout.working_room_create_request(ALICE, space, binding, BOT, HS, "12")
    room = w.created("!r", request, ALICE, ts=2)
    w.link(space, room, layout.order_key(2))

    p = plan(w.snapshot(), CacheView(), lambda room_id: f"new-{room_id}")

    assert p.writes == () and p.report.ignored == ()
    assert (p.report.spaces, p.report.working_rooms) == (1, 1)
    assert p.rooms[room].binding == binding and p.rooms[room].owner_membership == "join"
    assert w.rooms[room].get("m.room.name").content == {"name": "T"}
    assert w.rooms[room].get("m.room.join_rules").content == {"join_rule": "invite"}
    assert "creator" not in w.rooms[room].create.content  # room v11+: the creator is implicit


def test_older_room_versions_name_the_creator() -> None:
    w = World(version="10")
    request = layout.space_create_request(ALICE, "Agents", BOT, HS, "10")
    w.created("!s", request, ALICE, ts=1)
    assert w.rooms["!s"].create.content["creator"] == BOT


# ---------------------------------------------------------------------------
# apply_writes: only what Synapse would accept lands


def test_writes_land_only_with_the_power_and_membership_synapse_requires() -> None:
    w = World(version="10")
    w.space("!ok")
    w.space("!weak")
    w.put(
        "!weak",
        "m.room.power_levels",
        "",
        {"users": {BOT: 50}, "state_default": 50, "events": {"m.space.child": 100}, "invite": 60},
    )
    w.space("!gone")
    w.kick_bot("!gone")
    link = layout.space_child_content(HS, "0001")
    writes = [
        SetState("!ok", "m.space.child", "!r", link, "child link"),
        SetState("!weak", "m.space.child", "!r", link, "child link"),  # needs 100, has 50
        SetState("!weak", layout.MEMORY_TYPE, "", {"v": 1, "notes": []}, "memory"),  # 50: lands
        Invite("!weak", BOB, "invite"),  # needs 60
        Invite("!ok", ALICE, "invite"),  # already joined
        SetState("!gone", "m.space.child", "!r", link, "child link"),  # bot not joined
        SetState("!nowhere", "m.space.child", "!r", link, "child link"),
        Invite("!ok", BOB, "invite"),
    ]
    applied = apply_writes(w.snapshot(), writes)
    assert [a for a, _ in applied.refused] == [writes[i] for i in (1, 3, 4, 5, 6)]
    after = applied.snapshot
    assert after.rooms["!ok"].get("m.space.child", "!r").sender == BOT
    assert after.rooms["!weak"].get("m.space.child", "!r") is None
    assert after.rooms["!weak"].get(layout.MEMORY_TYPE) is not None
    assert after.rooms["!ok"].membership(BOB) == "invite"
    assert after.rooms["!weak"].membership(BOB) is None
    assert after.rooms["!gone"] == w.rooms["!gone"]
    assert apply_to_snapshot(w.snapshot(), writes) == after


def test_on_room_v12_the_creator_outranks_any_level() -> None:
    w = World(version="12")
    w.space("!s")
    w.put("!s", "m.room.power_levels", "", {"users": {BOT: 0}, "state_default": 1000})
    w.room("!theirs", {}, creator=ALICE, members={ALICE: "join"})
    w.put(
        "!theirs",
        "m.room.power_levels",
        "",
        {"users": {BOT: 99}, "state_default": 100},
        sender=ALICE,
    )
    tombstone = layout.tombstone_content("!x", "up")
    writes = [
        SetState("!s", "m.room.tombstone", "", tombstone, "t"),
        SetState("!theirs", "m.room.tombstone", "", tombstone, "t"),
    ]
    applied = apply_writes(w.snapshot(), writes)
    assert [a for a, _ in applied.refused] == [writes[1]]
    assert "needs level 100, the bot has 99" in applied.refused[0][1]
