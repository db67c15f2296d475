"""devtools.worlds.World.created: rooms as Synapse makes them from our createRoom requests
(the shape bench.planner_scale builds at scale) are ours, healthy and need no writes."""

from __future__ import annotations

from devtools.worlds import ALICE, BOT, HS, World
from surfaces_plugin import layout
from surfaces_plugin.reconcile.model import CacheView
from surfaces_plugin.reconcile.plan import plan


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
