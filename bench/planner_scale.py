"""The pure reconciliation planner alone, on synthetic snapshots of many rooms.

Builds snapshots the way the inventory would read them from Synapse (contract §3 layout, content
from the layout builders) with devtools.worlds, the planner unit tests' builder, with a sprinkle of foreign rooms and untrusted or malformed state, then
times the planner the way the runner calls it (`plan_with_gc_frozen`) with an empty cache (plugin
DB lost) and with a warm cache (the previous plan's rows), and bare `plan()` for comparison; and
measures the planner's peak allocations with tracemalloc in a separate run. Each timed run plans a
snapshot built just before, with no `gc.collect()` in between, as the runner plans the snapshot the
inventory just read.

    .venv/bin/python -m bench.planner_scale [--quick] [--sizes 10000,50000] [--profile]
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

from bench._common import median, table, write_result
from devtools.worlds import World
from surfaces_plugin import layout
from surfaces_plugin.reconcile.gcfreeze import plan_with_gc_frozen
from surfaces_plugin.reconcile.model import CacheView, Snapshot
from surfaces_plugin.reconcile.plan import NewChatId, Plan, plan

SERVER = "bench.example"
BOT = f"@surfaces:{SERVER}"
ROOMS_PER_USER = 20
ROOM_VERSION = "12"
TARGET_50K_S = 2.0


def synthetic_world(n_working: int, seed_ts: int = 1_700_000_000_000) -> World:
    """`n_working` working rooms over n/20 users (one Space each), plus ~2% foreign rooms and
    ~1% untrusted or malformed state (wrong senders, bad content, orphans without a link).
    Our rooms are built from the layout's createRoom requests as Synapse creates them."""
    w = World(ROOM_VERSION, bot=BOT, server=SERVER)
    n_users = max(1, n_working // ROOMS_PER_USER)
    ts = seed_ts
    made = 0
    for u in range(n_users):
        owner = f"@user{u}:{SERVER}"
        space_id = f"!space{u:06d}"
        space_req = layout.space_create_request(
            owner, f"user{u}'s agents", BOT, SERVER, ROOM_VERSION
        )
        w.created(space_id, space_req, owner, ts=ts)
        ts += 100
        count = ROOMS_PER_USER if u < n_users - 1 else n_working - made
        for r in range(count):
            room_id = f"!work{made:07d}"
            made += 1
            binding = layout.Binding(
                owner=owner,
                space_id=space_id,
                agent="echo",
                title=f"Room {r}",
                platform_chat_id=f"echo-{made:012x}",
            )
            req = layout.working_room_create_request(
                owner, space_id, binding, BOT, SERVER, ROOM_VERSION
            )
            w.created(room_id, req, owner, ts=ts)
            order = layout.order_key(ts)
            ts += 100
            kind = made % 100
            if kind == 7:  # the owner tried to rewrite the binding (ignored, restored or dropped)
                bad = {**binding.to_content(), "agent": "gpt-evil"}
                w.put(room_id, layout.BINDING_TYPE, "", bad, sender=owner)
            elif kind == 13:  # malformed child link content sent by the bot
                w.put(space_id, layout.SPACE_CHILD_TYPE, room_id, {"via": "nope"})
                continue
            elif kind == 29:  # orphan: the crash came before the child link
                continue
            w.link(space_id, room_id, order)
            if kind == 41:  # a child link added by the owner to a room that is not ours
                stray = layout.space_child_content(SERVER)
                w.put(space_id, layout.SPACE_CHILD_TYPE, f"!stray{made}", stray, sender=owner)
    for f in range(max(1, n_working // 50)):  # DMs and other rooms the bot was invited to
        user = f"@user{f % n_users}:{SERVER}"
        # someone else's room, one in ten claiming our markers
        creation = layout.working_creation_content(user) if f % 10 == 0 else {}
        w.room(f"!foreign{f:06d}", creation, creator=user, ts=ts, members={user: "join"})
        ts += 10
    return w


def synthetic_snapshot(n_working: int, seed_ts: int = 1_700_000_000_000) -> Snapshot:
    return synthetic_world(n_working, seed_ts).snapshot()


def _new_chat_id() -> Callable[[str], str]:
    counter = iter(range(10**9))
    return lambda room_id: f"echo-new-{next(counter):012x}"


def warm_cache(result: Plan) -> CacheView:
    return CacheView(users=dict(result.users), rooms=dict(result.rooms))


Planner = Callable[[Snapshot, CacheView, NewChatId], Plan]


def time_plan(
    n_working: int, cache: CacheView, repeats: int, planner: Planner = plan_with_gc_frozen
) -> tuple[float, float, Plan]:
    """(median CPU seconds, median wall seconds, plan). Each repeat builds its snapshot anew and
    plans it at once, like the runner after the inventory: new objects (RoomSnapshot also caches
    derived views on itself) and no full collection beforehand, so a full GC pass the planner
    triggers costs here what it costs in production. CPU time is the figure to read on a shared
    machine: wall time there includes waiting for a core."""
    cpu, wall, result = [], [], None
    for _ in range(repeats):
        result = None  # only the inputs are alive while planning, as in the runner
        snapshot = synthetic_snapshot(n_working)
        started, started_cpu = time.perf_counter(), time.process_time()
        result = planner(snapshot, cache, _new_chat_id())
        cpu.append(time.process_time() - started_cpu)
        wall.append(time.perf_counter() - started)
        del snapshot
    assert result is not None
    return median(cpu), median(wall), result


def peak_plan_mib(n_working: int, cache: CacheView) -> float:
    """Peak memory the planner allocates on top of its inputs."""
    snapshot = synthetic_snapshot(n_working)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        plan_with_gc_frozen(snapshot, cache, _new_chat_id())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return (peak - base) / 2**20


def profile(snapshot: Snapshot, cache: CacheView) -> str:
    try:
        from pyinstrument import Profiler
    except ImportError:
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        prof.runcall(plan_with_gc_frozen, snapshot, cache, _new_chat_id())
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(25)
        return out.getvalue()
    profiler = Profiler(interval=0.0005)
    profiler.start()
    plan_with_gc_frozen(snapshot, cache, _new_chat_id())
    profiler.stop()
    return profiler.output_text(unicode=False, color=False, show_all=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="1,000 and 10,000 rooms, fewer repeats"
    )
    parser.add_argument("--sizes", help="comma-separated working-room counts")
    parser.add_argument("--profile", action="store_true", help="profile the largest size")
    args = parser.parse_args()
    sizes = [1000, 10_000] if args.quick else [1000, 10_000, 50_000]
    if args.sizes:
        sizes = [int(s) for s in args.sizes.split(",")]
    repeats = 2 if args.quick else 3

    rows, records = [], []
    for n in sizes:
        snapshot = synthetic_snapshot(n)
        n_rooms = len(snapshot.rooms)
        state_events = sum(len(r.state) for r in snapshot.rooms.values())
        del snapshot  # each timed run builds its own
        cold_s, cold_wall, first = time_plan(n, CacheView(), repeats)
        warm = warm_cache(first)
        warm_s, warm_wall, second = time_plan(n, warm, repeats)
        bare_s, _, _ = time_plan(n, CacheView(), repeats, planner=plan)
        cold_mib = peak_plan_mib(n, CacheView())
        warm_mib = peak_plan_mib(n, warm)
        record = {
            "working_rooms": n,
            "rooms_in_snapshot": n_rooms,
            "state_events": state_events,
            "cold_cache_s": cold_s,
            "warm_cache_s": warm_s,
            "cold_cache_wall_s": cold_wall,
            "cold_cache_bare_plan_s": bare_s,
            "warm_cache_wall_s": warm_wall,
            "cold_us_per_room": cold_s / n_rooms * 1e6,
            "warm_us_per_room": warm_s / n_rooms * 1e6,
            "cold_peak_mib": cold_mib,
            "warm_peak_mib": warm_mib,
            "writes_cold": len(first.writes),
            "writes_warm": len(second.writes),
            "ignored": len(first.report.ignored),
        }
        records.append(record)
        rows.append(
            [
                n,
                n_rooms,
                state_events,
                cold_s,
                warm_s,
                cold_wall,
                bare_s,
                record["cold_us_per_room"],
                cold_mib,
                warm_mib,
                len(first.writes),
                len(first.report.ignored),
            ]
        )
        print(f"  {n} rooms: no cache {cold_s:.3f} s CPU, warm {warm_s:.3f} s CPU", flush=True)

    print()
    print(
        table(
            [
                "working rooms",
                "rooms",
                "state events",
                "plan CPU s (no cache)",
                "plan CPU s (warm)",
                "wall s (no cache)",
                "CPU s, bare plan() (no cache)",
                "µs/room",
                "peak MiB (no cache)",
                "peak MiB (warm)",
                "writes",
                "ignored",
            ],
            rows,
        )
    )
    big = max(records, key=lambda r: r["working_rooms"])
    small = min(records, key=lambda r: r["working_rooms"])
    growth = (big["cold_us_per_room"] / small["cold_us_per_room"]) if big is not small else 1.0
    verdict = {
        "largest_rooms": big["working_rooms"],
        "largest_cold_s": big["cold_cache_s"],
        "per_room_cost_growth": growth,
        "target_50k_under_s": TARGET_50K_S,
    }
    if big["working_rooms"] >= 50_000:
        verdict["target_met"] = (
            big["cold_cache_s"] < TARGET_50K_S and big["warm_cache_s"] < TARGET_50K_S
        )
    print(
        f"\nPer-room cost at {big['working_rooms']} vs {small['working_rooms']} rooms: "
        f"{growth:.2f}× (1.0 = perfectly linear)"
    )
    if "target_met" in verdict:
        print(
            f"Target: 50,000 rooms under {TARGET_50K_S} s: {'met' if verdict['target_met'] else 'MISSED'}"
        )
    result: dict[str, Any] = {"sizes": records, "verdict": verdict}
    if args.profile:
        snapshot = synthetic_snapshot(big["working_rooms"])
        text = profile(snapshot, CacheView())
        print("\nProfile (no cache):\n" + text)
        result["profile_no_cache"] = text
    path = write_result("planner_scale", result)
    print(f"\nWrote {path}")


if __name__ == "__main__":
    main()
