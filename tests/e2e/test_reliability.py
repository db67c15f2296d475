"""Reliability on a real Synapse: crashes at random moments, a lost plugin database, failing
backends, a restarting homeserver, and many users at once.

Knobs: `SURFACES_CRASH_ITERATIONS` (default 9: each crash kind once; `python -m bench.reliability`
runs 50 or more),
`SURFACES_CRASH_SEED` (default 1), `SURFACES_LOAD_USERS` (default 6; the full run uses 50).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from devtools.e2e import BotFactory, MakeUser
from devtools.fake_openai import FakeOpenAI
from devtools.matrix_user import MatrixUser, create_content, is_message
from devtools.maubot_standalone import BotError, StandaloneBot
from devtools.synapse import SynapseServer
from surfaces_plugin.store.migrations import CACHE_TABLES
from tests.conftest import fresh_postgres_database

from .invariants import (
    NS,
    TURN,
    BotView,
    Layout,
    check_answers,
    is_edit,
    join_all_invites,
    latest_content,
    onboard,
    q,
    read_layout,
    wait_all_answered,
    wait_invite_of_kind,
)

pytestmark = pytest.mark.e2e

CRASH_SEED = int(os.environ.get("SURFACES_CRASH_SEED", "1"))
LOAD_USERS = int(os.environ.get("SURFACES_LOAD_USERS", "6"))
LOAD_MESSAGES = 5

# Edits every 150-300 ms from the first words on (the echo has no sentence ends to wait for).
FAST_STREAM = {
    "streaming": {
        "enabled": True,
        "first_post_ms": 150,
        "edit_interval_ms": 150,
        "max_edit_interval_ms": 150,
    }
}
LONG_TEXT = " ".join(f"word{i}" for i in range(120))  # echo streams it for ~2.4 s


def long_message(tag: str) -> str:
    return f"{tag} {LONG_TEXT}"


async def ask(
    user: MatrixUser, room_id: str, text: str, expect: str, bot: StandaloneBot, timeout: float = 20
) -> str:
    """Send a command and wait for the bot's notice containing `expect`; returns its text."""
    sent = await user.send_text(room_id, text)
    notice = await user.wait_for_notice(room_id, expect, bot.user_id, timeout, after=sent)
    return user.latest_text(room_id, notice)


# -- crash injection ---------------------------------------------------------------------------

TINY_BUDGET = 400  # tokens: the third 40-word turn in a room of `tiny` compacts first
MEDIUM_TEXT = " ".join(f"w{i}" for i in range(40))
ECHO_AGENT = {
    "name": "Echo",
    "description": "Repeats what you say.",
    "backend": "echo",
    "model": "",
    "system_prompt": "Be brief.",
    "context_tokens": 4096,
    "temperature": 0.7,
}
CRASH_CONFIG = {
    **FAST_STREAM,
    "agents": [
        {**ECHO_AGENT, "id": "echo"},
        {**ECHO_AGENT, "id": "other", "name": "Other echo"},
        {**ECHO_AGENT, "id": "tiny", "name": "Tiny echo", "context_tokens": TINY_BUDGET},
    ],
    "default_agent": "echo",
    "limits": {"per_user_requests_per_minute": 1000},
}
AGENTS = ("echo", "other", "tiny")
COMPACTING = "Compacting the conversation to fit `tiny`'s context budget"
REPORT_ENV = "SURFACES_RELIABILITY_REPORT"
NOT_RUN = "was not run"  # the notice for a state-changing command that arrived too late


def report(section: str, data: dict[str, Any]) -> None:
    """Merge `data` into the JSON sidecar named by $SURFACES_RELIABILITY_REPORT (bench.reliability
    reads it); nothing when the variable is unset."""
    path = os.environ.get(REPORT_ENV)
    if not path:
        return
    try:
        with open(path) as f:
            current = json.load(f)
    except (OSError, ValueError):
        current = {}
    current[section] = data
    with open(path, "w") as f:
        json.dump(current, f, indent=2)


@dataclass
class CrashWorld:
    """What one crash-injection run knows: the bot, the users and their active working rooms."""

    bot: StandaloneBot
    view: BotView
    synapse: SynapseServer
    make_user: MakeUser
    rng: random.Random
    users: dict[str, tuple[MatrixUser, str]] = field(default_factory=dict)  # id → (user, DM)
    rooms: dict[str, MatrixUser] = field(default_factory=dict)  # active working room → owner
    # Commands a crash cut off before the bot acted: catch-up runs or tells them after the restart.
    lost_commands: list[str] = field(default_factory=list)
    unfinished_compaction_notices: int = 0
    onboarding_left_without_room: int = 0  # finding: reconciliation does not finish this
    checks: dict[str, int] = field(default_factory=dict)
    # Set by a kind for its own check after the restart.
    pending: dict[str, Any] = field(default_factory=dict)

    def count(self, check: str) -> None:
        self.checks[check] = self.checks.get(check, 0) + 1

    def any_room(self, agent_not: str | None = None) -> tuple[MatrixUser, str]:
        choices = sorted(self.rooms)
        if agent_not is not None:
            choices = [r for r in choices if self.pending.get("agents", {}).get(r) != agent_not]
        room = self.rng.choice(choices)
        return self.rooms[room], room


async def bot_reply_after(view: BotView, room_id: str, event_id: str, contains: str) -> bool:
    """Whether the bot answered an event in Matrix (read from the homeserver, not a sync)."""
    events = await view.timeline(room_id)
    index = next((i for i, e in enumerate(events) if e.get("event_id") == event_id), None)
    if index is None:
        return False
    return any(
        e.get("sender") == view.bot_id and contains in str(e.get("content", {}).get("body", ""))
        for e in events[index + 1 :]
    )


async def told_not_run(w: CrashWorld, user: MatrixUser, room_id: str, sent: str) -> None:
    """A state-changing command a crash cut off gets exactly one "not run" notice after the
    restart (catch-up; `CommandSpec.replay`)."""
    notice = await user.wait_for_notice(room_id, NOT_RUN, w.bot.user_id, timeout=30, after=sent)
    events = await w.view.timeline(room_id)
    marked = [
        e for e in events
        if e.get("sender") == w.view.bot_id
        and e.get("content", {}).get(f"{NS}.command", {}).get("answers") == sent
    ]
    assert [e["event_id"] for e in marked] == [notice["event_id"]], "one notice for the command"


async def binding_of(view: BotView, room_id: str) -> dict[str, Any]:
    state = await view.state(room_id)
    return next(
        (e["content"] for e in state if e["type"] == f"{NS}.binding" and e.get("state_key") == ""),
        {},
    )


def read_from(path: Path, offset: int) -> str:
    with open(path, errors="replace") as f:
        f.seek(offset)
        return f.read()


async def start_and_kill_when_logged(
    bot: StandaloneBot, needle: str, delay: float, timeout: float = 60
) -> bool:
    """Start the bot, and SIGKILL it `delay` s after its log first shows `needle` (or once it is
    ready, if it never does). True when the needle was seen."""
    offset = bot.log_path.stat().st_size if bot.log_path.exists() else 0
    starting = asyncio.ensure_future(asyncio.to_thread(bot.start))
    seen = False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if starting.done():  # ready: the needle may still come right after
            deadline = min(deadline, time.monotonic() + 10)
        if needle in read_from(bot.log_path, offset):
            seen = True
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(delay)
    bot.kill()
    try:
        await starting
    except BotError:  # killed before it was ready: that is the point
        pass
    return seen


async def restart_after_crash(w: CrashWorld, iteration: int) -> None:
    """Sometimes a message is sent while the bot is down (catch-up answers it), then start."""
    if w.rng.random() < 0.5:
        owner, room = w.any_room()
        await owner.send_text(room, f"it{iteration} while down")
    w.bot.start()


# Each crash kind does something, SIGKILLs the bot at a seeded random moment within it, and
# starts it again; the kind's own check, then the common invariants, run after that.


async def kill_after(w: CrashWorld, iteration: int, low: float, high: float) -> float:
    """SIGKILL the bot a seeded random moment into the work just started, then restart it."""
    delay = w.rng.uniform(low, high)
    await asyncio.sleep(delay)
    w.bot.kill()
    await restart_after_crash(w, iteration)
    return delay


async def crash_onboarding(w: CrashWorld, iteration: int) -> float:
    user = await w.make_user()
    dm = await user.open_dm(w.bot.user_id)
    await user.wait_for_notice(dm, "Hi!", sender=w.bot.user_id, timeout=15)
    w.users[user.user_id] = (user, dm)
    w.pending["onboarded"] = (user, dm, await user.send_text(dm, "!ai start"))
    return await kill_after(w, iteration, 0.0, 0.8)


async def check_onboarding(w: CrashWorld, layout: Layout) -> None:
    user, dm, sent = w.pending.pop("onboarded")
    if user.user_id not in layout.spaces:
        # The bot died before it acted on the command; catch-up runs `!ai start` after the
        # restart (running it late is what was asked): the user is answered without asking again.
        w.lost_commands.append("!ai start")
        await user.wait_for_notice(dm, "Space", w.bot.user_id, timeout=30, after=sent)
        w.count("`!ai start` cut off by a crash: run by catch-up, one Space")
        return
    # Reconciliation invites the owner to the Space the crash left behind, by itself.
    space = await wait_invite_of_kind(user, "space", timeout=20)
    await user.join(space)
    if any(owner == user.user_id for owner in layout.owners.values()):
        room = await wait_invite_of_kind(user, "working", timeout=20)
        await user.join(room)
        w.count("interrupted onboarding finished without asking again")
        return
    # FINDING: killed between the Space and the first working room, reconciliation invites the
    # user to an empty Space and goes no further; the user has to send `!ai start` again, which
    # then finishes it in the same Space.
    w.onboarding_left_without_room += 1
    await ask(user, dm, "!ai start", "Space", w.bot)
    room = await wait_invite_of_kind(user, "working", timeout=20)
    await user.join(room)
    w.count("Space without a working room after a crash: `!ai start` again finishes it")


async def crash_new_room(w: CrashWorld, iteration: int) -> float:
    user, dm = w.users[w.rng.choice(sorted(w.users))]
    w.pending["new"] = (user, dm, await user.send_text(dm, f"!ai new Crash {iteration}"))
    return await kill_after(w, iteration, 0.0, 0.6)


async def check_new_room(w: CrashWorld, layout: Layout) -> None:
    user, dm, sent = w.pending.pop("new")
    mine = {r for r, o in layout.owners.items() if o == user.user_id}
    if not mine - set(w.rooms):
        assert not await bot_reply_after(w.view, dm, sent, "New working room")
        w.lost_commands.append("!ai new")
        await told_not_run(w, user, dm, sent)
        w.count("`!ai new` cut off by a crash: no room, one notice that it was not run")
    else:
        w.count("interrupted `!ai new`: the room is finished and its owner invited")


async def crash_reset(w: CrashWorld, iteration: int) -> float:
    owner, room = w.any_room()
    before = (await binding_of(w.view, room)).get("platform_chat_id")
    w.pending["reset"] = (room, before, await owner.send_text(room, "!ai reset"))
    return await kill_after(w, iteration, 0.0, 0.4)


async def check_reset(w: CrashWorld, layout: Layout) -> None:
    room, before, sent = w.pending.pop("reset")
    after = layout.working[room].get("platform_chat_id")
    if await bot_reply_after(w.view, room, sent, "Started a fresh conversation"):
        assert after != before, "the reset was confirmed but the conversation id is the old one"
        w.count("confirmed reset: a new platform_chat_id")
    elif after == before:
        w.lost_commands.append("!ai reset")
        await told_not_run(w, w.rooms[room], room, sent)
        w.count("`!ai reset` cut off by a crash: unchanged, one notice that it was not run")
    else:
        w.count("unconfirmed reset: a new platform_chat_id")


async def crash_streaming(w: CrashWorld, iteration: int) -> float:
    owner, room = w.any_room()
    await owner.send_text(room, long_message(f"it{iteration}a"))
    await owner.send_text(room, f"it{iteration}b short one")  # queued behind it
    return await kill_after(w, iteration, 0.05, 3.0)


async def crash_reconciliation(w: CrashWorld, iteration: int) -> float:
    """Repairs pending (parent links cleared, conversation ids missing), killed mid-apply."""
    w.bot.kill()
    layout = await read_layout(w.view)
    before: dict[str, str] = {}
    for room, binding in layout.working.items():
        before[room] = binding["platform_chat_id"]
        space = binding["space_id"]
        for path, content in (
            (f"m.space.parent/{q(space)}", {}),
            (f"{NS}.binding/", {k: v for k, v in binding.items() if k != "platform_chat_id"}),
        ):
            status, data = await asyncio.to_thread(
                w.synapse.request,
                "PUT",
                f"/_matrix/client/v3/rooms/{q(room)}/state/{path}",
                content,
                w.bot.access_token,
            )
            assert status < 300, (status, data)
    delay = w.rng.uniform(0.0, 0.3)
    seen = await start_and_kill_when_logged(w.bot, "Reconciliation: ", delay)
    assert seen, "the bot never started repairing"
    await restart_after_crash(w, iteration)
    w.pending["conversations"] = before
    return delay


async def check_reconciliation(w: CrashWorld, layout: Layout) -> None:
    before = w.pending.pop("conversations")
    after = {r: layout.working[r].get("platform_chat_id") for r in before}
    assert after == before, "a repaired binding lost its conversation"
    w.count("repairs finished after a crash mid-apply, conversations kept")


async def crash_catch_up(w: CrashWorld, iteration: int) -> float:
    """Messages sent while the bot is down; killed while it answers them after the start."""
    w.bot.kill()
    for n in range(2):
        owner, room = w.any_room()
        await owner.send_text(room, long_message(f"it{iteration} down{n}"))
        await owner.send_text(room, f"it{iteration} down{n} short")
    delay = w.rng.uniform(0.0, 2.5)
    seen = await start_and_kill_when_logged(w.bot, "Catch-up: ", delay)
    assert seen, "catch-up never started"
    await restart_after_crash(w, iteration)
    return delay


async def tiny_room(w: CrashWorld) -> tuple[MatrixUser, str]:
    """A working room with the `tiny` agent (created on first use)."""
    room = w.pending.get("tiny_room")
    if room in w.rooms and w.pending.get("agents", {}).get(room, "echo") == "tiny":
        return w.rooms[room], room
    user, dm = w.users[sorted(w.users)[0]]
    await ask(user, dm, "!ai new tiny Compact", "New working room", w.bot)
    room = await user.wait_for_invite(
        lambda rid, state: (
            rid not in w.rooms and create_content(state).get(f"{NS}.kind") == "working"
        ),
        timeout=15,
    )
    await user.join(room)
    w.rooms[room] = user
    w.pending["tiny_room"] = room
    w.pending.setdefault("agents", {})[room] = "tiny"
    return user, room


async def crash_compaction(w: CrashWorld, iteration: int) -> float:
    """Killed while compaction summarises a room of the tiny-budget agent."""
    owner, room = await tiny_room(w)
    delay = w.rng.uniform(0.0, 1.5)
    for n in range(6):
        sent = await owner.send_text(room, f"it{iteration} c{n} {MEDIUM_TEXT}")
        started = await owner.wait_until(
            lambda sent=sent: owner.find(
                room,
                lambda e: (
                    is_message(e, w.bot.user_id)
                    and (
                        COMPACTING in str(e["content"].get("body"))
                        or e["content"].get(TURN, {}).get("answers") == sent
                    )
                ),
                after=sent,
            ),
            20,
            "compaction or the answer",
        )
        if COMPACTING in str(started["content"].get("body")):
            w.pending["compacting"] = (room, started["event_id"])
            break
        await wait_all_answered(w.view, room, owner.user_id, timeout=20)
    else:
        raise AssertionError("no compaction in a room of the tiny agent")
    await asyncio.sleep(delay)
    w.bot.kill()
    await restart_after_crash(w, iteration)
    return delay


async def check_compaction(w: CrashWorld, layout: Layout) -> None:
    room, notice = w.pending.pop("compacting")
    events = await w.view.timeline(room)
    [event] = [e for e in events if e.get("event_id") == notice]
    if COMPACTING in str(latest_content(events, event).get("body")):
        w.unfinished_compaction_notices += 1  # a user sees "Compacting…" that never ends
    w.count("compaction interrupted: every message still answered once")


async def crash_archive(w: CrashWorld, iteration: int) -> float:
    owners = [r for r in sorted(w.rooms) if sum(o is w.rooms[r] for o in w.rooms.values()) > 1]
    if not owners:  # keep every user one active room: open another first
        user, dm = w.users[sorted(w.users)[0]]
        await ask(user, dm, f"!ai new Spare {iteration}", "New working room", w.bot)
        room = await user.wait_for_invite(
            lambda rid, state: (
                rid not in w.rooms and create_content(state).get(f"{NS}.kind") == "working"
            ),
            timeout=15,
        )
        await user.join(room)
        w.rooms[room] = user
        owners = [room]
    room = w.rng.choice([r for r in owners if r != w.pending.get("tiny_room")] or owners)
    w.pending["archive"] = (room, await w.rooms[room].send_text(room, "!ai archive"))
    return await kill_after(w, iteration, 0.0, 0.5)


async def check_archive(w: CrashWorld, layout: Layout) -> None:
    room, sent = w.pending.pop("archive")
    confirmed = await bot_reply_after(w.view, room, sent, "archived")
    if room in layout.archived:
        owner = w.rooms.pop(room)
        # Messages there no longer go to an agent: the test stops expecting answers in it.
        w.pending.setdefault("archived_rooms", []).append((owner, room))
        w.count("archived room: unlinked from the Space, not routed")
    else:
        assert not confirmed, "the archive was confirmed but the room is still active"
        w.lost_commands.append("!ai archive")
        await told_not_run(w, w.rooms[room], room, sent)
        w.count("`!ai archive` cut off by a crash: active, one notice that it was not run")


async def crash_agent_switch(w: CrashWorld, iteration: int) -> float:
    agents = w.pending.setdefault("agents", {})
    candidates = [r for r in sorted(w.rooms) if agents.get(r, "echo") != "tiny"]
    room = w.rng.choice(candidates)
    old = agents.get(room, "echo")
    new = "other" if old == "echo" else "echo"
    w.pending["switch"] = (room, old, new, await w.rooms[room].send_text(room, f"!ai agent {new}"))
    return await kill_after(w, iteration, 0.0, 0.5)


async def check_agent_switch(w: CrashWorld, layout: Layout) -> None:
    room, old, new, sent = w.pending.pop("switch")
    agent = layout.working[room].get("agent")
    if await bot_reply_after(w.view, room, sent, f"now talks to `{new}`"):
        assert agent == new, f"the switch to {new} was confirmed but the binding names {agent}"
        w.count("confirmed agent switch: the binding names the new agent")
    else:
        assert agent in (old, new), agent
        if agent == old:
            w.lost_commands.append("!ai agent")
            await told_not_run(w, w.rooms[room], room, sent)
        w.count("interrupted agent switch: the binding names the old or the new agent")
    w.pending["agents"][room] = agent


CrashKind = Callable[[CrashWorld, int], Awaitable[float]]
Check = Callable[[CrashWorld, Layout], Awaitable[None]]
CRASH_KINDS: dict[str, tuple[CrashKind, Check | None]] = {
    "onboarding": (crash_onboarding, check_onboarding),
    "new room": (crash_new_room, check_new_room),
    "reset": (crash_reset, check_reset),
    "streaming answer": (crash_streaming, None),
    "startup reconciliation": (crash_reconciliation, check_reconciliation),
    "catch-up": (crash_catch_up, None),
    "compaction": (crash_compaction, check_compaction),
    "archive": (crash_archive, check_archive),
    "agent switch": (crash_agent_switch, check_agent_switch),
}
CRASH_ITERATIONS = int(os.environ.get("SURFACES_CRASH_ITERATIONS", str(len(CRASH_KINDS))))


async def check_invariants(w: CrashWorld, context: tuple[Any, ...]) -> None:
    """What must hold in Matrix after every restart."""
    for user, _dm in w.users.values():
        await join_all_invites(user)
    layout = await read_layout(w.view, AGENTS)
    assert not layout.problems, (*context, layout.problems)
    w.count("layout: one Space per user, rooms linked both ways, bindings complete")
    for user_id in w.users:
        assert len(layout.spaces.get(user_id, [])) == 1, (*context, user_id, layout.spaces)
        assert any(owner == user_id for owner in layout.owners.values()), (
            *context,
            f"{user_id} has no working room",
        )
    for room_id, owner in layout.owners.items():
        if room_id not in w.rooms:  # new since the crash: the owner has an invite to it
            user, _dm = w.users[owner]
            await user.wait_until(
                lambda room_id=room_id, user=user: room_id in user.invites or room_id in user.rooms,
                20,
                f"an invite to {room_id}",
            )
            await user.join(room_id)
            w.rooms[room_id] = user
    for room_id, owner_user in w.rooms.items():
        result = await wait_all_answered(w.view, room_id, owner_user.user_id, timeout=40)
        assert not result.unanswered, (*context, "unanswered", result)
        assert not result.twice, (*context, "answered twice", result)
        assert not result.partial, (*context, "left cut off", result)
        assert result.order_ok, (*context, "out of order", result)
    w.count("messages: each answered exactly once, in order, none left cut off")


@pytest.mark.timeout(3600)
async def test_crash_at_random_moments_keeps_every_invariant(
    bot_factory: BotFactory, make_user: MakeUser, synapse: SynapseServer
) -> None:
    """SIGKILL at a seeded random moment within each crash kind (onboarding, `!ai new`, reset,
    a streamed answer, startup reconciliation mid-apply, catch-up, compaction, archive, an agent
    switch; kinds round-robin, so the default run covers each once), then restart: one Space
    per user, rooms linked both ways, every binding complete and naming a configured agent,
    archived rooms unlinked, every message answered exactly once and in order. Recovery never
    re-sends a command; one the crash cut off before the bot acted is counted, and after the
    restart is run late (`!ai start`) or gets exactly one notice that it was not run."""
    started = time.monotonic()
    rng = random.Random(CRASH_SEED)
    bot = bot_factory(CRASH_CONFIG)
    w = CrashWorld(bot, BotView(synapse, bot), synapse, make_user, rng)
    alice = await make_user()
    dm, _space, room = await onboard(alice, bot)
    w.users[alice.user_id] = (alice, dm)
    w.rooms[room] = alice
    kinds = list(CRASH_KINDS)
    seen: list[tuple[str, float]] = []

    for iteration in range(CRASH_ITERATIONS):
        kind = kinds[iteration % len(kinds)]
        crash, check = CRASH_KINDS[kind]
        delay = await crash(w, iteration)
        seen.append((kind, round(delay, 3)))
        context = (iteration, kind, round(delay, 3))
        if check is not None:
            layout = await read_layout(w.view, AGENTS)
            assert not layout.problems, (*context, layout.problems)
            await check(w, layout)
        await check_invariants(w, context)

    # Quiet window: a message to every archived room, then a last message in every active room;
    # those answered (the positive signal that the bot has worked through everything before
    # them), nothing may be answered twice or left over, and the archived rooms got no answer.
    archived = [
        (owner, room_id, await owner.send_text(room_id, "to an archived room"))
        for owner, room_id in w.pending.get("archived_rooms", [])
    ]
    finals = {
        room_id: await owner.send_text(room_id, "final question")
        for room_id, owner in w.rooms.items()
    }
    for room_id, sent in finals.items():
        owner = w.rooms[room_id]
        await owner.wait_for(
            room_id,
            lambda e, sent=sent: (
                is_message(e, bot.user_id, "m.text")
                and e["content"].get(TURN, {}).get("answers") == sent
            ),
            timeout=30,
        )
    await asyncio.sleep(2)
    for room_id, owner in w.rooms.items():
        result = await wait_all_answered(w.view, room_id, owner.user_id, timeout=20)
        assert (result.unanswered, result.twice, result.partial) == ([], [], []), result
    for _owner, room_id, sent in archived:
        events = await w.view.timeline(room_id)
        answers = [e for e in events if e.get("content", {}).get(TURN, {}).get("answers") == sent]
        assert answers == [], f"an archived room was answered: {room_id}"
    w.count("quiet window: the final messages answered once, nothing twice")

    counts = {k: sum(1 for s, _ in seen if s == k) for k in kinds}
    print(
        f"crash iterations: {CRASH_ITERATIONS} (seed {CRASH_SEED}): {counts}; "
        f"commands lost to a crash: {w.lost_commands}; "
        f"compaction notices left unfinished: {w.unfinished_compaction_notices}; "
        f"onboardings left with an empty Space: {w.onboarding_left_without_room}"
    )
    report(
        "crash",
        {
            "seed": CRASH_SEED,
            "iterations": CRASH_ITERATIONS,
            "kinds": counts,
            "sequence": seen,
            "checks": w.checks,
            "commands_lost_to_a_crash": w.lost_commands,
            "compaction_notices_left_unfinished": w.unfinished_compaction_notices,
            "onboardings_left_with_an_empty_space": w.onboarding_left_without_room,
            "seconds": round(time.monotonic() - started, 1),
        },
    )


async def test_answer_cut_off_by_a_crash_is_marked_and_not_repeated(
    bot_factory: BotFactory, make_user: MakeUser, synapse: SynapseServer
) -> None:
    """Killed while streaming: after the restart the cut-off answer says so, the message queued
    behind it and one sent while the bot was down are answered, and nothing twice."""
    bot = bot_factory(FAST_STREAM)
    alice = await make_user()
    _dm, _space, room = await onboard(alice, bot)
    long_one = await alice.send_text(room, long_message("cut"))
    await alice.send_text(room, "queued behind it")
    answer = await alice.wait_for(
        room,
        lambda e: (
            is_message(e, bot.user_id, "m.text")
            and e["content"].get(TURN, {}).get("answers") == long_one
        ),
        timeout=20,
    )
    await alice.wait_until(lambda: len(alice.edits(room, answer)) >= 2, 10, "streaming edits")
    bot.kill()
    await alice.send_text(room, "sent while down")
    bot.start()

    text = await alice.wait_for_text(room, answer["event_id"], lambda t: "interrupted" in t, 30)
    assert text.startswith("echo: cut word0") and LONG_TEXT not in text
    assert text.endswith("*(interrupted by a restart; send `!ai retry` for a full answer)*")
    view = BotView(synapse, bot)
    result = await wait_all_answered(view, room, alice.user_id)
    assert (result.answered, result.unanswered, result.twice, result.partial) == (3, [], [], [])
    assert result.order_ok
    # A second restart changes nothing: the mark is not added again, nothing is re-answered.
    edits = len(alice.edits(room, answer))
    bot.restart()
    assert await answer_of(alice, room, bot, "and after") == "echo: and after"
    assert len(alice.edits(room, answer)) == edits
    result = check_answers(await view.timeline(room), alice.user_id, bot.user_id)
    assert (result.answered, result.twice) == (4, [])


# -- losing the plugin database ----------------------------------------------------------------

# The columns of each cache table that Matrix holds the truth for.
RESTORABLE = {
    "users": "user_id, space_id",
    "rooms": "room_id, kind, owner, space_id, agent, title, platform_chat_id, system_prompt, "
    "archived",
    "chats": "platform_chat_id, room_id, agent",
    "memory": "user_id, notes",
}


class PluginDatabase:
    """The standalone bot's database (maubot's tables and the plugin's), read and wiped from outside."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def _run(self, sql: str) -> list[tuple[Any, ...]]:
        if self.url.startswith("sqlite:"):
            path = self.url.removeprefix("sqlite:")

            def run() -> list[tuple[Any, ...]]:
                with sqlite3.connect(path, timeout=10) as conn:
                    return [tuple(r) for r in conn.execute(sql).fetchall()]

            return await asyncio.to_thread(run)
        conn = await asyncpg.connect(self.url)
        try:
            return [tuple(r) for r in await conn.fetch(sql)]
        finally:
            await conn.close()

    async def rows(self, table: str, columns: str = "*", where: str = "") -> set[tuple[Any, ...]]:
        return set(await self._run(f"SELECT {columns} FROM {table} {where}"))

    async def restorable(self) -> dict[str, set[tuple[Any, ...]]]:
        return {table: await self.rows(table, cols) for table, cols in RESTORABLE.items()}

    async def wipe(self) -> None:
        for table in CACHE_TABLES:
            await self._run(f"DELETE FROM {table}")


@pytest_asyncio.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def database_url(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[str]:
    """A fresh database for one bot: a SQLite file, or a Postgres database of its own."""
    if request.param == "sqlite":
        yield f"sqlite:{tmp_path / 'surfaces.db'}"
        return
    async with fresh_postgres_database("surfaces_rel") as url:
        yield url


async def answer_of(
    user: MatrixUser, room_id: str, bot: StandaloneBot, text: str, timeout: float = 20
) -> str:
    """Send a plain message; the final text of the bot's answer to it (once streaming ended)."""
    sent = await user.send_text(room_id, text)
    answer = await user.wait_for(
        room_id,
        lambda e: (
            is_message(e, bot.user_id, "m.text")
            and e["content"].get(TURN, {}).get("answers") == sent
        ),
        timeout=timeout,
    )

    def finished() -> str | None:
        content = latest_content(user.events(room_id), answer)
        return None if content.get(TURN, {}).get("partial") else str(content.get("body"))

    return await user.wait_until(finished, timeout, what=f"the answer to {text!r}")


async def test_database_loss_is_restored_from_matrix(
    database_url: str, bot_factory: BotFactory, make_user: MakeUser, synapse: SynapseServer
) -> None:
    """Every plugin table emptied while the bot runs: after a restart the rows Matrix can restore
    are back as they were, nothing is answered twice, and the conversation goes on with its
    history."""
    bot = bot_factory(FAST_STREAM, database_url=database_url)
    db = PluginDatabase(database_url)
    alice = await make_user()
    dm, _space, room = await onboard(alice, bot)
    assert await answer_of(alice, room, bot, "first question") == "echo: first question"
    assert await answer_of(alice, room, bot, "second question") == "echo: second question"
    await ask(alice, room, "!ai system Answer briefly.", "system prompt is set", bot)
    await ask(alice, dm, "!ai memory add I like tea", "Noted", bot)
    await ask(alice, dm, "!ai new Second room", "New working room", bot)
    before = await db.restorable()
    assert len(before["rooms"]) == 3 and len(before["memory"]) == 1  # Space + two rooms
    [pcid] = [r[6] for r in before["rooms"] if r[0] == room]
    history_before = await db.rows(
        "messages", "role, content, event_id", f"WHERE platform_chat_id = '{pcid}'"
    )
    assert len(history_before) == 4

    await db.wipe()
    assert await db.rows("rooms") == set()
    bot.restart()

    assert await db.restorable() == before
    assert await answer_of(alice, room, bot, "third question") == "echo: third question"
    for _ in range(50):  # the answer is stored right after its final edit
        history_after = await db.rows(
            "messages", "role, content, event_id", f"WHERE platform_chat_id = '{pcid}'"
        )
        if len(history_after) == 6:
            break
        await asyncio.sleep(0.1)
    assert history_before < history_after  # rebuilt from the timeline, then the new turn
    assert {(r, c) for r, c, _ in history_after - history_before} == {
        ("user", "third question"),
        ("assistant", "echo: third question"),
    }
    view = BotView(synapse, bot)
    result = check_answers(await view.timeline(room), alice.user_id, bot.user_id)
    assert (result.answered, result.unanswered, result.twice) == (3, [], [])
    reply = await ask(alice, room, "!ai system", "override", bot)
    assert "Answer briefly." in reply


# -- failing backends --------------------------------------------------------------------------

API_KEY = "sk-surfaces-test-K3Y-d0-not-leak"
TIMEOUT_S = 2
MAX_RETRIES = 1
# The longest a failure may take to reach the user: every attempt timing out, plus backoff.
FAULT_DEADLINE_S = TIMEOUT_S * (MAX_RETRIES + 1) + 2 + 4  # + Retry-After/backoff + slack


def fake_backend_config(base_url: str) -> dict[str, Any]:
    agent = {
        "name": "GPT",
        "description": "A fake OpenAI-compatible model.",
        "model": "fake-model",
        "system_prompt": "Be helpful.",
        "context_tokens": 4096,
        "temperature": 0.7,
    }
    return {
        **FAST_STREAM,
        "backends": [
            {"id": "echo", "type": "echo"},
            {
                "id": "fake",
                "type": "openai",
                "base_url": base_url,
                "api_key": API_KEY,
                "timeout_s": TIMEOUT_S,
                "max_retries": MAX_RETRIES,
            },
        ],
        "agents": [
            {**agent, "id": "echo", "name": "Echo", "backend": "echo"},
            {**agent, "id": "gpt", "backend": "fake"},
        ],
        "default_agent": "gpt",
    }


FAULTS = [
    ("hang", {}),
    ("status", {"status": 500}),
    ("rate_limit", {"retry_after": "1"}),
    ("cut", {"reply": "a long answer that will be cut off half way through"}),
    ("malformed", {"reply": "an answer with a broken event in the middle of it"}),
    ("wrong_type", {}),
]


async def test_backend_faults_give_one_clear_notice_and_the_next_message_works(
    bot_factory: BotFactory, make_user: MakeUser
) -> None:
    async with FakeOpenAI() as fake:
        bot = bot_factory(fake_backend_config(fake.base_url))
        alice = await make_user()
        _dm, _space, room = await onboard(alice, bot)
        timings: dict[str, float] = {}
        for mode, options in FAULTS:
            fake.set_mode(mode, times=100, **options)
            started = time.monotonic()
            sent = await alice.send_text(room, f"question during {mode}")
            notice = await alice.wait_for_notice(
                room, "`gpt`", bot.user_id, timeout=FAULT_DEADLINE_S + 5, after=sent
            )
            timings[mode] = time.monotonic() - started
            assert timings[mode] <= FAULT_DEADLINE_S, (mode, timings[mode])

            # The positive signal: the next message is answered; all the bot had to say about
            # the failed one came before that answer.
            fake.set_mode("normal")
            following = await alice.send_text(room, f"after {mode}")
            reply = await alice.wait_for(
                room,
                lambda e, f=following: is_message(e, bot.user_id, "m.text")
                and e["content"].get(TURN, {}).get("answers") == f,
                timeout=20,
            )
            await alice.wait_for_text(
                room, reply["event_id"], lambda t, m=mode: t == f"Fake model says: after {m}"
            )
            after = alice.messages(room, bot.user_id, after=sent)
            after = after[: [e["event_id"] for e in after].index(reply["event_id"])]
            notices = [e for e in after if e["content"].get("msgtype") == "m.notice"]
            answers = [e for e in after if e["content"].get("msgtype") == "m.text"]
            assert notices == [notice], (mode, [alice.latest_text(room, e) for e in after])
            assert len(answers) <= 1, mode  # a started answer is not sent again
            if mode == "cut":  # text arrived before the stream broke: it is shown, and ended
                assert len(answers) == 1, mode
            for answer in answers:  # cut off mid-way: ends visibly, not left streaming
                content = latest_content(alice.events(room), answer)
                assert not content[TURN].get("partial"), mode
                assert content["body"].endswith("*(the answer stopped here)*"), mode
        print("time to the failure notice:", {m: round(t, 1) for m, t in timings.items()})
        report(
            "faults",
            {
                "notice_s": {m: round(t, 2) for m, t in timings.items()},
                "deadline_s": FAULT_DEADLINE_S,
            },
        )
        assert API_KEY not in bot.log_text()
        assert all(
            r["authorization"] == f"Bearer {API_KEY}" for r in fake.requests
        )  # the key was really used


# -- a failing homeserver ----------------------------------------------------------------------


async def test_synapse_restart_while_the_bot_runs(
    bot_factory: BotFactory, make_user: MakeUser, synapse: SynapseServer
) -> None:
    """The homeserver goes away and comes back: the bot recovers without a restart of its own
    and answers the next message."""
    bot = bot_factory(FAST_STREAM)
    alice = await make_user()
    _dm, _space, room = await onboard(alice, bot)
    assert await answer_of(alice, room, bot, "before") == "echo: before"
    pid_before = bot._proc.pid if bot._proc else None

    synapse.stop()
    await asyncio.sleep(2)
    synapse.start()

    assert await answer_of(alice, room, bot, "after the outage", timeout=60) == (
        "echo: after the outage"
    )
    assert bot.running and bot._proc is not None and bot._proc.pid == pid_before
    view = BotView(synapse, bot)
    result = check_answers(await view.timeline(room), alice.user_id, bot.user_id)
    assert (result.answered, result.twice) == (2, [])


# -- load --------------------------------------------------------------------------------------


@pytest.mark.timeout(1800)
async def test_many_users_at_once_all_answered_in_order(
    bot_factory: BotFactory, make_user: MakeUser, synapse: SynapseServer
) -> None:
    """LOAD_USERS users onboard in parallel batches, then each sends 5 messages at once."""
    bot = bot_factory({"limits": {"per_user_requests_per_minute": 100}})
    started = time.monotonic()
    users = [await make_user() for _ in range(LOAD_USERS)]  # registration blocks: one by one
    # One shared room to send `!ai start` from saves a DM (a room creation) per user.
    lobby = await users[0].create_room(preset="public_chat", invite=[bot.user_id])
    await users[0].wait_for_membership(lobby, bot.user_id, "join", timeout=30)
    await asyncio.gather(*(u.join(lobby) for u in users[1:]))
    rooms: list[str] = []
    for batch in range(0, LOAD_USERS, 10):
        group = users[batch : batch + 10]
        await asyncio.gather(*(u.send_text(lobby, "!ai start") for u in group))
        for user in group:
            space = await wait_invite_of_kind(user, "space", timeout=30 + 3 * len(group))
            room = await wait_invite_of_kind(user, "working", timeout=30)
            await asyncio.gather(user.join(space), user.join(room))
            rooms.append(room)
    onboarded = time.monotonic() - started

    started = time.monotonic()
    texts = [f"message {i}" for i in range(LOAD_MESSAGES)]

    async def burst(user: MatrixUser, room: str) -> None:
        for text in texts:
            await user.send_text(room, text)

    await asyncio.gather(*(burst(u, r) for u, r in zip(users, rooms, strict=True)))
    view = BotView(synapse, bot)
    results = await asyncio.gather(
        *(
            wait_all_answered(view, r, u.user_id, timeout=60 + 4 * LOAD_USERS)
            for u, r in zip(users, rooms, strict=True)
        )
    )
    answered = time.monotonic() - started
    for user, room, result in zip(users, rooms, results, strict=True):
        assert (result.answered, result.unanswered, result.twice) == (LOAD_MESSAGES, [], []), user
        assert result.order_ok, user
        events = await view.timeline(room)
        finals = [
            latest_content(events, e).get("body")
            for e in events
            if e.get("sender") == bot.user_id and TURN in e.get("content", {}) and not is_edit(e)
        ]
        assert finals == [f"echo: {t}" for t in texts], user
    report(
        "load",
        {
            "users": LOAD_USERS,
            "messages": LOAD_USERS * LOAD_MESSAGES,
            "onboarded_s": round(onboarded, 1),
            "answered_s": round(answered, 1),
        },
    )
    print(
        f"load: {LOAD_USERS} users onboarded in {onboarded:.1f} s; "
        f"{LOAD_USERS * LOAD_MESSAGES} messages answered in {answered:.1f} s"
    )
