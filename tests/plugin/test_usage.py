"""The usage ledger and quotas as users and admins see them: `!ai usage` equals what the backend
reported (estimated and marked when it reports nothing), summaries count, the quota refuses once
per room and day with the reset time and lets messages through after midnight, and the ledger
comes back from the turn markers after the database is lost."""

from __future__ import annotations

import asyncio
import calendar
import re
from collections.abc import AsyncIterator

from devtools.fake_openai import FakeOpenAI
from surfaces_plugin import layout
from surfaces_plugin.backends import Backend, Chunk, GenerationRequest, Usage
from surfaces_plugin.compaction import instructions
from surfaces_plugin.store.migrations import CACHE_TABLES
from surfaces_plugin.usage import utc_day

from .conftest import BASE_CONFIG
from .test_tools import tool_config, tool_room

ALICE = "@alice:localhost"
BOB = "@bob:localhost"
ADMIN = "@admin:localhost"
SUMMARY_START = instructions(100)[:40]


class MeteredBackend(Backend):
    """Answers `re: <message>` and reports a different usage for every request (or none)."""

    def __init__(self, spec, *, reports: bool = True) -> None:
        super().__init__(spec)
        self.reports = reports
        self.reported: list[Usage] = []
        self.answered: list[str] = []

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        summarising = request.messages[0].content.startswith(SUMMARY_START)
        last = request.messages[-1].content
        if not summarising:
            self.answered.append(last)
        if summarising:
            yield Chunk("a short summary")
        else:  # in two pieces with a pause, so a streamed answer is posted, then edited
            yield Chunk("re: ")
            await asyncio.sleep(0.05)
            yield Chunk(last[:30])
        if self.reports:
            n = len(self.reported)
            usage = Usage(prompt_tokens=100 + 17 * n, completion_tokens=9 + 3 * n)
            self.reported.append(usage)
            yield Chunk(usage=usage)


def agents(**changes) -> list[dict]:
    return [{**BASE_CONFIG["agents"][0], **changes}]


async def onboarded(make_surfaces, client=None, *, reports: bool = True, **config):
    config.setdefault("streaming", {"enabled": False})
    h = await make_surfaces(client, **config)
    backend = MeteredBackend(h.app.settings.backends["echo"], reports=reports)
    h.app.backends.put(backend)
    await h.say(h.dm(ALICE), ALICE, "!ai start")
    [room] = h.app.rooms.rooms_of(ALICE)
    return h, room.room_id, backend


def total(usages: list[Usage]) -> tuple[int, int]:
    return sum(u.prompt_tokens for u in usages), sum(u.completion_tokens for u in usages)


def figure(prompt: int, completion: int) -> str:
    return f"{prompt + completion:,} tokens ({prompt:,} prompt + {completion:,} completion)"


async def usage_reply(h, room: str, user: str = ALICE, args: str = "") -> str:
    await h.say(room, user, f"!ai usage {args}".strip())
    return h.last_reply(room)


def final_markers(h, room: str) -> list[dict]:
    """The turn marker of each answer's latest version."""
    latest: dict[str, dict] = {}
    for event in h.client.messages(room):
        content = event["content"]
        relates = content.get("m.relates_to") or {}
        key = relates.get("event_id", event["event_id"])
        if layout.TURN_KEY in content:
            latest[key] = content[layout.TURN_KEY]
    return list(latest.values())


async def test_usage_shows_exactly_what_the_backend_reported(make_surfaces) -> None:
    h, room, backend = await onboarded(make_surfaces)
    for text in ("first question", "second question"):
        await h.say(room, ALICE, text)
    assert len(backend.reported) == 2
    shown = figure(*total(backend.reported))
    reply = await usage_reply(h, room)
    today = utc_day(h.app.usage.clock())
    assert f"- today ({today}): {shown}" in reply
    assert f"- last 7 days: {shown}" in reply
    assert f"  - `echo`: {shown}; today {sum(total(backend.reported)):,}" in reply
    assert "≈" not in reply  # nothing estimated
    # Each answer carries what it cost, as reported, on its final version.
    usages = [m["usage"] for m in final_markers(h, room)]
    assert usages == [
        {"prompt": u.prompt_tokens, "completion": u.completion_tokens, "estimated": False}
        for u in backend.reported
    ]


async def test_without_reported_usage_the_figures_are_estimated_and_marked(make_surfaces) -> None:
    # Streamed, so the answer is posted and edited: only its final version carries usage.
    h, room, _ = await onboarded(
        make_surfaces, reports=False, streaming={"enabled": True, "edit_interval_ms": 0}
    )
    await h.say(room, ALICE, "a question for an agent that reports nothing")
    turn_contents = [
        e["content"].get("m.new_content", e["content"])[layout.TURN_KEY]
        for e in h.client.messages(room)
        if layout.TURN_KEY in e["content"]
    ]
    assert len(turn_contents) >= 2 and all("usage" not in t for t in turn_contents[:-1])
    [usage] = [m["usage"] for m in final_markers(h, room)]
    assert usage["estimated"] is True and usage["prompt"] > 0 and usage["completion"] > 0
    reply = await usage_reply(h, room)
    assert f"today ({utc_day(h.app.usage.clock())}): ≈{figure(usage['prompt'], usage['completion'])}" in reply
    assert "≈ marks figures that are partly estimated" in reply


async def test_a_summary_counts_for_the_rooms_owner(make_surfaces) -> None:
    h, room, backend = await onboarded(make_surfaces, agents=agents(context_tokens=256))
    for i in range(4):
        await h.say(room, ALICE, f"message {i} " + "word " * 60)
    answers = len(backend.reported)
    await h.say(room, ALICE, "!ai compact")
    assert len(backend.reported) > answers  # the summary's requests were reported too
    reply = await usage_reply(h, room)
    assert f"- last 7 days: {figure(*total(backend.reported))}" in reply


# quotas

# 2026-03-01 18:47:00 UTC: 5 h 13 min before the quota resets.
EVENING = calendar.timegm((2026, 3, 1, 18, 47, 0)) * 1000
NEXT_MORNING = calendar.timegm((2026, 3, 2, 0, 0, 30)) * 1000


async def test_over_quota_one_notice_with_the_reset_then_answered_after_midnight(
    make_surfaces,
) -> None:
    h, room, backend = await onboarded(make_surfaces, limits={"daily_tokens_per_user": 100})
    now = [EVENING]
    h.app.usage.clock = lambda: now[0]
    await h.say(room, ALICE, "within the quota")  # reported 109 tokens: over 100 from now on
    await h.say(room, ALICE, "over the quota")
    notice = h.last_reply(room)
    assert "daily quota of 100 tokens (109 used today)" in notice
    assert "resets at 00:00 UTC, in 5 h 13 min" in notice
    await h.say(room, ALICE, "still over the quota")
    await h.say(room, ALICE, "!ai usage")  # the positive signal after the silence
    bodies = h.client.bodies(room)
    assert bodies.count(notice) == 1  # once per room and day, however many messages
    assert backend.answered == ["within the quota"]  # nothing else reached the agent
    assert "- daily quota: 100 tokens, 0 left today (resets at 00:00 UTC, in 5 h 13 min)" in (
        bodies[-1]
    )
    await h.say(room, ALICE, "!ai retry")  # a retry costs tokens too
    assert h.last_reply(room) == notice and backend.answered == ["within the quota"]

    now[0] = NEXT_MORNING
    await h.say(room, ALICE, "a new day")
    assert backend.answered == ["within the quota", "a new day"]
    assert h.last_reply(room) == "re: a new day"

    # The refused messages were marked processed: a restart does not answer them late.
    again = await make_surfaces(h.client, streaming={"enabled": False})
    again.app.backends.put(backend)
    await again.say(room, ALICE, "after the restart")
    assert backend.answered == ["within the quota", "a new day", "after the restart"]


async def test_a_per_agent_quota_and_admins_are_exempt(make_surfaces) -> None:
    h, room, backend = await onboarded(
        make_surfaces,
        agents=agents(daily_tokens_per_user=50),
        access={"admins": [ADMIN]},
    )
    await h.say(room, ALICE, "one")
    await h.say(room, ALICE, "two")
    assert "daily quota of 50 tokens with `echo` (109 used today)" in h.last_reply(room)
    assert backend.answered == ["one"]
    await h.say(h.dm(ADMIN), ADMIN, "!ai start")
    [admin_room] = h.app.rooms.rooms_of(ADMIN)
    for text in ("admin one", "admin two"):
        await h.say(admin_room.room_id, ADMIN, text)
    assert backend.answered == ["one", "admin one", "admin two"]


# everyone's figures, and after the database is lost


async def test_admins_see_everyones_usage_and_status_shows_today(make_surfaces) -> None:
    h, room, backend = await onboarded(make_surfaces, access={"admins": [ADMIN]})
    await h.say(room, ALICE, "from alice")
    alice = sum(total(backend.reported))
    await h.say(h.dm(BOB), BOB, "!ai start")
    [bob_room] = h.app.rooms.rooms_of(BOB)
    await h.say(bob_room.room_id, BOB, "from bob")
    bob = sum(total(backend.reported)) - alice
    assert "for admins only" in await usage_reply(h, room, ALICE, "all")
    admin_dm = h.dm(ADMIN)
    everyone = await usage_reply(h, admin_dm, ADMIN, "all")
    assert f"- {ALICE}: today {alice:,}, 7 days {alice:,} (`echo` {alice:,})" in everyone
    assert f"- {BOB}: today {bob:,}, 7 days {bob:,} (`echo` {bob:,})" in everyone
    await h.say(admin_dm, ADMIN, "!ai status")
    assert f"- tokens today (UTC): {figure(*total(backend.reported))}, 2 users" in h.last_reply(
        admin_dm
    )


def figures(reply: str) -> list[str]:
    return [line for line in reply.splitlines() if re.search(r"\d+ tokens", line)]


async def test_the_ledger_is_rebuilt_from_the_turn_markers_after_the_database_is_lost(
    make_surfaces,
) -> None:
    config = {"agents": agents(context_tokens=256)}
    h, room, backend = await onboarded(make_surfaces, **config)
    for i in range(4):
        await h.say(room, ALICE, f"message {i} " + "word " * 60)
    await h.say(room, ALICE, "!ai compact")
    before = await usage_reply(h, room)
    assert f"last 7 days: {figure(*total(backend.reported))}" in before
    for table in CACHE_TABLES:
        await h.app.stores.db.execute(f"DELETE FROM {table}")

    again = await make_surfaces(h.client, streaming={"enabled": False}, **config)
    again.app.backends.put(backend)
    after = await usage_reply(again, room)
    assert figures(after) == figures(before)
    # What is answered after the rebuild adds its own usage once, and nothing twice.
    await again.say(room, ALICE, "after the loss")
    assert f"last 7 days: {figure(*total(backend.reported))}" in await usage_reply(again, room)
    # A later start finds the ledger whole and reads nothing back for it.
    assert not await again.app.usage.needs_rebuild()


async def test_a_turn_with_tool_calls_counts_every_request(make_surfaces, mcp_tools) -> None:
    async with FakeOpenAI() as model:
        h, room = await tool_room(make_surfaces, tool_config(model, mcp_tools))
        await h.say(room, ALICE, 'Add them.\ncall add {"a": 2, "b": 3}')
        assert len(model.reported) == 2  # the tool call, then the answer with its result
        prompt = sum(u["prompt_tokens"] for u in model.reported)
        completion = sum(u["completion_tokens"] for u in model.reported)
        reply = await usage_reply(h, room)
    assert f"- today ({utc_day(h.app.usage.clock())}): {figure(prompt, completion)}" in reply
    assert f"  - `helper`: {figure(prompt, completion)}" in reply
