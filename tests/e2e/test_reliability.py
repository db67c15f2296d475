"""Reliability on a real Synapse: crashes at random moments, a lost plugin database, failing
backends, a restarting homeserver, and many users at once.

Knobs: `SURFACES_CRASH_ITERATIONS` (default 4; the full run uses 20 or more),
`SURFACES_CRASH_SEED` (default 1), `SURFACES_LOAD_USERS` (default 6; the full run uses 50).
"""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from devtools.e2e import BotFactory, MakeUser
from devtools.fake_openai import FakeOpenAI
from devtools.matrix_user import MatrixError, MatrixUser, is_message
from devtools.maubot_standalone import StandaloneBot
from devtools.synapse import SynapseServer
from surfaces_plugin.store.migrations import CACHE_TABLES
from tests.conftest import fresh_postgres_database

from .invariants import (
    TURN,
    BotView,
    check_answers,
    is_edit,
    join_all_invites,
    latest_content,
    onboard,
    read_layout,
    wait_all_answered,
    wait_invite_of_kind,
)

pytestmark = pytest.mark.e2e

CRASH_ITERATIONS = int(os.environ.get("SURFACES_CRASH_ITERATIONS", "4"))
CRASH_SEED = int(os.environ.get("SURFACES_CRASH_SEED", "1"))
LOAD_USERS = int(os.environ.get("SURFACES_LOAD_USERS", "6"))
LOAD_MESSAGES = 5

FAST_STREAM = {"streaming": {"enabled": True, "edit_interval_ms": 150}}
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


async def join_or_ask_again(user: MatrixUser, dm: str, room_id: str, bot: StandaloneBot) -> None:
    """Join a room of ours; when the crash came before the invite, `!ai start` re-sends it."""
    try:
        await user.join(room_id)
        return
    except MatrixError:
        pass
    await ask(user, dm, "!ai start", "Space", bot)
    await user.join(room_id)


# -- crash injection ---------------------------------------------------------------------------


@pytest.mark.timeout(900)
async def test_crash_at_random_moments_keeps_every_invariant(
    bot_factory: BotFactory, make_user: MakeUser, synapse: SynapseServer
) -> None:
    """SIGKILL during onboarding, `!ai new`, `!ai reset` or a streamed answer, then restart:
    one Space per user, rooms linked both ways, every binding has a platform_chat_id, every
    message answered exactly once (a cut-off answer is marked as interrupted, not repeated)."""
    rng = random.Random(CRASH_SEED)
    bot = bot_factory(FAST_STREAM)
    view = BotView(synapse, bot)
    alice = await make_user()
    dm, _space, room = await onboard(alice, bot)
    users: dict[str, tuple[MatrixUser, str]] = {alice.user_id: (alice, dm)}
    rooms: dict[str, tuple[MatrixUser, str]] = {room: (alice, room)}
    seen_actions: list[str] = []

    for iteration in range(CRASH_ITERATIONS):
        action = rng.choice(["onboard", "new", "reset", "stream", "stream"])
        seen_actions.append(action)
        if action == "onboard":
            user = await make_user()
            user_dm = await user.open_dm(bot.user_id)
            await user.wait_for_notice(user_dm, "Hi!", sender=bot.user_id, timeout=15)
            users[user.user_id] = (user, user_dm)
            await user.send_text(user_dm, "!ai start")
            delay = rng.uniform(0.0, 0.8)
        elif action == "new":
            user, user_dm = rng.choice(list(users.values()))
            await user.send_text(user_dm, f"!ai new Crash {iteration}")
            delay = rng.uniform(0.0, 0.6)
        elif action == "reset":
            owner, working = rng.choice(list(rooms.values()))
            await owner.send_text(working, "!ai reset")
            delay = rng.uniform(0.0, 0.4)
        else:
            owner, working = rng.choice(list(rooms.values()))
            await owner.send_text(working, long_message(f"it{iteration}a"))
            await owner.send_text(working, f"it{iteration}b short one")  # queued behind it
            delay = rng.uniform(0.05, 3.0)
        await asyncio.sleep(delay)
        bot.kill()
        if rng.random() < 0.5:  # a message sent while the bot is down: caught up after start
            owner, working = rng.choice(list(rooms.values()))
            await owner.send_text(working, f"it{iteration} while down")
        bot.start()

        if action == "onboard":
            # The command may have been lost with the process: asking again must finish the
            # onboarding without a second Space.
            await ask(user, user_dm, "!ai start", "Space", bot)
            await asyncio.sleep(0.5)
            await join_all_invites(user)
        for user, _ in users.values():
            await join_all_invites(user)

        layout = await read_layout(view)
        assert not layout.problems, (iteration, action, delay, layout.problems)
        for user_id in users:
            assert len(layout.spaces.get(user_id, [])) == 1, (iteration, user_id, layout.spaces)
            assert any(owner == user_id for owner in layout.owners.values()), (
                f"{user_id} has a Space but no working room after `!ai start`"
            )
        for room_id, owner in layout.owners.items():
            if room_id not in rooms:
                user, user_dm = users[owner]
                await join_or_ask_again(user, user_dm, room_id, bot)
                rooms[room_id] = (user, room_id)
        for owner_user, room_id in rooms.values():
            result = await wait_all_answered(view, room_id, owner_user.user_id, timeout=40)
            assert not result.unanswered, (iteration, action, delay, "unanswered", result)
            assert not result.twice, (iteration, action, delay, "answered twice", result)
            assert not result.partial, (iteration, action, delay, "left cut off", result)
            assert result.order_ok, (iteration, action, delay, "out of order", result)

    print(f"crash iterations: {CRASH_ITERATIONS} (seed {CRASH_SEED}): {seen_actions}")


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
        lambda e: is_message(e, bot.user_id, "m.text")
        and e["content"].get(TURN, {}).get("answers") == long_one,
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
        lambda e: is_message(e, bot.user_id, "m.text")
        and e["content"].get(TURN, {}).get("answers") == sent,
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
            await asyncio.sleep(1.5)  # anything else the bot would send comes now
            after = alice.messages(room, bot.user_id, after=sent)
            notices = [e for e in after if e["content"].get("msgtype") == "m.notice"]
            answers = [e for e in after if e["content"].get("msgtype") == "m.text"]
            assert notices == [notice], (mode, [alice.latest_text(room, e) for e in after])
            assert len(answers) <= 1, mode  # a started answer is not sent again
            for answer in answers:  # cut off mid-way: ends visibly, not left streaming
                content = latest_content(alice.events(room), answer)
                assert not content[TURN].get("partial"), mode
                assert content["body"].endswith("*(the answer stopped here)*"), mode

            fake.set_mode("normal")
            reply = await answer_of(alice, room, bot, f"after {mode}")
            assert reply == f"Fake model says: after {mode}", mode
        print("time to the failure notice:", {m: round(t, 1) for m, t in timings.items()})
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
            if e.get("sender") == bot.user_id
            and TURN in e.get("content", {})
            and not is_edit(e)
        ]
        assert finals == [f"echo: {t}" for t in texts], user
    print(
        f"load: {LOAD_USERS} users onboarded in {onboarded:.1f} s; "
        f"{LOAD_USERS * LOAD_MESSAGES} messages answered in {answered:.1f} s"
    )
