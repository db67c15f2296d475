"""Startup reconciliation at scale on a real Synapse, against the floor of reading every room's state.

For each N: a Synapse seeded with N working rooms in the contract's layout (several users, one
Space each, every room linked, owners joined), cached in bench/.cache/ so later runs skip seeding.
Then, in one run on one Synapse:

- floor: GET /joined_rooms + GET /state of every room at the same concurrency, plain aiohttp;
- first start: a fresh bot database (no sync token either: maubot's initial sync runs alongside);
- warm: restart the bot (plugin DB intact); its writes must be 0;
- DB lost: the plugin's tables dropped (the maubot sync token kept, as on a full server where the
  plugin DB is its own file), then start;
- warm again after the DB-loss run (writes must be 0).

Reconciliation seconds come from the bot's log line "Reconciliation done: … X s, N writes";
"ready" is from process start to maubot's "Startup completed" (plugin start() returned: after
reconciliation AND catch-up, the /messages read-back of every working room). Peak RSS is the
maubot process's VmHWM.

    .venv/bin/python -m bench.reconcile_scale [--quick] [--sizes 100,300,1000] [--reseed]
        [--degraded]

Results go to bench/results/reconcile_scale_n<sizes>[_degraded].json. Floor samples are taken
only while no bot process runs: each bot run ends when its background catch-up has logged that
it is done, and the bot is stopped before the next floor sample.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from bench._common import (
    CACHE_DIR,
    first_line_with,
    log_time,
    median,
    proc_status_kib,
    table,
    write_result,
)
from bench._matrix import CS, bounded, create_body
from devtools.maubot_standalone import STARTED, StandaloneBot
from devtools.procs import LogCursor
from devtools.synapse import SynapseServer
from surfaces_plugin import layout

FIRST_START = "first start (empty DB, no sync token)"
SEED_VERSION = 1  # bump when the seeded layout changes, so stale caches are not reused
ROOMS_PER_USER = 25
SEED_CONCURRENCY = 6
BOT_LOCALPART = "surfaces-bench"
BOT_PASSWORD = "surfaces-bench-password"
USER_PASSWORD = "password"
DONE_RE = re.compile(
    r"Reconciliation done: \*\*Reconciliation\*\* \((\w+)\): ([\d.]+) s, (\d+) writes"
)
# The plugin's own tables (its migrations) plus the mautrix UpgradeTable's version table.
_TABLE_RE = re.compile(r"CREATE TABLE (?:IF NOT EXISTS )?(\w+)")


# ---------------------------------------------------------------------------
# seeding


async def _seed_rooms(synapse: SynapseServer, n: int, bot_token: str) -> dict[str, Any]:
    n_users = max(2, -(-n // ROOMS_PER_USER))
    users = {}
    for u in range(n_users):
        localpart = f"bench-user{u:03d}"
        users[synapse.user_id(localpart)] = await asyncio.to_thread(
            synapse.register_user, localpart, USER_PASSWORD
        )
    bot_id = synapse.user_id(BOT_LOCALPART)
    server = synapse.server_name
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        bot = CS(session, synapse.url, bot_token)
        version = await bot.default_room_version()
        owners = list(users)

        async def make_space(owner: str) -> str:
            req = layout.space_create_request(
                owner, f"{owner[1:].split(':')[0]}'s agents", bot_id, server, version
            )
            return await bot.create_room(create_body(req, [owner]))

        spaces = dict(
            zip(
                owners,
                await bounded(SEED_CONCURRENCY, [make_space(o) for o in owners]),
                strict=True,
            )
        )
        plan = [(owners[i % n_users], i) for i in range(n)]

        async def make_room(owner: str, i: int) -> tuple[str, str]:
            binding = layout.Binding(
                owner=owner,
                space_id=spaces[owner],
                agent="echo",
                title=f"Room {i}",
                platform_chat_id=f"echo-{uuid.uuid4().hex}",
            )
            req = layout.working_room_create_request(
                owner, spaces[owner], binding, bot_id, server, version
            )
            room_id = await bot.create_room(create_body(req, [owner]))
            link = layout.space_child_content(server, layout.order_key(int(time.time() * 1000)))
            await bot.put_state(spaces[owner], layout.SPACE_CHILD_TYPE, room_id, link)
            return owner, room_id

        started = time.monotonic()
        rooms = await bounded(SEED_CONCURRENCY, [make_room(o, i) for o, i in plan])
        print(f"    created {n} rooms in {time.monotonic() - started:.0f} s", flush=True)
        clients = {o: CS(session, synapse.url, t) for o, t in users.items()}
        joins = [clients[o].join(s) for o, s in spaces.items()]
        joins += [clients[o].join(r) for o, r in rooms]
        await bounded(SEED_CONCURRENCY, joins)
    return {
        "n": n,
        "users": owners,
        "spaces": spaces,
        "rooms": [r for _, r in rooms],
        "room_version": version,
    }


def seeded_synapse(n: int, reseed: bool) -> tuple[SynapseServer, dict[str, Any], float | None]:
    """A started Synapse on a copy of the cached seed for N (seeding it first when missing)."""
    cached = CACHE_DIR / f"reconcile-n{n}-v{SEED_VERSION}"
    seed_s = None
    if reseed and cached.exists():
        shutil.rmtree(cached)
    if not (cached / "seed.json").exists():
        print(f"  seeding N={n} (cached afterwards in {cached})", flush=True)
        started = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix="surfaces-bench-seed-"))
        synapse = SynapseServer(work / "synapse").start()
        try:
            token = synapse.register_user(BOT_LOCALPART, BOT_PASSWORD)
            synapse.override_ratelimit(synapse.user_id(BOT_LOCALPART))
            meta = asyncio.run(_seed_rooms(synapse, n, token))
        finally:
            synapse.stop()
        if cached.exists():
            shutil.rmtree(cached)
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(work / "synapse", cached / "synapse")
        (cached / "seed.json").write_text(json.dumps(meta))
        shutil.rmtree(work, ignore_errors=True)
        seed_s = time.monotonic() - started
        print(f"  seeded N={n} in {seed_s:.0f} s", flush=True)
    meta = json.loads((cached / "seed.json").read_text())
    work = Path(tempfile.mkdtemp(prefix="surfaces-bench-run-"))
    shutil.copytree(cached / "synapse", work / "synapse")
    for stale in ("homeserver.log", "stdout.log", "homeserver.pid"):
        (work / "synapse" / stale).unlink(missing_ok=True)
    return SynapseServer(work / "synapse").start(), meta, seed_s


# ---------------------------------------------------------------------------
# a degraded world: what crashes, tampering and kicks leave behind (docs/reconciliation.md)

DEGRADED_SHARE = 0.05  # of the working rooms, for each kind of room damage


async def degrade(synapse: SynapseServer, meta: dict[str, Any], bot_token: str) -> dict[str, int]:
    """Damage the seeded world the way the reconciliation cases describe; returns the counts.

    Rooms created after a crash left them unlinked (T3), bindings from before
    `platform_chat_id` existed (backfill), a second Space for some users (T4), rooms the bot
    lost (T8), and rooms users made with forged markers and invited the bot to (T12, ignored).
    """
    rooms, users, spaces = meta["rooms"], meta["users"], meta["spaces"]
    k = max(1, int(len(rooms) * DEGRADED_SHARE))
    server, bot_id = synapse.server_name, synapse.user_id(BOT_LOCALPART)
    version = meta["room_version"]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        bot = CS(session, synapse.url, bot_token)

        async def unbackfilled(room_id: str) -> None:
            state = {(e["type"], e["state_key"]): e for e in await bot.state(room_id)}
            content = dict(state[(layout.BINDING_TYPE, "")]["content"])
            content.pop("platform_chat_id", None)
            await bot.put_state(room_id, layout.BINDING_TYPE, "", content)

        async def unlinked(i: int) -> None:
            owner = users[i % len(users)]
            binding = layout.Binding(owner, spaces[owner], "echo", f"Unlinked {i}")
            req = layout.working_room_create_request(
                owner, spaces[owner], binding, bot_id, server, version
            )
            await bot.create_room(create_body(req, [owner]))

        async def second_space(owner: str) -> None:
            req = layout.space_create_request(owner, "Duplicate", bot_id, server, version)
            await bot.create_room(create_body(req, [owner]))

        async def forged(owner: str) -> None:
            user = await CS.login(session, synapse.url, owner, USER_PASSWORD)
            body = {
                "preset": "private_chat",
                "creation_content": layout.working_creation_content(owner),
                "initial_state": [{"type": layout.BINDING_TYPE, "state_key": "", "content": {
                    "v": 1, "owner": owner, "space_id": spaces[owner], "agent": "echo",
                    "title": "Forged", "platform_chat_id": "forged"}}],
                "invite": [bot_id],
            }
            room_id = await user.create_room(body)
            await bot.join(room_id)

        dup_users = users[: max(1, len(users) // 10)]
        await bounded(SEED_CONCURRENCY, [unbackfilled(r) for r in rooms[:k]])
        await bounded(SEED_CONCURRENCY, [bot.leave(r) for r in rooms[k : 2 * k]])
        await bounded(SEED_CONCURRENCY, [unlinked(i) for i in range(k)])
        await bounded(SEED_CONCURRENCY, [second_space(o) for o in dup_users])
        await bounded(SEED_CONCURRENCY, [forged(o) for o in dup_users])
    return {
        "bindings_without_chat_id": k,
        "rooms_lost": k,
        "rooms_unlinked": k,
        "duplicate_spaces": len(dup_users),
        "forged_rooms": len(dup_users),
    }


# ---------------------------------------------------------------------------
# measurements


async def floor_once(synapse: SynapseServer, token: str, concurrency: int) -> tuple[float, int]:
    """Seconds to list joined rooms and fetch (and decode) every room's full state."""
    async with aiohttp.ClientSession() as session:
        cs = CS(session, synapse.url, token)
        started = time.perf_counter()
        joined = await cs.joined_rooms()
        await bounded(concurrency, [cs.state(r) for r in joined])
        return time.perf_counter() - started, len(joined)


CATCH_UP_DONE = "Catch-up: "  # the plugin's log line when background catch-up has ended


def bot_run(bot: StandaloneBot, label: str) -> dict[str, Any]:
    """Start the bot, read this start's reconciliation and catch-up from its log, stop it.

    The bot is stopped before returning, so floor samples taken between runs see no bot at work.
    """
    if bot.running:
        bot.stop()
    cursor = LogCursor(bot.log_path)
    spawned = time.time()
    bot.start(timeout=900)
    assert bot._proc is not None
    pid = bot._proc.pid
    text = cursor.new_text()
    deadline = time.monotonic() + 900
    while first_line_with(text, CATCH_UP_DONE) is None and time.monotonic() < deadline:
        time.sleep(0.2)  # catch-up runs in the background after start() returned
        text += cursor.new_text()
    peak_rss, rss = proc_status_kib(pid, "VmHWM"), proc_status_kib(pid, "VmRSS")
    bot.stop()
    done_line = first_line_with(text, "Reconciliation done:")
    started_line = first_line_with(text, STARTED)
    caught_up_line = first_line_with(text, CATCH_UP_DONE)
    if done_line is None or started_line is None or caught_up_line is None:
        raise RuntimeError(f"{label}: no reconciliation or catch-up line in the log\n{text[-3000:]}")
    m = DONE_RE.search(done_line)
    assert m, done_line
    done_at, ready_at = log_time(done_line), log_time(started_line)
    caught_up_at = log_time(caught_up_line)
    counts = dict(re.findall(r"; - ([\w ]+): (\d+)", done_line))
    phases = _phases(text, done_line, caught_up_line)
    return {
        "run": label,
        "reconcile_s": float(m.group(2)),
        "writes": int(m.group(3)),
        **phases,
        "start_to_reconciled_s": (done_at - spawned) if done_at else None,
        "start_to_ready_s": (ready_at - spawned) if ready_at else None,
        "catch_up_s": (caught_up_at - done_at) if caught_up_at and done_at else None,
        "peak_rss_mib": (peak_rss or 0) / 1024,
        "rss_mib": (rss or 0) / 1024,
        "counts": {k: int(v) for k, v in counts.items()},
    }


def _phases(text: str, done_line: str, caught_up_line: str) -> dict[str, Any]:
    """Split the reconciliation by the bot's HTTP log: reading Matrix (from the /joined_rooms
    request to the last /state answer) vs the rest (read cache, plan, writes, cache rebuild);
    and count catch-up's /messages requests until catch-up said it was done."""
    lines = text.splitlines()
    end, caught_up = lines.index(done_line), lines.index(caught_up_line)
    before, catch_up = lines[:end], lines[end + 1 : caught_up]
    listed = next((ln for ln in reversed(before) if "/v3/joined_rooms None" in ln), None)
    states = [ln for ln in before if "/state) completed in" in ln]
    done_at = log_time(done_line)
    out: dict[str, Any] = {"state_reads": len(states)}
    if listed and states and done_at:
        begin, read_end = log_time(listed), log_time(states[-1])
        if begin and read_end:
            out["inventory_s"] = read_end - begin
            out["after_inventory_s"] = done_at - read_end
    out["catch_up_requests"] = sum("/messages) completed in" in ln for ln in catch_up)
    return out


def measure(n: int, concurrency: int, reseed: bool, floors: int, degraded: bool) -> dict[str, Any]:
    synapse, meta, seed_s = seeded_synapse(n, reseed)
    work = synapse.data_dir.parent
    bot: StandaloneBot | None = None
    floor_samples: list[float] = []
    damage: dict[str, int] = {}

    def floor(k: int = 1) -> None:
        """Sampled only while no bot process runs (bot_run stops the bot before returning)."""
        assert bot is None or not bot.running
        for _ in range(k):
            seconds, joined = asyncio.run(floor_once(synapse, bot_token, concurrency))
            floor_samples.append(seconds)

    try:
        bot_token = synapse.register_user(BOT_LOCALPART, BOT_PASSWORD)
        if degraded:
            damage = asyncio.run(degrade(synapse, meta, bot_token))
            print(f"  degraded: {damage}", flush=True)
        asyncio.run(floor_once(synapse, bot_token, concurrency))  # warm Synapse's caches
        floor(floors)
        bot = StandaloneBot(
            synapse,
            {"reconciliation": {"concurrency": concurrency}},
            localpart=BOT_LOCALPART,
            password=BOT_PASSWORD,
            data_dir=work / "bot",
        )
        first = "repair (degraded world, empty DB)" if degraded else FIRST_START
        runs = [bot_run(bot, first)]
        floor()
        runs.append(bot_run(bot, "warm"))
        floor()
        dropped = bot.drop_plugin_tables()
        runs.append(bot_run(bot, "plugin DB lost"))
        floor()
        runs.append(bot_run(bot, "warm after DB loss"))
        floor()
    finally:
        if bot is not None:
            bot.stop()
        synapse.stop()
    floor_s = median(floor_samples)
    # Each run sits between two floor samples; the machine's load drifts, so each run is compared
    # with the mean of its neighbours (floor_samples[floors - 1 + i] and the one after).
    for i, run in enumerate(runs):
        around = floor_samples[floors - 1 + i : floors + 1 + i]
        run["floor_around_s"] = sum(around) / len(around)
        run["ratio_to_floor"] = run["reconcile_s"] / run["floor_around_s"]
        run["ratio_to_median_floor"] = run["reconcile_s"] / floor_s
        run["rooms_per_s"] = n / run["reconcile_s"]
    shutil.rmtree(work, ignore_errors=True)
    return {
        "n": n,
        "users": len(meta["users"]),
        "joined_rooms": n + len(meta["users"]),
        "concurrency": concurrency,
        "seed_s": seed_s,
        "degraded": damage,
        "floor_s": floor_s,
        "floor_samples_s": floor_samples,
        "floor_rooms_per_s": n / floor_s,
        "dropped_tables": dropped,
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 50, 100")
    parser.add_argument("--sizes", help="comma-separated N (working rooms)")
    parser.add_argument("--concurrency", type=int, default=None, help="default: base-config's")
    parser.add_argument("--floors", type=int, default=3, help="floor samples before the bot runs")
    parser.add_argument("--reseed", action="store_true", help="ignore the cached seeds")
    parser.add_argument(
        "--degraded",
        action="store_true",
        help="damage the seeded world first (unlinked, unbackfilled, duplicate Spaces, forged, lost)",
    )
    args = parser.parse_args()
    sizes = [50, 100] if args.quick else [100, 300, 1000]
    if args.sizes:
        sizes = [int(s) for s in args.sizes.split(",")]
    concurrency = args.concurrency
    if concurrency is None:
        from devtools.configs import plugin_config

        concurrency = int(plugin_config()["reconciliation"]["concurrency"])

    # The file is named after what was measured, so one run never overwrites another kind.
    name = "reconcile_scale_n" + "-".join(map(str, sizes)) + ("_degraded" if args.degraded else "")
    results = []
    for n in sizes:
        print(f"N={n}", flush=True)
        results.append(measure(n, concurrency, args.reseed, args.floors, args.degraded))
        write_result(name, {"sizes": results, "partial": True})
        r = results[-1]
        print(
            f"  floor {r['floor_s']:.2f} s; "
            + "; ".join(f"{x['run']}: {x['reconcile_s']:.2f} s" for x in r["runs"]),
            flush=True,
        )

    rows = []
    for r in results:
        floor_row = [r["n"], "floor (median)", r["floor_s"], r["floor_rooms_per_s"], 1.0]
        rows.append(floor_row + [None] * 8)
        for x in r["runs"]:
            rows.append(
                [
                    r["n"],
                    x["run"],
                    x["reconcile_s"],
                    x["rooms_per_s"],
                    x["ratio_to_floor"],
                    x.get("inventory_s"),
                    x.get("after_inventory_s"),
                    x["writes"],
                    x["start_to_reconciled_s"],
                    x["catch_up_s"],
                    x["start_to_ready_s"],
                    x["peak_rss_mib"],
                    x["counts"].get("working rooms"),
                ]
            )
    print()
    print(
        table(
            [
                "N",
                "run",
                "reconcile s",
                "rooms/s",
                "× floor",
                "reading s",
                "plan+write+cache s",
                "writes",
                "start→reconciled s",
                "catch-up s",
                "start→ready s",
                "peak RSS MiB",
                "rooms seen",
            ],
            rows,
        )
    )
    verdict = _verdict(results, args.degraded)
    print()
    for line in verdict["lines"]:
        print(line)
    path = write_result(name, {"sizes": results, "verdict": verdict})
    print(f"\nWrote {path}")


def _run(r: dict[str, Any], label: str) -> dict[str, Any]:
    return next(x for x in r["runs"] if x["run"] == label)


def _verdict(results: list[dict[str, Any]], degraded: bool) -> dict[str, Any]:
    big, small = results[-1], results[0]
    lost, warm = _run(big, "plugin DB lost"), _run(big, "warm")
    second_writes = [
        _run(r, label)["writes"] for r in results for label in ("warm", "warm after DB loss")
    ]
    lines = [
        f"At N={big['n']}: DB-loss run {lost['ratio_to_floor']:.2f}× floor (target ≤1.5), "
        f"warm {warm['ratio_to_floor']:.2f}× (target ≤1.3)",
        f"Writes by runs after a completed run: {second_writes} (target: all 0)",
    ]
    if degraded:
        repair = big["runs"][0]
        lines.insert(
            0,
            f"At N={big['n']}: repairing {big['degraded']} took {repair['reconcile_s']:.2f} s "
            f"({repair['ratio_to_floor']:.2f}× floor) and {repair['writes']} writes",
        )
    out: dict[str, Any] = {
        "n": big["n"],
        "db_loss_ratio": lost["ratio_to_floor"],
        "warm_ratio": warm["ratio_to_floor"],
        "second_run_writes": second_writes,
    }
    if big is not small:
        dn = (big["n"] - small["n"]) / 1000
        per_room = [_run(r, "plugin DB lost")["reconcile_s"] / r["n"] * 1000 for r in (small, big)]
        rss = [
            max(
                x["peak_rss_mib"]
                for x in r["runs"]
                if x["run"] != FIRST_START
            )
            for r in (small, big)
        ]
        out["s_per_1000_rooms"] = per_room
        out["rss_growth_mib_per_1000"] = (rss[1] - rss[0]) / dn
        lines += [
            f"DB-loss seconds per 1000 rooms: {per_room[0]:.2f} at N={small['n']}, "
            f"{per_room[1]:.2f} at N={big['n']} (linear: equal)",
            f"Peak RSS growth: {out['rss_growth_mib_per_1000']:.1f} MiB per 1000 rooms "
            "(target < 30)",
        ]
    out["lines"] = lines
    return out


if __name__ == "__main__":
    main()
