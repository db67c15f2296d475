"""Conversations the provider keeps, on a real Synapse: an agent on OpenAI's Responses API with
`state: server`, served by the local Responses + Conversations server (devtools.fake_responses)
in its own thread (contract §1 platform_chat_id, §3 reset; reconciliation.md backfill).

The platform issues every `platform_chat_id` (`conv_…`); each turn names it and sends only the
new message. The fake model's answer says how many items the platform holds for the
conversation, so an answer proves where the history lives. What the user sees is read from
Matrix, what the platform was asked and holds from the fake.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest

from devtools.e2e import BotFactory, MakeUser
from devtools.fake_responses import FakeResponses, item_text
from devtools.matrix_user import create_content
from devtools.maubot_standalone import StandaloneBot
from devtools.synapse import SynapseServer
from devtools.threaded import Threaded
from surfaces_plugin import layout
from tests.e2e.conftest import PLUGIN_DIR, watched

from .test_context import Setup, binding, onboard, say
from .test_restart import as_bot, start_writes

pytestmark = pytest.mark.e2e

AGENT = "gpt"
API_KEY = "sk-platform-test"
SYSTEM_PROMPT = "You are a test assistant whose history the platform keeps."
_REPORT_RE = re.compile(r"Reconciliation done: \*\*Reconciliation\*\* \(start\)[^\n]*")


def platform_answer(items: list[dict[str, Any]]) -> str:
    """What the fake model says: how many items it sees (the conversation's stored items plus
    the new input) and the newest user text."""
    users = [i for i in items if i.get("type") == "message" and i.get("role") == "user"]
    last = item_text(users[-1]) if users else ""
    return f"The platform holds {len(items)} items; you said: {last}"


def bot_config(base_url: str) -> dict[str, Any]:
    return {
        "backends": [
            {"id": "echo", "type": "echo"},
            {
                "id": "platform",
                "type": "openai",
                "api": "responses",
                "state": "server",
                "base_url": base_url,
                "api_key": API_KEY,
                "timeout_s": 15,
                "max_retries": 0,
            }
        ],
        "agents": [
            {
                "id": AGENT,
                "name": "Platform GPT",
                "description": "The test's Responses API server, holding each conversation.",
                "backend": "platform",
                "model": "fake-model",
                "system_prompt": SYSTEM_PROMPT,
                "context_tokens": 4096,
                "temperature": 0.5,
            },
            {"id": "echo", "name": "Echo", "description": "Repeats you.", "backend": "echo"},
        ],
        "default_agent": AGENT,
        "streaming": {"enabled": False},
        "limits": {"per_user_requests_per_minute": 1000},
    }


Platform = Threaded[FakeResponses]


@pytest.fixture(scope="module")
def platform() -> Iterator[Platform]:
    with Threaded(lambda: FakeResponses(answer=platform_answer), name="fake-responses") as fake:
        yield fake


@pytest.fixture(scope="module")
def module_bot(
    synapse: SynapseServer, platform: Platform, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StandaloneBot]:
    data_dir = tmp_path_factory.mktemp("platform-bot")
    config = bot_config(platform.server.base_url)
    with StandaloneBot(synapse, config, data_dir=data_dir, repo_root=PLUGIN_DIR) as bot:
        yield bot


@pytest.fixture
def bot(module_bot: StandaloneBot, request: pytest.FixtureRequest) -> StandaloneBot:
    return watched(request, module_bot)


# ---------------------------------------------------------------------------------------------
# helpers


def bodies(platform: Platform) -> list[dict[str, Any]]:
    """Every POST /v1/responses body so far, oldest first."""
    return platform.call(lambda fake: list(fake.bodies))


def conversations_created(platform: Platform) -> int:
    """How many POST /v1/conversations the platform has seen."""
    return platform.call(
        lambda fake: sum(
            1
            for r in fake.requests
            if r["method"] == "POST" and r["path"] == "/v1/conversations"
        )
    )


def held(platform: Platform, conversation_id: str) -> list[tuple[str, str]]:
    """(role, text) of the message items the platform holds for a conversation."""
    return platform.call(
        lambda fake: [
            (item["role"], item_text(item))
            for item in fake.items(conversation_id)
            if item["type"] == "message"
        ]
    )


async def pcid(s: Setup) -> str:
    value = (await binding(s)).get("platform_chat_id")
    assert isinstance(value, str), "the binding has no platform_chat_id"
    return value


async def turn(s: Setup, platform: Platform, text: str) -> tuple[str, dict[str, Any]]:
    """Say `text`; the answer's text and the one request the platform got for it."""
    before = len(bodies(platform))
    answer = await say(s, text)
    after = bodies(platform)
    assert len(after) == before + 1, "one request per message"
    return s.alice.latest_text(s.room, answer), after[-1]


def only_new(body: dict[str, Any], text: str) -> bool:
    """The request carried nothing but the new user message."""
    return body["input"] == [{"role": "user", "content": text}]


def last_start_report(bot: StandaloneBot) -> str:
    """The newest start-up reconciliation's report line in the bot's log."""
    reports = _REPORT_RE.findall(bot.log_text())
    assert reports, "no start-up reconciliation report in the log"
    return reports[-1]


async def restart(bot: StandaloneBot, *, lose_database: bool = False) -> None:
    bot.stop()
    if lose_database:
        dropped = bot.drop_plugin_tables()
        assert {"rooms", "messages", "chats"} <= set(dropped), dropped
    await asyncio.to_thread(bot.start)


# ---------------------------------------------------------------------------------------------
# 1. a new working room is bound to the platform's conversation, which keeps the history


async def test_new_room_is_bound_to_a_platform_conversation_that_keeps_the_history(
    bot: StandaloneBot, make_user: MakeUser, platform: Platform
) -> None:
    created = conversations_created(platform)
    s = await onboard(bot, make_user)
    conversation = await pcid(s)
    assert conversation.startswith("conv_"), conversation
    assert conversations_created(platform) == created + 1
    assert held(platform, conversation) == []  # created empty: the system prompt is no item

    text, body = await turn(s, platform, "My name is Ada.")
    assert text == "The platform holds 1 items; you said: My name is Ada."
    assert body["conversation"] == conversation
    assert only_new(body, "My name is Ada.")
    assert body["instructions"].startswith(SYSTEM_PROMPT)
    assert "store" not in body

    text, body = await turn(s, platform, "What is my name?")
    # The platform answered from the three items it holds; Surfaces sent only the question.
    assert text == "The platform holds 3 items; you said: What is my name?"
    assert body["conversation"] == conversation
    assert only_new(body, "What is my name?")
    assert held(platform, conversation) == [
        ("user", "My name is Ada."),
        ("assistant", "The platform holds 1 items; you said: My name is Ada."),
        ("user", "What is my name?"),
        ("assistant", text),
    ]
    answers = [
        e for e in s.alice.messages(s.room, s.bot.user_id) if layout.TURN_KEY in e["content"]
    ]
    assert [e["content"][layout.TURN_KEY]["platform_chat_id"] for e in answers] == [
        conversation,
        conversation,
    ]


# ---------------------------------------------------------------------------------------------
# 2. `!ai reset` starts a new platform conversation


async def test_reset_binds_a_new_platform_conversation(
    bot: StandaloneBot, make_user: MakeUser, platform: Platform
) -> None:
    s = await onboard(bot, make_user)
    old = await pcid(s)
    await turn(s, platform, "Remember the number 42.")
    created = conversations_created(platform)

    asked = await s.alice.send_text(s.room, "!ai reset")
    notice = await s.alice.wait_for(
        s.room,
        lambda e: e.get("sender") == s.bot.user_id and layout.RESET_KEY in e["content"],
        after=asked,
    )
    new = await pcid(s)
    assert new.startswith("conv_") and new != old
    assert notice["content"][layout.RESET_KEY] == {"platform_chat_id": new}
    assert conversations_created(platform) == created + 1

    text, body = await turn(s, platform, "Which number?")
    assert text == "The platform holds 1 items; you said: Which number?"  # a fresh start
    assert body["conversation"] == new
    assert only_new(body, "Which number?")
    assert len(held(platform, old)) == 2, "the old conversation was continued after the reset"


async def test_a_room_switched_to_the_platform_agent_goes_on_in_a_platform_conversation(
    bot: StandaloneBot, make_user: MakeUser, platform: Platform
) -> None:
    s = await onboard(bot, make_user)
    replies = await s.alice.command(s.dm, "!ai new echo Echoes", s.bot.user_id, quiet=0.2)
    assert any(r.startswith("New working room [Echoes]") for r in replies), replies
    room = await s.alice.wait_for_invite(
        lambda rid, st: rid != s.room and create_content(st).get(layout.KIND_KEY) == "working"
    )
    await s.alice.join(room)
    s = Setup(s.alice, s.bot, s.dm, s.space, room)
    assert s.alice.latest_text(room, await say(s, "I like tea.")) == "echo: I like tea."
    local = await pcid(s)
    assert not local.startswith("conv_")  # echo's own id: the platform has never seen it

    created = conversations_created(platform)
    await s.alice.command(room, f"!ai agent {AGENT}", s.bot.user_id, quiet=0.2)
    conversation = await pcid(s)
    assert conversation.startswith("conv_"), conversation  # opened by the switch itself
    assert conversations_created(platform) == created + 1
    # Seeded with the room's turns, so the question goes to it at once (never echo's own id).
    assert held(platform, conversation)[:2] == [("user", "I like tea."), ("assistant", "echo: I like tea.")]
    mark = len(bodies(platform))
    text = s.alice.latest_text(room, await say(s, "What do I like?"))
    asked = bodies(platform)[mark:]
    assert [b["conversation"] for b in asked] == [conversation], asked
    assert only_new(asked[-1], "What do I like?")
    assert text == "The platform holds 3 items; you said: What do I like?"
    assert await pcid(s) == conversation


# ---------------------------------------------------------------------------------------------
# 3. restarts and a lost database: Matrix keeps the id, the platform keeps the conversation


async def test_restart_and_database_loss_continue_the_same_platform_conversation(
    bot_factory: BotFactory, make_user: MakeUser, platform: Platform
) -> None:
    bot = bot_factory(bot_config(platform.server.base_url))
    s = await onboard(bot, make_user)
    conversation = await pcid(s)
    text, _ = await turn(s, platform, "one")
    assert text == "The platform holds 1 items; you said: one"
    created = conversations_created(platform)

    await restart(bot)
    assert await pcid(s) == conversation
    text, body = await turn(s, platform, "two")
    assert text == "The platform holds 3 items; you said: two"
    assert body["conversation"] == conversation and only_new(body, "two")

    await restart(bot, lose_database=True)
    assert await pcid(s) == conversation  # Matrix is the source of truth
    assert start_writes(bot.log_text())[-1] == 0, "Matrix was right; nothing to write"
    text, body = await turn(s, platform, "three")
    assert text == "The platform holds 5 items; you said: three"
    assert body["conversation"] == conversation and only_new(body, "three")
    assert conversations_created(platform) == created, "a restart created a conversation"
    assert [role for role, _ in held(platform, conversation)] == ["user", "assistant"] * 3


# ---------------------------------------------------------------------------------------------
# 4. a binding without platform_chat_id: the cache's id comes back, else the platform issues one


async def strip_chat_id(s: Setup) -> dict[str, Any]:
    """The room's admin (the bot's account) rewrites the binding without platform_chat_id, as
    an older layout wrote it; returns that binding."""
    stripped = {k: v for k, v in (await binding(s)).items() if k != "platform_chat_id"}
    path = f"/_matrix/client/v3/rooms/{quote(s.room, safe='')}/state/{layout.BINDING_TYPE}/"
    as_bot(s.bot, "PUT", path, stripped)
    assert "platform_chat_id" not in await binding(s)
    return stripped


async def test_binding_without_an_id_gets_a_platform_conversation_at_start(
    bot_factory: BotFactory, make_user: MakeUser, platform: Platform
) -> None:
    bot = bot_factory(bot_config(platform.server.base_url))
    s = await onboard(bot, make_user)
    old = await pcid(s)
    await turn(s, platform, "before")
    created = conversations_created(platform)

    # The cache still knows the room's conversation: the binding gets it back, nothing is
    # created on the platform, and the conversation goes on.
    bot.stop()
    stripped = await strip_chat_id(s)
    await asyncio.to_thread(bot.start)
    assert await binding(s) == {**stripped, "platform_chat_id": old}
    report = last_start_report(bot)
    assert "- platform_chat_ids backfilled: 1" in report, report
    assert "platform conversations created" not in report, report
    text, body = await turn(s, platform, "continued")
    assert text == "The platform holds 3 items; you said: continued"
    assert body["conversation"] == old and only_new(body, "continued")
    assert conversations_created(platform) == created

    # Nobody knows it any more (the plugin database is lost too): the platform issues a new one.
    bot.stop()
    stripped = await strip_chat_id(s)
    bot.drop_plugin_tables()
    await asyncio.to_thread(bot.start)
    new = await pcid(s)
    assert new.startswith("conv_") and new != old
    assert conversations_created(platform) == created + 1  # the platform issued it
    assert platform.call(lambda fake: new in fake.conversations)
    assert await binding(s) == {**stripped, "platform_chat_id": new}
    report = last_start_report(bot)
    assert "- platform conversations created: 1" in report, report
    assert start_writes(bot.log_text())[-1] >= 1, report

    text, body = await turn(s, platform, "after")
    assert text == "The platform holds 1 items; you said: after"
    assert body["conversation"] == new and only_new(body, "after")

    # Done once: the next start asks the platform for nothing and writes nothing.
    await restart(bot)
    assert start_writes(bot.log_text())[-1] == 0, last_start_report(bot)
    assert "platform conversations created" not in last_start_report(bot)
    text, body = await turn(s, platform, "again")  # the positive signal: answered after it
    assert text == "The platform holds 3 items; you said: again"
    assert body["conversation"] == new and only_new(body, "again")
    assert await pcid(s) == new
    assert conversations_created(platform) == created + 1
