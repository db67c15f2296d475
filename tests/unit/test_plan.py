"""The reconciliation planner, one test per case of reconciliation.md (T1–T17) and more.

Every case also checks convergence: applying the plan's writes and planning again (with the
resulting cache, and with a wiped cache) makes no writes and yields the same cache.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devtools.worlds import ALICE, BOT, HS, World, apply_to_snapshot, apply_writes
from surfaces_plugin import layout
from surfaces_plugin.layout import AccessDecision, AccessDecisions, Binding
from surfaces_plugin.reconcile.model import (
    CacheView,
    Invite,
    RoomRecord,
    RoomSnapshot,
    SetState,
    Snapshot,
)
from surfaces_plugin.reconcile.plan import Plan, plan, state_level, user_level

BOB = "@bob:hs"
MALLORY = "@mallory:hs"


def chat_id(room_id: str) -> str:
    return f"new-chat-for-{room_id}"


def cached_binding(platform_chat_id: str) -> Binding:
    """A binding the cache remembers for a room of Alice's, with this chat id."""
    return Binding(ALICE, "!sa", "gpt", "Ideas", platform_chat_id=platform_chat_id)


def cache_of(p: Plan) -> CacheView:
    return CacheView(users=dict(p.users), rooms=dict(p.rooms))


def converge(
    snapshot: Snapshot, cache: CacheView | None = None, *, wiped: bool = True
) -> tuple[Plan, Snapshot]:
    """Plan, apply, plan again: Synapse must accept every write, and the second plan must write
    nothing and agree on the cache, with this plan's cache and (`wiped`) with an empty one."""
    first = plan(snapshot, cache or CacheView(), chat_id)
    applied = apply_writes(snapshot, first)
    assert applied.refused == (), applied.refused
    after = applied.snapshot
    for next_cache in (cache_of(first), CacheView())[: 2 if wiped else 1]:  # kept DB, wiped (T1)
        again = plan(after, next_cache, chat_id)
        assert again.writes == (), again.writes
        assert again.rooms == first.rooms
        assert again.users == first.users
    return first, after


def writes_in(p: Plan, room_id: str) -> list[SetState | Invite]:
    return [w for w in p.writes if w.room_id == room_id]


def state_of(snapshot: Snapshot, room_id: str, type_: str, key: str = "") -> Any:
    event = snapshot.rooms[room_id].get(type_, key)
    return None if event is None else event.content


def healthy_world() -> World:
    w = World()
    w.space("!sa", ALICE, ts=1)
    w.working("!a1", "!sa", ts=2, title="Plans", agent="echo")
    w.working("!a2", "!sa", ts=3, title="Ideas", agent="gpt", system_prompt="Be brief.")
    w.space("!sb", BOB, ts=4)
    w.working("!b1", "!sb", BOB, ts=5)
    return w


# ---------------------------------------------------------------------------
# T1


def test_t1_wiped_database_is_rebuilt_identically_without_writes() -> None:
    snapshot = healthy_world().snapshot()
    rebuilt, _ = converge(snapshot)
    assert rebuilt.writes == ()
    assert rebuilt.rooms["!a2"] == RoomRecord(
        room_id="!a2",
        kind="working",
        owner=ALICE,
        binding=Binding(
            owner=ALICE,
            space_id="!sa",
            agent="gpt",
            title="Ideas",
            platform_chat_id="chat-!a2",
            system_prompt="Be brief.",
        ),
        owner_membership="join",
    )
    assert rebuilt.rooms["!sa"] == RoomRecord("!sa", "space", ALICE, owner_membership="join")
    assert rebuilt.users[ALICE].space_id == "!sa" and rebuilt.users[BOB].space_id == "!sb"
    assert set(rebuilt.report.adopted) == set(snapshot.rooms)
    with_db = plan(snapshot, cache_of(rebuilt), chat_id)
    assert with_db.rooms == rebuilt.rooms and with_db.users == rebuilt.users
    assert with_db.report.adopted == () and with_db.report.missing == ()
    assert (rebuilt.report.spaces, rebuilt.report.working_rooms) == (2, 3)


# ---------------------------------------------------------------------------
# T2, T3: crashes during onboarding


def test_t2_space_created_before_a_crash_is_adopted_and_its_owner_invited() -> None:
    w = World()
    w.space("!sa", ALICE, members={})  # crashed before the invite
    p, _ = converge(w.snapshot())
    assert p.users[ALICE].space_id == "!sa"
    assert p.writes == (Invite("!sa", ALICE, "owner was never invited"),)
    assert p.report.adopted == ("!sa",)
    assert p.rooms["!sa"].owner_membership == "invite"


def test_t2_adopted_space_needs_nothing_once_the_owner_was_invited() -> None:
    w = World()
    w.space("!sa", ALICE, members={ALICE: "invite"})
    p, _ = converge(w.snapshot())
    assert p.writes == () and p.users[ALICE].space_id == "!sa"


def test_t3_room_created_before_a_crash_gets_its_space_link() -> None:
    w = World()
    w.space("!sa", ts=1)
    w.working("!a1", "!sa", ts=1_700_000_000_000, link=False)
    p, after = converge(w.snapshot())
    assert p.writes == (
        SetState(
            "!sa",
            "m.space.child",
            "!a1",
            {"via": [HS], "order": layout.order_key(1_700_000_000_000)},
            "child link",
        ),
    )
    assert p.report.links_added == (("!sa", "!a1"),)
    assert p.rooms["!a1"].routable


# ---------------------------------------------------------------------------
# T4: duplicate spaces


def test_t4_two_spaces_for_one_user_merge_into_one_canonical_and_loser_is_tombstoned() -> None:
    w = World()
    w.space("!old", ts=1)  # older, but fewer children
    w.working("!x", "!old", ts=2)
    w.put("!old", layout.MEMORY_TYPE, "", {"v": 1, "notes": ["likes tea", "shared"]})
    w.space("!new", ts=3)
    w.working("!y", "!new", ts=4)
    w.working("!z", "!new", ts=5)
    w.put("!new", layout.MEMORY_TYPE, "", {"v": 1, "notes": ["shared"]})
    p, after = converge(w.snapshot())

    assert p.users[ALICE].space_id == "!new"
    assert p.report.spaces_merged == (("!old", "!new"),)
    assert state_of(after, "!old", "m.room.tombstone") == {
        "body": "This Space was merged into another one.",
        "replacement_room": "!new",
    }
    # the child moved: link, parent and binding all point at the winner
    assert state_of(after, "!new", "m.space.child", "!x")["via"] == [HS]
    assert state_of(after, "!old", "m.space.child", "!x") == {}
    assert state_of(after, "!x", "m.space.parent", "!new") == {"via": [HS], "canonical": True}
    assert state_of(after, "!x", "m.space.parent", "!old") == {}
    assert state_of(after, "!x", layout.BINDING_TYPE)["space_id"] == "!new"
    assert p.rooms["!x"].binding.space_id == "!new" and p.rooms["!x"].binding.platform_chat_id == "chat-!x"
    assert p.rooms["!old"].replaced_by == "!new"
    assert state_of(after, "!new", layout.MEMORY_TYPE)["notes"] == ["shared", "likes tea"]
    # memory is merged before the tombstone, so a crash in between loses nothing
    kinds = [w.type for w in p.writes if isinstance(w, SetState)]
    assert kinds.index(layout.MEMORY_TYPE) < kinds.index("m.room.tombstone")


def test_t4_tie_on_children_goes_to_the_oldest_then_the_lowest_room_id() -> None:
    w = World()
    w.space("!b", ts=5)
    w.space("!c", ts=1)
    w.space("!a", ts=5)
    p, _ = converge(w.snapshot())
    assert p.users[ALICE].space_id == "!c"
    assert sorted(p.report.spaces_merged) == [("!a", "!c"), ("!b", "!c")]
    w.rooms.pop("!c")
    p, _ = converge(w.snapshot())
    assert p.users[ALICE].space_id == "!a"


def test_t4_a_space_the_owner_joined_beats_one_leaked_by_a_crash() -> None:
    w = World()
    w.space("!leaked", ts=1, members={})
    w.space("!real", ts=2)
    p, _ = converge(w.snapshot())
    assert p.users[ALICE].space_id == "!real"
    assert not any(isinstance(x, Invite) for x in p.writes)  # the loser is not offered


# ---------------------------------------------------------------------------
# T5: duplicate platform_chat_id


def test_t5_duplicate_platform_chat_id_keeps_the_oldest_room_and_renews_the_others() -> None:
    w = World()
    w.space("!sa")
    w.working("!r2", "!sa", pcid="same", ts=1)
    w.working("!r1", "!sa", pcid="same", ts=2)
    p, after = converge(w.snapshot())
    assert p.rooms["!r2"].binding.platform_chat_id == "same"
    assert p.rooms["!r1"].binding.platform_chat_id == chat_id("!r1")
    assert state_of(after, "!r1", layout.BINDING_TYPE)["platform_chat_id"] == chat_id("!r1")
    assert p.report.duplicates_resolved == (("same", "!r2", ("!r1",)),)
    assert writes_in(p, "!r2") == []


def test_t5_the_room_the_cache_knows_by_that_id_keeps_it() -> None:
    w = World()
    w.space("!sa")
    w.working("!r2", "!sa", pcid="same", ts=1)
    w.working("!r1", "!sa", pcid="same", ts=2)
    cache = CacheView(rooms={"!r1": RoomRecord("!r1", "working", ALICE, binding=cached_binding("same"))})
    p, _ = converge(w.snapshot(), cache)
    assert p.rooms["!r1"].binding.platform_chat_id == "same"
    assert p.rooms["!r2"].binding.platform_chat_id == chat_id("!r2")


# ---------------------------------------------------------------------------
# T6: link cleared


def test_t6_cleared_child_link_archives_the_room_instead_of_relinking_it() -> None:
    w = healthy_world()
    w.put("!sa", "m.space.child", "!a1", {})  # `!ai archive` crashed after unlinking
    p, after = converge(w.snapshot())
    assert p.writes == (
        SetState(
            "!a1",
            layout.BINDING_TYPE,
            "",
            {**state_of(w.snapshot(), "!a1", layout.BINDING_TYPE), "archived": True},
            "repair binding",
        ),
    )
    assert p.rooms["!a1"].binding.archived and not p.rooms["!a1"].routable
    assert p.report.archived_by_unlink == ("!a1",)


def test_t6_archived_room_with_a_live_link_is_unlinked() -> None:
    w = healthy_world()
    w.working("!a3", "!sa", archived=True)
    w.link("!sa", "!a3")
    p, _ = converge(w.snapshot())
    assert p.writes == (SetState("!sa", "m.space.child", "!a3", {}, "archived room"),)


# ---------------------------------------------------------------------------
# T7: the user left


def test_t7_user_who_left_space_and_room_is_recorded_not_given_a_new_space() -> None:
    w = healthy_world()
    w.put("!sa", "m.room.member", ALICE, {"membership": "leave"}, sender=ALICE)
    w.put("!a1", "m.room.member", ALICE, {"membership": "leave"}, sender=ALICE)
    p, _ = converge(w.snapshot())
    assert p.writes == ()
    assert p.users[ALICE].space_id == "!sa"
    assert p.users[ALICE].space_membership == "leave"
    assert p.rooms["!a1"].owner_membership == "leave"


# ---------------------------------------------------------------------------
# T8: bot kicked


def test_t8_kicked_bot_marks_the_room_lost_and_only_unlinks_it() -> None:
    w = healthy_world()
    w.kick_bot("!a1")  # /state still answers with the old state
    p, after = converge(w.snapshot())
    assert p.rooms["!a1"].bot_membership == "lost" and not p.rooms["!a1"].routable
    assert p.rooms["!a1"].binding.platform_chat_id == "chat-!a1"  # kept from the stale state
    assert writes_in(p, "!a1") == []
    assert p.writes == (
        SetState(
            "!sa",
            "m.space.child",
            "!a1",
            {"org.surfaces.unlinked": "lost"},
            "bot is no longer in the room",
        ),
    )
    assert p.report.lost == ("!a1",)
    # let back in: the room is linked again, not archived
    back = after.with_room(replace(after.rooms["!a1"], bot_membership="join"))
    p2, _ = converge(back)
    assert [(x.room_id, x.type) for x in p2.writes] == [("!sa", "m.space.child")]
    assert p2.rooms["!a1"].routable


def test_t8_lost_space_gives_the_user_no_space_and_makes_no_writes() -> None:
    w = healthy_world()
    w.kick_bot("!sa")
    p, _ = converge(w.snapshot())
    assert p.users[ALICE].space_id is None
    assert p.rooms["!sa"].bot_membership == "lost"
    assert p.writes == ()


# ---------------------------------------------------------------------------
# T9: bot demoted


def test_t9_demoted_bot_marks_the_room_degraded_and_writes_nothing_there() -> None:
    w = healthy_world()
    w.version = "10"
    w.space("!s10", BOB, ts=9)  # BOB's second space: would be merged if writable
    w.working("!r10", "!sb", BOB, pcid=None)  # would be backfilled if writable
    demoted = {**layout.power_levels(BOT, "10"), "users": {BOT: 50, MALLORY: 100}}
    w.put("!r10", "m.room.power_levels", "", demoted, sender=MALLORY)
    w.put("!s10", "m.room.power_levels", "", demoted, sender=MALLORY)
    p, _ = converge(w.snapshot())
    assert p.rooms["!r10"].degraded and p.rooms["!s10"].degraded
    assert writes_in(p, "!r10") == [] and writes_in(p, "!s10") == []
    assert set(p.report.degraded) == {"!r10", "!s10"}
    assert p.users[BOB].space_id == "!sb"  # a writable space wins over a degraded one
    assert p.rooms["!r10"].binding.platform_chat_id is None and not p.rooms["!r10"].routable


# ---------------------------------------------------------------------------
# T10, T11: upgrades


def upgraded_world(*, upgrader: str = BOT, predecessor: str = "!a1", joined: bool = True) -> World:
    w = healthy_world()
    w.put(
        "!a1",
        "m.room.tombstone",
        "",
        layout.tombstone_content("!a1v2", "upgraded"),
        sender=upgrader,
    )
    w.room("!a1v2", {"predecessor": {"room_id": predecessor}}, creator=upgrader, ts=9)
    if not joined:
        w.rooms["!a1v2"] = replace(w.rooms["!a1v2"], bot_membership="leave")
    return w


def test_t10_tombstone_from_a_user_without_power_is_ignored() -> None:
    w = upgraded_world(upgrader=ALICE)
    p, _ = converge(w.snapshot())
    assert p.rooms["!a1"].replaced_by is None and p.rooms["!a1"].routable
    assert "!a1v2" not in p.rooms
    assert any(r == "!a1" and "lacks the power" in why for r, why in p.report.ignored)
    assert p.writes == ()


def test_t10_tombstone_whose_new_room_does_not_point_back_is_ignored() -> None:
    for w in (upgraded_world(predecessor="!elsewhere"), upgraded_world(joined=False)):
        p, _ = converge(w.snapshot())
        assert p.rooms["!a1"].replaced_by is None
        assert p.writes == ()
        assert [r for r, _ in p.report.ignored] == ["!a1"]


def test_t11_valid_upgrade_copies_the_binding_and_swaps_the_space_link() -> None:
    w = upgraded_world()
    p, after = converge(w.snapshot())
    old_binding = state_of(w.snapshot(), "!a1", layout.BINDING_TYPE)
    assert state_of(after, "!a1v2", layout.BINDING_TYPE) == old_binding  # same platform_chat_id
    assert state_of(after, "!a1v2", "m.space.parent", "!sa") == {"via": [HS], "canonical": True}
    assert state_of(after, "!sa", "m.space.child", "!a1v2")["via"] == [HS]
    assert state_of(after, "!sa", "m.space.child", "!a1") == {}
    assert p.rooms["!a1"].replaced_by == "!a1v2" and not p.rooms["!a1"].routable
    assert p.rooms["!a1v2"].binding.platform_chat_id == "chat-!a1" and p.rooms["!a1v2"].routable
    assert p.report.upgrades_followed == (("!a1", "!a1v2"),)
    assert p.report.duplicates_resolved == ()  # the old room no longer holds the id
    assert writes_in(p, "!a1") == []


def test_t11_upgrade_by_an_empowered_owner_on_an_older_room_version_is_followed() -> None:
    w = World(version="10")
    w.space("!sa")
    w.working("!a1", "!sa")
    w.put(
        "!a1",
        "m.room.power_levels",
        "",
        {**layout.power_levels(BOT, "10"), "users": {BOT: 100, ALICE: 100}},
    )
    w.put("!a1", "m.room.tombstone", "", layout.tombstone_content("!a2", "up"), sender=ALICE)
    w.room("!a2", {"predecessor": {"room_id": "!a1"}}, creator=ALICE, members={ALICE: "join"})
    w.put(
        "!a2",
        "m.room.power_levels",
        "",
        {**layout.power_levels(BOT, "10"), "users": {BOT: 100, ALICE: 100}},
        sender=ALICE,
    )
    p, _ = converge(w.snapshot())
    assert p.rooms["!a2"].routable and p.rooms["!a1"].replaced_by == "!a2"


def test_t11_chain_of_upgrades_ends_in_the_last_room() -> None:
    w = upgraded_world()
    w.put("!a1v2", "m.room.tombstone", "", layout.tombstone_content("!a1v3", "again"))
    w.room("!a1v3", {"predecessor": {"room_id": "!a1v2"}}, ts=10)
    p, _ = converge(w.snapshot())
    assert p.rooms["!a1"].replaced_by == "!a1v2" and p.rooms["!a1v2"].replaced_by == "!a1v3"
    assert p.rooms["!a1v3"].routable and p.rooms["!a1v3"].binding.platform_chat_id == "chat-!a1"
    assert writes_in(p, "!a1v2") == []


# ---------------------------------------------------------------------------
# T12: tampering


def test_t12_binding_edited_by_a_user_is_reverted_from_the_cache() -> None:
    w = healthy_world()
    healthy = plan(w.snapshot(), CacheView(), chat_id)
    w.put(
        "!a1",
        layout.BINDING_TYPE,
        "",
        {**state_of(w.snapshot(), "!a1", layout.BINDING_TYPE), "agent": "evil"},
        sender=ALICE,
    )
    p, after = converge(w.snapshot(), cache_of(healthy))
    assert state_of(after, "!a1", layout.BINDING_TYPE)["agent"] == "echo"
    assert after.rooms["!a1"].get(layout.BINDING_TYPE).sender == BOT
    assert p.report.bindings_reverted == ("!a1",)
    assert p.rooms == healthy.rooms


def test_t12_binding_edited_by_a_user_without_a_cache_is_ignored_not_trusted() -> None:
    w = healthy_world()
    w.put(
        "!a1",
        layout.BINDING_TYPE,
        "",
        {**state_of(w.snapshot(), "!a1", layout.BINDING_TYPE), "agent": "evil"},
        sender=ALICE,
    )
    p, _ = converge(w.snapshot())
    assert "!a1" not in p.rooms  # never routed on a binding the bot did not write
    assert (
        "!a1",
        f"binding sent by {ALICE}, not the bot, and no cached copy to restore",
    ) in p.report.ignored
    assert p.writes == ()  # and its link is left alone


def test_t12_links_and_parents_sent_by_others_are_ignored_or_overwritten() -> None:
    w = healthy_world()
    w.room("!foreign", {}, creator=MALLORY)
    w.link("!sa", "!foreign", sender=ALICE)  # a link we did not write: ignored
    w.put("!sa", "m.space.child", "!a1", {}, sender=ALICE)  # hiding our room: restored
    w.put("!a2", "m.space.parent", "!evil", {"via": [HS]}, sender=ALICE)  # ignored
    p, _ = converge(w.snapshot())
    assert [(x.room_id, x.state_key) for x in p.writes] == [("!sa", "!a1")]
    assert not p.rooms["!a1"].binding.archived
    ignored = dict(p.report.ignored)
    assert "!sa" in ignored and "!a2" in ignored


# ---------------------------------------------------------------------------
# T13, T14: live events and interrupted runs


def test_t13_room_changed_during_the_run_is_replanned_from_its_fresh_state() -> None:
    w = healthy_world()
    first = plan(w.snapshot(), CacheView(), chat_id)
    # `!ai archive` ran while we read: link cleared and binding archived
    w.put("!sa", "m.space.child", "!a1", {})
    w.put(
        "!a1",
        layout.BINDING_TYPE,
        "",
        {**state_of(w.snapshot(), "!a1", layout.BINDING_TYPE), "archived": True},
    )
    stale = healthy_world().snapshot()
    refreshed = stale.with_room(w.rooms["!sa"]).with_room(w.rooms["!a1"])
    p, _ = converge(refreshed, cache_of(first))
    assert p == plan(w.snapshot(), cache_of(first), chat_id)
    assert p.writes == () and p.rooms["!a1"].binding.archived


def messy_world() -> World:
    w = World()
    w.space("!s1", ts=1, members={})
    w.working("!r1", "!s1", pcid=None, ts=2, members={})
    w.space("!s2", ts=3)
    w.working("!r2", "!s2", ts=4)
    w.working("!r3", "!s2", ts=5, link=False)
    w.working("!r4", "!s2", pcid="chat-!r2", ts=6)
    w.link("!s2", "!gone")
    w.put("!s2", "m.space.child", "!r2", {"via": "hs"})  # malformed
    w.put("!s1", layout.MEMORY_TYPE, "", {"v": 1, "notes": ["a"]})
    w.put("!r2", "m.room.tombstone", "", layout.tombstone_content("!r2b", "up"))
    w.room("!r2b", {"predecessor": {"room_id": "!r2"}}, ts=7)
    return w


def test_t14_a_run_interrupted_anywhere_completes_on_the_next_run() -> None:
    snapshot = messy_world().snapshot()
    whole, done = converge(snapshot)
    assert len(whole.writes) > 10
    for k in range(len(whole.writes)):
        partial = apply_to_snapshot(snapshot, whole.writes[:k])  # stopped after k writes
        resumed, _ = converge(partial)
        assert resumed.rooms == whole.rooms, k
        assert resumed.users == whole.users, k


# ---------------------------------------------------------------------------
# T15: room version 12


def test_t15_v12_rooms_never_list_the_bot_yet_the_bot_is_not_degraded() -> None:
    w = healthy_world()
    assert BOT not in state_of(w.snapshot(), "!a1", "m.room.power_levels")["users"]
    w.working("!a3", "!sa", pcid=None)
    p, _ = converge(w.snapshot())
    assert not any(r.degraded for r in p.rooms.values())
    assert p.report.backfilled == ("!a3",)


def test_t15_v11_rooms_need_the_bot_in_users() -> None:
    w = World(version="11")
    w.space("!sa")
    w.put("!sa", "m.room.power_levels", "", {**layout.power_levels(BOT, "11"), "users": {}})
    p, _ = converge(w.snapshot())
    assert p.rooms["!sa"].degraded


# ---------------------------------------------------------------------------
# T16: malformed content


def test_t16_bad_order_is_dropped_and_the_link_kept() -> None:
    w = healthy_world()
    w.put("!sa", "m.space.child", "!a1", {"via": [HS], "order": "\u00e9" * 80})
    p, _ = converge(w.snapshot())
    assert p.writes == ()


def test_t16_malformed_via_is_rewritten() -> None:
    w = healthy_world()
    w.put("!sa", "m.space.child", "!a1", {"via": [], "order": "0001"})
    p, _ = converge(w.snapshot())
    assert [(x.room_id, x.state_key, x.content["via"]) for x in p.writes] == [("!sa", "!a1", [HS])]


def test_t16_malformed_markers_and_bindings_are_ignored_safely() -> None:
    w = healthy_world()
    w.room(
        "!badowner",
        {"org.surfaces.kind": "working", "org.surfaces.owner": "alice", "org.surfaces.v": 1},
    )
    w.room("!impostor", layout.working_creation_content(ALICE), creator=MALLORY)
    w.room("!future", {**layout.working_creation_content(ALICE), "org.surfaces.v": 2})
    w.working("!badbinding", "!sa")
    w.put("!badbinding", layout.BINDING_TYPE, "", {"v": 1, "owner": ALICE, "agent": ["x"]})
    w.working("!nodict", "!sa")
    w.put("!nodict", layout.BINDING_TYPE, "", ["not", "a", "dict"])  # type: ignore[arg-type]
    w.rooms["!nocreate"] = RoomSnapshot("!nocreate", None, {})
    p, _ = converge(w.snapshot())
    ignored = {room for room, _ in p.report.ignored}
    assert ignored == {"!badowner", "!impostor", "!future", "!badbinding", "!nodict", "!nocreate"}
    assert ignored.isdisjoint(p.rooms)
    assert p.writes == ()  # links to ours-but-unusable rooms are left for a human


# ---------------------------------------------------------------------------
# T17: changes during downtime


def test_t17_changes_made_while_the_bot_was_down_are_picked_up() -> None:
    before = healthy_world()
    cache = cache_of(plan(before.snapshot(), CacheView(), chat_id))
    w = healthy_world()
    w.put(
        "!a1",
        layout.BINDING_TYPE,
        "",
        {**state_of(w.snapshot(), "!a1", layout.BINDING_TYPE), "agent": "gpt", "title": "Renamed"},
    )
    w.working("!a9", "!sa", ts=9)
    w.rooms.pop("!b1")
    w.put("!sb", "m.space.child", "!b1", {})
    p, _ = converge(w.snapshot(), cache)
    assert (p.rooms["!a1"].binding.agent, p.rooms["!a1"].binding.title) == ("gpt", "Renamed")
    assert p.report.adopted == ("!a9",)
    assert p.report.missing == ("!b1",)
    assert p.writes == ()


# ---------------------------------------------------------------------------
# platform_chat_id backfill, dangling links, access, foreign rooms


def test_binding_without_platform_chat_id_is_backfilled_with_a_fresh_id() -> None:
    w = healthy_world()
    w.working("!old", "!sa", pcid=None, title="Legacy")
    p, after = converge(w.snapshot())
    assert state_of(after, "!old", layout.BINDING_TYPE) == {
        "v": 1,
        "owner": ALICE,
        "space_id": "!sa",
        "agent": "echo",
        "title": "Legacy",
        "platform_chat_id": chat_id("!old"),
    }
    assert p.report.backfilled == ("!old",)


def test_backfill_reuses_the_id_the_cache_already_had() -> None:
    w = healthy_world()
    w.working("!old", "!sa", pcid=None)
    cache = CacheView(rooms={"!old": RoomRecord("!old", "working", ALICE, binding=cached_binding("kept"))})
    p, _ = converge(w.snapshot(), cache)
    assert p.rooms["!old"].binding.platform_chat_id == "kept"


def test_the_plan_marks_every_room_whose_id_it_minted() -> None:
    w = healthy_world()
    w.working("!old", "!sa", pcid=None, ts=6)
    w.working("!kept", "!sa", pcid=None, ts=7)
    w.working("!dup", "!sa", pcid="same", ts=9)
    w.working("!first", "!sa", pcid="same", ts=8)
    cache = CacheView(rooms={"!kept": RoomRecord("!kept", "working", ALICE, binding=cached_binding("kept"))})
    p, after = converge(w.snapshot(), cache)
    # Applying asks a server-state backend for exactly these; reused and healthy ids stay.
    assert p.fresh_chat_ids == {"!old": chat_id("!old"), "!dup": chat_id("!dup")}
    assert plan(after, cache_of(p), chat_id).fresh_chat_ids == {}
    assert p.rooms["!kept"].binding.platform_chat_id == "kept"
    assert p.rooms["!first"].binding.platform_chat_id == "same"


def test_dangling_links_are_removed_but_unreadable_rooms_keep_theirs() -> None:
    w = healthy_world()
    w.link("!sa", "!vanished")
    w.link("!sa", "!unreadable")
    w.room("!dm", {}, members={ALICE: "join"})
    w.link("!sa", "!dm")
    w.link("!sa", "!b1")  # Bob's room in Alice's space
    w.link("!sa", "!sb")  # a space as a child
    w.unreadable = frozenset({"!unreadable"})
    p, _ = converge(w.snapshot())
    removed = sorted(x.state_key for x in p.writes)
    assert removed == ["!b1", "!dm", "!sb", "!vanished"]
    assert all(x.content == {} for x in p.writes)
    assert p.report.foreign == 1


def test_blocked_owner_is_not_invited() -> None:
    w = World()
    w.space("!sa", members={})
    w.access = AccessDecisions({ALICE: AccessDecision("blocked", BOT, 1)})
    p, _ = converge(w.snapshot())
    assert p.writes == () and p.users[ALICE].access == "blocked"


def test_users_with_only_an_access_decision_are_listed_without_a_space() -> None:
    w = healthy_world()
    w.access = AccessDecisions(
        {BOB: AccessDecision("approved", BOT, 1), MALLORY: AccessDecision("blocked", BOT, 2)}
    )
    p, _ = converge(w.snapshot())
    assert p.users[MALLORY].space_id is None and p.users[MALLORY].access == "blocked"
    assert p.users[BOB].access == "approved" and p.users[ALICE].access is None


def test_room_moved_to_another_users_space_is_brought_home() -> None:
    w = healthy_world()
    w.working("!stray", "!sb", link=False)  # Alice's room, binding says Bob's space
    p, after = converge(w.snapshot())
    assert p.rooms["!stray"].binding.space_id == "!sa"
    assert state_of(after, "!sa", "m.space.child", "!stray")["via"] == [HS]


def test_the_plan_is_deterministic() -> None:
    snapshot = messy_world().snapshot()
    assert plan(snapshot, CacheView(), chat_id) == plan(snapshot, CacheView(), chat_id)


def test_an_upgraded_conversation_keeps_its_id_against_a_younger_duplicate() -> None:
    p = plan(messy_world().snapshot(), CacheView(), chat_id)
    assert p.rooms["!r2b"].binding.platform_chat_id == "chat-!r2"  # the conversation began in !r2
    assert p.rooms["!r4"].binding.platform_chat_id == chat_id("!r4")
    assert ("!s2", "!r2") in p.report.links_removed  # its malformed link is tidied too


# ---------------------------------------------------------------------------
# invariants of the design, checked on a converged world: `p` is the plan, `after` the snapshot
# once its writes landed (as Synapse accepts them). Each names what broke when it fails.


def maintainable(p: Plan, room_id: str | None) -> bool:
    """Ours, the bot is in it, and it has the power to maintain it (not degraded)."""
    record = p.rooms.get(room_id or "")
    return record is not None and record.bot_membership == "join" and not record.degraded


def bot_sent(after: Snapshot, room_id: str, type_: str, key: str = "") -> Any:
    """The content of that state event if the bot sent it, else None."""
    event = after.rooms[room_id].get(type_, key)
    return event.content if event is not None and event.sender == after.bot_id else None


def canonical_space(p: Plan, owner: str) -> str | None:
    user = p.users.get(owner)
    return user.space_id if user else None


def trusted_binding(snapshot: Snapshot, room_id: str, owner: str) -> Binding | None:
    """The binding the room's own state holds, if the bot sent it for this owner."""
    event = snapshot.rooms[room_id].get(layout.BINDING_TYPE)
    parsed = layout.parse_binding(event.content) if event and event.sender == BOT else None
    return parsed if parsed is not None and parsed.owner == owner else None


def conversation(binding: Binding) -> Binding:
    """A binding without what the planner may change (Space, archive flag, chat id)."""
    return replace(binding, space_id="", archived=False, platform_chat_id=None)


def without_others_layout_state(snapshot: Snapshot) -> Snapshot:
    """The snapshot without `org.surfaces.*`, `m.space.child` and `m.space.parent` state sent
    by anyone but the bot."""

    def forged(event: Any) -> bool:
        layout_type = event.type in ("m.space.child", "m.space.parent")
        return event.sender != BOT and (layout_type or event.type.startswith("org.surfaces."))

    rooms = {
        room_id: replace(room, state={k: e for k, e in room.state.items() if not forged(e)})
        for room_id, room in snapshot.rooms.items()
    }
    return replace(snapshot, rooms=rooms)


def check_one_canonical_space_per_user(p: Plan, after: Snapshot) -> None:
    """A user's Spaces the bot is in: one canonical, the writable others tombstoned (to it when
    merged now), unwritable duplicates left alone; a writable Space wins over a degraded one."""
    merged: dict[str, set[str]] = {}
    for loser, winner in p.report.spaces_merged:
        merged.setdefault(winner, set()).add(loser)
    for user_id, user in p.users.items():
        spaces = {r: x for r, x in p.rooms.items() if x.kind == "space" and x.owner == user_id}
        live = {r for r, x in spaces.items() if x.bot_membership == "join" and not x.replaced_by}
        canonical = user.space_id
        if canonical is None:
            assert not live, (user_id, live)
            continue
        losers = merged.get(canonical, set())
        assert canonical in live, (user_id, canonical)
        assert live - {canonical} == {s for s in losers if not maintainable(p, s)}, user_id
        if any(maintainable(p, s) for s in losers):
            assert maintainable(p, canonical), (user_id, canonical)
        for space_id, record in spaces.items():
            if space_id == canonical or not maintainable(p, space_id):
                continue
            room = after.rooms[space_id]
            tombstone = room.get("m.room.tombstone")
            assert record.replaced_by is not None and tombstone is not None, space_id
            assert layout.parse_tombstone(tombstone.content) == record.replaced_by, space_id
            assert user_level(room, tombstone.sender) >= state_level(room, "m.room.tombstone")
            if space_id in losers:
                assert record.replaced_by == canonical and tombstone.sender == BOT, space_id


def check_routed_rooms_linked_both_ways(p: Plan, after: Snapshot) -> None:
    """A routed room the bot maintains: its only live bot-sent parent names its binding's Space,
    with the exact content; if the owner's canonical Space is maintained too, that Space holds a
    live bot-sent child link to it and no other maintained Space does."""
    for room_id, record in p.rooms.items():
        if not record.routable or not maintainable(p, room_id):
            continue
        assert record.binding is not None
        parents = {
            key
            for key, event in after.rooms[room_id].of_type("m.space.parent").items()
            if event.sender == BOT and layout.is_live_link(event.content)
        }
        assert parents == {record.binding.space_id}, (room_id, parents)
        parent = bot_sent(after, room_id, "m.space.parent", record.binding.space_id)
        assert parent == layout.space_parent_content(HS), (room_id, parent)
        space = canonical_space(p, record.owner)
        if not maintainable(p, space):
            continue
        assert space is not None
        link = bot_sent(after, space, "m.space.child", room_id)
        assert layout.is_live_link(link), (space, room_id, link)
        elsewhere = [
            s
            for s, x in p.rooms.items()
            if x.kind == "space"
            and s != space
            and maintainable(p, s)
            and layout.is_live_link(bot_sent(after, s, "m.space.child", room_id))
        ]
        assert not elsewhere, (room_id, elsewhere)


def check_bindings_are_the_bots(p: Plan, after: Snapshot) -> None:
    """A working room the bot maintains (not replaced): Matrix holds the recorded binding, sent
    by the bot; a routed one names the owner's canonical Space (when maintained) and a chat id."""
    for room_id, record in p.rooms.items():
        if record.kind != "working" or record.replaced_by or not maintainable(p, room_id):
            continue
        content = bot_sent(after, room_id, layout.BINDING_TYPE)
        assert content is not None, room_id
        assert layout.parse_binding(content) == record.binding, (room_id, content)
        if record.routable:
            assert record.binding is not None and record.binding.platform_chat_id, room_id
            space = canonical_space(p, record.owner)
            if maintainable(p, space):
                assert record.binding.space_id == space, (room_id, space)


def check_chat_ids_unique(p: Plan) -> None:
    """No routed room shares the platform_chat_id of a routed room the bot maintains (two
    degraded rooms may keep a shared id: neither can be rewritten)."""
    holders: dict[str, list[str]] = {}
    for room_id, record in p.rooms.items():
        if record.routable and record.binding and record.binding.platform_chat_id:
            holders.setdefault(record.binding.platform_chat_id, []).append(room_id)
    for pcid, rooms in holders.items():
        if any(maintainable(p, r) for r in rooms):
            assert len(rooms) == 1, (pcid, rooms)


def check_records_ignore_others_state(snapshot: Snapshot, cache: CacheView, p: Plan) -> None:
    """Layout state sent by anyone but the bot never shows in the records: planning without it
    gives the same records; every record is a room the bot created (or a verified upgrade of
    one), and a working room's conversation comes from a bot-sent binding in the room, its
    predecessor's, or the cache's copy (a revert); a forged binding alone routes nothing."""
    clean = plan(without_others_layout_state(snapshot), cache, chat_id)
    assert clean.rooms == p.rooms, "records changed by layout state the bot did not send"
    assert clean.users == p.users, "users changed by layout state the bot did not send"
    predecessor = {x.replaced_by: r for r, x in p.rooms.items() if x.kind == "working"}
    for room_id, record in p.rooms.items():
        create = snapshot.rooms[room_id].create
        assert create is not None and (create.sender == BOT or room_id in predecessor), room_id
        if record.kind != "working":
            continue
        assert record.binding is not None and record.binding.owner == record.owner
        source = trusted_binding(snapshot, room_id, record.owner)
        if source is None and room_id in predecessor:
            source = p.rooms[predecessor[room_id]].binding
        if source is None:
            cached = cache.rooms.get(room_id)
            assert cached is not None and cached.owner == record.owner, (room_id, "forged")
            source = cached.binding
        assert source is not None, room_id
        assert conversation(record.binding) == conversation(source), room_id


def check_design_invariants(snapshot: Snapshot, cache: CacheView, p: Plan, after: Snapshot) -> None:
    check_one_canonical_space_per_user(p, after)
    check_routed_rooms_linked_both_ways(p, after)
    check_bindings_are_the_bots(p, after)
    check_chat_ids_unique(p)
    check_records_ignore_others_state(snapshot, cache, p)


# ---------------------------------------------------------------------------
# property: any world built from these pieces converges to the designed layout

FORGERS = [ALICE, MALLORY]
POWER_LEVELS = [
    {"users": {BOT: 0}, "state_default": 50},  # demoted (a v12 creator still outranks all)
    {"users": {BOT: 50}, "state_default": 50, "events": {"m.space.child": 100}},  # Space only
    {"users": {BOT: 50}, "state_default": 50, "invite": 100},  # can maintain, cannot invite
    {"users": {BOT: 100, MALLORY: 100}, "state_default": 50},  # a promoted user
]


@st.composite
def worlds(draw: st.DrawFn) -> tuple[Snapshot, CacheView]:
    """A world, and a cache: empty, or as a run before the damage left it."""
    w = World(version=draw(st.sampled_from(["10", "12"])))
    owners = [ALICE, BOB]
    spaces = []
    for i in range(draw(st.integers(0, 3))):
        members = draw(st.sampled_from([None, {}, {ALICE: "leave"}]))
        owner = draw(st.sampled_from(owners))
        spaces.append(w.space(f"!s{i}", owner, ts=draw(st.integers(0, 3)), members=members))
    targets = [*spaces, "!nowhere"]
    rooms = []
    for i in range(draw(st.integers(0, 6))):
        rooms.append(
            w.working(
                f"!r{i}",
                draw(st.sampled_from(targets)),
                draw(st.sampled_from(owners)),
                pcid=draw(st.sampled_from([None, "p1", "p2", "default"])),
                link=draw(st.booleans()),
                archived=draw(st.booleans()),
                ts=draw(st.integers(0, 3)),
            )
        )
    cache = cache_of(plan(w.snapshot(), CacheView(), chat_id)) if draw(st.booleans()) else CacheView()
    everything = spaces + rooms
    for _ in range(draw(st.integers(0, 6))) if everything else ():
        room = draw(st.sampled_from(everything))
        other = draw(st.sampled_from([*everything, "!elsewhere"]))
        match draw(st.integers(0, 9)):
            case 0:
                w.kick_bot(room)
            case 1:
                w.put(room, "m.space.child", other, {}, sender=draw(st.sampled_from([BOT, ALICE])))
            case 2:
                sender = draw(st.sampled_from([BOT, *FORGERS]))
                w.link(room, other, draw(st.sampled_from(["0001", "bad\x01"])), sender=sender)
            case 3:
                sender = draw(st.sampled_from([BOT, MALLORY]))
                w.put(room, "m.room.tombstone", "", layout.tombstone_content(other, "x"), sender=sender)
            case 4:
                creator = draw(st.sampled_from([BOT, ALICE]))
                w.room(f"{room}v2", {"predecessor": {"room_id": room}}, creator=creator, ts=5)
                w.put(room, "m.room.tombstone", "", layout.tombstone_content(f"{room}v2", "x"))
            case 5:
                w.put(
                    room,
                    layout.BINDING_TYPE,
                    "",
                    {"v": 1, "agent": 3},
                    sender=draw(st.sampled_from([BOT, ALICE])),
                )
            case 6:
                w.put(room, "m.room.power_levels", "", draw(st.sampled_from(POWER_LEVELS)))
            case 7:
                w.put(room, "m.room.member", ALICE, {"membership": "leave"}, sender=ALICE)
            case 8:  # a well-formed binding forged by a user: other agent, Space and chat id
                event = w.rooms[room].get(layout.BINDING_TYPE)
                base = event.content if event and isinstance(event.content, dict) else {}
                forged = {
                    "v": 1,
                    "owner": ALICE,
                    "title": "Forged",
                    **base,
                    "agent": "evil",
                    "space_id": other,
                    "platform_chat_id": draw(st.sampled_from(["p1", "p2", "stolen"])),
                }
                w.put(room, layout.BINDING_TYPE, "", forged, sender=draw(st.sampled_from(FORGERS)))
            case _:
                w.put(
                    room,
                    "m.space.parent",
                    other,
                    {"via": [HS]},
                    sender=draw(st.sampled_from([BOT, *FORGERS])),
                )
    return w.snapshot(), cache


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(worlds(), st.integers(0, 50))
def test_any_world_converges_even_when_a_run_is_interrupted(
    world: tuple[Snapshot, CacheView], k: int
) -> None:
    """Converges, with the design's invariants holding, also after a run stopped after k writes."""
    snapshot, cache = world
    # what only the cache knows (a binding restored where the bot can't write it back, and what
    # follows from it) is lost with the DB: wiping it is checked only when there was none
    wiped = not cache.rooms
    whole, after = converge(snapshot, cache, wiped=wiped)
    check_design_invariants(snapshot, cache, whole, after)
    partial = apply_to_snapshot(snapshot, whole.writes[: k % (len(whole.writes) + 1)])
    resumed, resumed_after = converge(partial, cache, wiped=wiped)
    assert resumed.rooms == whole.rooms
    assert resumed.users == whole.users
    check_design_invariants(partial, cache, resumed, resumed_after)


def test_link_to_a_cached_room_missing_from_the_snapshot_is_unlinked_as_lost() -> None:
    w = healthy_world()
    cache = cache_of(plan(w.snapshot(), CacheView(), chat_id))
    w.rooms.pop("!a1")  # kicked, and the inventory only read joined rooms
    p, after = converge(w.snapshot(), cache)
    assert state_of(after, "!sa", "m.space.child", "!a1") == {"org.surfaces.unlinked": "lost"}
    assert p.report.missing == ("!a1",)


def test_a_space_that_never_linked_a_room_is_an_unfinished_onboarding() -> None:
    w = World()
    w.space("!empty", ALICE)
    w.space("!sb", BOB, members={BOB: "join"})
    w.working("!b1", "!sb", BOB)
    assert plan(w.snapshot(), CacheView(), chat_id).report.unfinished_onboardings == (ALICE,)
    # A Space whose rooms were all archived (or lost) still has their removed links: finished.
    w.link("!empty", "!gone")
    w.put("!empty", "m.space.child", "!gone", {})
    assert plan(w.snapshot(), CacheView(), chat_id).report.unfinished_onboardings == ()
