"""Hostile user text on a real Synapse: a title full of bidi, zero-width and control characters
becomes a clean room name or is refused, a message holding NUL is answered with the bot on SQLite
and on Postgres (maubot's database and the plugin's), a user over the rate limit is told once,
and a message with nothing in it is ignored.

The Postgres case needs PostgreSQL at `SURFACES_POSTGRES_URL` (skipped when it does not answer,
failed instead when `SURFACES_REQUIRE_POSTGRES=1`).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from devtools.e2e import BotFactory, MakeUser
from devtools.matrix_user import MatrixUser, is_message, room_kind
from devtools.maubot_standalone import StandaloneBot

from .invariants import TURN, onboard

pytestmark = pytest.mark.e2e

PER_MINUTE = 3
MAX_CHARS = 100
CONFIG: dict[str, Any] = {
    "streaming": {"enabled": False},  # one message per answer: each answer is one event
    "limits": {"per_user_requests_per_minute": PER_MINUTE, "max_message_chars": MAX_CHARS},
}
HOSTILE_TITLE = "\u202eevil\u202c \u2066Plans\u2069\u200b\u200d for\ufeff\n\ttoday\x07"
SHOWN_TITLE = "evil Plans for today"


@pytest.fixture
def bot(bot_factory: BotFactory) -> StandaloneBot:
    return bot_factory(CONFIG)


@dataclass
class EngineBot:
    bot: StandaloneBot
    postgres_url: str | None  # None: the bot's database is SQLite


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def engine_bot(request: pytest.FixtureRequest) -> EngineBot:
    """A bot on SQLite, or one whose whole database is a fresh Postgres database."""
    # The database first, so that teardown stops the bot before dropping it.
    url = request.getfixturevalue("postgres_database_url") if request.param == "postgres" else None
    bot_factory: BotFactory = request.getfixturevalue("bot_factory")
    return EngineBot(bot_factory(CONFIG, database_url=url), url)


async def answer_to(user: MatrixUser, room_id: str, bot: StandaloneBot, sent: str) -> str:
    """The text of the bot's answer to the message `sent` (streaming is off: one event)."""
    answer = await user.wait_for(
        room_id,
        lambda e: is_message(e, bot.user_id, "m.text")
        and e["content"].get(TURN, {}).get("answers") == sent,
        timeout=20,
    )
    return str(answer["content"]["body"])


def notices_after(user: MatrixUser, room_id: str, bot: StandaloneBot, sent: str) -> list[str]:
    return [
        user.latest_text(room_id, e)
        for e in user.messages(room_id, bot.user_id, after=sent)
        if e["content"].get("msgtype") == "m.notice"
    ]


async def stored_content(engine_bot: EngineBot, event_id: str) -> str | None:
    """The stored text of a message, read from the bot's own database."""
    query = "SELECT content FROM messages WHERE event_id=$1"
    if engine_bot.postgres_url is None:
        with sqlite3.connect(engine_bot.bot.data_dir / "bot.db") as db:
            row = db.execute(query.replace("$1", "?"), (event_id,)).fetchone()
        return row[0] if row else None
    conn = await asyncpg.connect(engine_bot.postgres_url)
    try:
        return await conn.fetchval(query, event_id)
    finally:
        await conn.close()


async def test_a_hostile_title_becomes_a_clean_room_name(
    bot: StandaloneBot, make_user: MakeUser
) -> None:
    alice = await make_user()
    dm, _space, first_room = await onboard(alice, bot)

    sent = await alice.send_text(dm, f"!ai new echo {HOSTILE_TITLE}")
    notice = await alice.wait_for_notice(dm, "New working room", bot.user_id, timeout=20, after=sent)
    assert f"New working room [{SHOWN_TITLE}](" in alice.latest_text(dm, notice)
    room = await alice.wait_for_invite(
        lambda rid, state: rid != first_room and room_kind(state) == "working", timeout=15
    )
    await alice.join(room)
    assert await alice.get_state_event(room, "m.room.name") == {"name": SHOWN_TITLE}
    binding = await alice.get_state_event(room, "org.surfaces.binding")
    assert binding is not None and binding["title"] == SHOWN_TITLE

    listing = await alice.command(dm, "!ai rooms", bot.user_id)
    assert len(listing) == 1 and f"[{SHOWN_TITLE}](" in listing[0], listing


async def test_a_title_with_nothing_visible_is_refused(
    bot: StandaloneBot, make_user: MakeUser
) -> None:
    alice = await make_user()
    dm, _space, _room = await onboard(alice, bot)

    sent = await alice.send_text(dm, "!ai new echo \u200b\u2066\u2069\ufeff\x07")
    notice = await alice.wait_for_notice(dm, "nothing visible", bot.user_id, timeout=20, after=sent)
    assert "Usage: `!ai new [agent] [title…]`" in alice.latest_text(dm, notice)
    # The refusal came before any room was made: the Space still holds only the first room.
    listing = await alice.command(dm, "!ai rooms", bot.user_id)
    assert len(listing) == 1 and "Your working rooms** (1)" in listing[0], listing


async def test_a_message_holding_nul_is_answered(engine_bot: EngineBot, make_user: MakeUser) -> None:
    bot = engine_bot.bot
    alice = await make_user()
    _dm, _space, room = await onboard(alice, bot)

    sent = await alice.send_text(room, "before\x00after")
    assert await answer_to(alice, room, bot, sent) == "echo: before\ufffdafter"
    later = await alice.send_text(room, "and the room goes on")
    assert await answer_to(alice, room, bot, later) == "echo: and the room goes on"
    assert await stored_content(engine_bot, sent) == "before\ufffdafter"  # the same on both


async def test_a_rate_limited_user_is_told_once(bot: StandaloneBot, make_user: MakeUser) -> None:
    alice = await make_user()
    _dm, _space, room = await onboard(alice, bot)

    first = await alice.send_text(room, "m0")
    for i in range(1, PER_MINUTE + 4):  # three answered, four refused
        await alice.send_text(room, f"m{i}")
    # Positive signal: a message over the length limit, refused in turn after all of them.
    last = await alice.send_text(room, "x" * (MAX_CHARS + 1))
    await alice.wait_for_notice(room, "the limit is 100", bot.user_id, timeout=30, after=last)

    answers = [
        alice.latest_text(room, e)
        for e in alice.messages(room, bot.user_id, after=None)
        if e["content"].get("msgtype") == "m.text"
    ]
    assert answers == [f"echo: m{i}" for i in range(PER_MINUTE)]
    notices = notices_after(alice, room, bot, first)
    rate_notices = [n for n in notices if "faster than the limit" in n]
    assert rate_notices == [
        f"You are sending messages faster than the limit ({PER_MINUTE} a minute), so I am "
        "not answering them for now. Wait a little, then send again what you need answered."
    ]


async def test_a_body_with_nothing_in_it_is_ignored(
    bot: StandaloneBot, make_user: MakeUser
) -> None:
    """A local Synapse refuses a body that is not a string (400 "'body' not a string type"); one
    arriving over federation is covered by the plugin tests. Blank bodies it does accept."""
    alice = await make_user()
    _dm, _space, room = await onboard(alice, bot)

    first = await alice.send_text(room, "")
    await alice.send_text(room, " \n\t ")
    # Positive signal: the next real message is answered, and nothing came before its answer.
    real = await alice.send_text(room, "a real one")
    assert await answer_to(alice, room, bot, real) == "echo: a real one"
    bot_events = alice.messages(room, bot.user_id, after=first)
    assert [alice.latest_text(room, e) for e in bot_events] == ["echo: a real one"]
