"""Context management on a real Synapse, with an OpenAI-compatible server started by the test
(contract §2 reset/compact/memory/export, §3 reset and summary markers, shared memory).

The bot runs in its own process and talks to the in-process FakeOpenAI over 127.0.0.1; what the
agent was asked is read from the bodies the fake recorded, what the user sees from Matrix.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from devtools.e2e import BotFactory, MakeUser
from devtools.fake_openai import FakeOpenAI
from devtools.matrix_user import Event, MatrixUser, create_content, is_message
from devtools.maubot_standalone import StandaloneBot
from devtools.synapse import SynapseServer
from devtools.threaded import Threaded
from surfaces_plugin import layout
from surfaces_plugin.backends import ChatMessage
from surfaces_plugin.context_window import SUMMARY_HEADING, message_tokens
from tests.e2e.conftest import PLUGIN_DIR, watched

pytestmark = pytest.mark.e2e

AGENT = "gpt"
BUDGET = 256  # the smallest context budget the config accepts: long talks overflow it quickly
SYSTEM_PROMPT = "You are a careful test assistant."
SUMMARY_PREFIX = "You summarise a conversation"  # compaction.instructions(...)
SUMMARY_TEXT = "SUMMARY: the user described their garden, their bicycle trip and their cat."
# maubot's and mautrix's own tables share the standalone SQLite file with the plugin's.

# Long-ish prose, one topic per message, so a 256-token budget overflows after a few turns.
LONG_MESSAGES = [
    "Let me tell you about my garden. The tomatoes grow tall beside the old wooden fence, and "
    "every morning I water the beans, the carrots and the little lemon tree that my "
    "grandmother planted many years ago before she moved away to the coast.",
    "Yesterday I took my bicycle along the river. The path winds past the mill, under two "
    "stone bridges and through a quiet forest where deer sometimes cross, and I stopped at a "
    "small cafe for coffee and an apple cake before riding home in the rain.",
    "My cat is called Pepper. She sleeps on the windowsill most of the afternoon, chases "
    "moths in the evening, refuses every brand of dry food except one, and wakes me at five "
    "by knocking pens off the desk until somebody finally gets up.",
    "Next week I am planning a dinner party. There will be eight guests, a lentil soup, "
    "roasted vegetables from the garden, fresh bread from the bakery on the corner and a "
    "chocolate tart that I still have to practise twice before the evening comes.",
    "I also started learning the cello. My teacher says my bowing is uneven and my posture "
    "needs work, so I practise scales slowly for twenty minutes every day and record myself "
    "on my phone to hear where the notes drift out of tune.",
    "Finally, my neighbour asked me to look after his fish. There are eleven of them in a "
    "large tank with plants and a small castle, and they need food twice a day, a water "
    "check on Sundays and a lamp that switches off at nine in the evening.",
]


def reply_fn(messages: list[dict[str, Any]]) -> str:
    """Summarisation requests get a fixed summary; other requests a short answer."""
    first = messages[0] if messages else {}
    if first.get("role") == "system" and str(first.get("content", "")).startswith(SUMMARY_PREFIX):
        return SUMMARY_TEXT
    last = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
    return "ok: " + " ".join(str(last).split()[:4])


def is_summary_request(body: dict[str, Any]) -> bool:
    first = body["messages"][0]
    return first["role"] == "system" and first["content"].startswith(SUMMARY_PREFIX)


def estimated_tokens(body: dict[str, Any]) -> int:
    """The request's size as the plugin's own estimator counts it (with per-message overhead)."""
    return sum(message_tokens(ChatMessage(m["role"], m["content"])) for m in body["messages"])


def turns(body: dict[str, Any]) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in body["messages"] if m["role"] != "system"]


def system_text(body: dict[str, Any]) -> str:
    first = body["messages"][0]
    return first["content"] if first["role"] == "system" else ""


def bot_config(fake: FakeOpenAI, *, streaming: bool = False) -> dict[str, Any]:
    return {
        "backends": [
            {
                "id": "fake",
                "type": "openai",
                "base_url": fake.base_url,
                "api_key": "sk-test",
                "timeout_s": 15,
                "max_retries": 0,
            }
        ],
        "agents": [
            {
                "id": AGENT,
                "name": "Fake GPT",
                "description": "The test's OpenAI-compatible server.",
                "backend": "fake",
                "model": "fake-model",
                "system_prompt": SYSTEM_PROMPT,
                "context_tokens": BUDGET,
                "temperature": 0.5,
            }
        ],
        "default_agent": AGENT,
        "streaming": {"enabled": streaming, "edit_interval_ms": 200},
        "limits": {"per_user_requests_per_minute": 1000},
    }


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    """One server in its own thread for the module: it outlives each test's event loop."""
    with Threaded(lambda: FakeOpenAI(reply_fn=reply_fn), name="fake-openai") as threaded:
        yield threaded.server


@pytest.fixture(scope="module")
def module_bot(
    synapse: SynapseServer, fake: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StandaloneBot]:
    """One bot whose agent uses the fake with the smallest budget; each test has its own user."""
    data_dir = tmp_path_factory.mktemp("context-bot")
    with StandaloneBot(synapse, bot_config(fake), data_dir=data_dir, repo_root=PLUGIN_DIR) as bot:
        yield bot


@pytest.fixture
def bot(module_bot: StandaloneBot, request: pytest.FixtureRequest) -> StandaloneBot:
    return watched(request, module_bot)


# ---------------------------------------------------------------------------------------------
# helpers


def _working_invite(room_id: str, state: list[Event]) -> bool:
    return create_content(state).get(layout.KIND_KEY) == "working"


@dataclass
class Setup:
    alice: MatrixUser
    bot: StandaloneBot
    dm: str
    space: str
    room: str


async def onboard(bot: StandaloneBot, make_user: MakeUser) -> Setup:
    """A user DMs the bot, sends `!ai start` and joins the Space and the first working room."""
    alice = await make_user()
    dm = await alice.open_dm(bot.user_id)
    asked = await alice.send_text(dm, "!ai start")
    # (the greeting for the DM may arrive after the command; wait for the answer itself)
    await alice.wait_for_notice(dm, "Space is ready", sender=bot.user_id, after=asked, timeout=30)
    space = await alice.wait_for_invite(lambda _, st: create_content(st).get("type") == "m.space")
    room = await alice.wait_for_invite(_working_invite)
    await alice.join(space)
    await alice.join(room)
    await alice.wait_until(lambda: room in alice.joined, what="joined the working room")
    return Setup(alice, bot, dm, space, room)


async def say(s: Setup, text: str, room: str | None = None, timeout: float = 20) -> Event:
    """Send a message in a working room and wait for the agent's answer (the event with a turn
    marker); returns the answer."""
    room = room or s.room
    sent = await s.alice.send_text(room, text)
    return await s.alice.wait_for(
        room,
        lambda e: is_message(e, s.bot.user_id) and layout.TURN_KEY in e["content"],
        timeout=timeout,
        after=sent,
    )


def latest_content(user: MatrixUser, room: str, event: Event) -> dict[str, Any]:
    """A message's content after its edits (the last edit's `m.new_content`)."""
    edits = user.edits(room, event)
    return edits[-1]["content"].get("m.new_content", {}) if edits else event["content"]


async def finished(s: Setup, answer: Event, room: str | None = None) -> str:
    """Wait until a (streamed) answer is final: its latest marker no longer says `partial`."""
    room = room or s.room

    def done() -> bool:
        marker = latest_content(s.alice, room, answer).get(layout.TURN_KEY)
        return isinstance(marker, dict) and not marker.get("partial")

    await s.alice.wait_until(done, timeout=15, what="the final text of an answer")
    return s.alice.latest_text(room, answer)


COMPACTING = f"Compacting the conversation to fit `{AGENT}`'s context budget…"


async def talk_until_compacted(s: Setup) -> tuple[int, Event]:
    """Send LONG_MESSAGES one by one (each answered) until the automatic compaction notice shows;
    returns how many were sent and the notice."""

    def progress_notice() -> Event | None:
        return s.alice.find(
            s.room,
            lambda e: (
                is_message(e, s.bot.user_id, "m.notice") and e["content"].get("body") == COMPACTING
            ),
        )

    for sent, text in enumerate(LONG_MESSAGES, 1):
        await finished(s, await say(s, text))
        notice = progress_notice()
        if notice is not None:
            return sent, notice
    raise AssertionError(f"no compaction after {len(LONG_MESSAGES)} long messages")


async def binding(s: Setup, room: str | None = None) -> dict[str, Any]:
    content = await s.alice.get_state_event(room or s.room, layout.BINDING_TYPE)
    assert content is not None, "the working room has no binding"
    return content


# ---------------------------------------------------------------------------------------------
# 1. automatic compaction


async def test_long_conversation_is_compacted_automatically_and_fits_the_budget(
    bot: StandaloneBot, make_user: MakeUser, fake: FakeOpenAI
) -> None:
    s = await onboard(bot, make_user)
    mark = len(fake.bodies)  # the shared fake's requests from before this test are not ours
    sent, notice = await talk_until_compacted(s)
    assert sent >= 2, "compaction started before there was anything to compact"

    # The notice is edited once compaction is done, and the summary is shown in the room.
    edits = s.alice.edits(s.room, notice)
    assert edits, "the compaction notice was never edited"
    assert s.alice.latest_text(s.room, notice).startswith(
        f"Compacted the conversation to fit `{AGENT}`'s context budget: "
    )
    summary_notice = s.alice.find(
        s.room, lambda e: layout.SUMMARY_KEY in e.get("content", {}), after=notice["event_id"]
    )
    assert summary_notice is not None, "no summary notice in the room"
    assert summary_notice["content"]["body"].startswith("**Summary of the earlier conversation**")
    assert SUMMARY_TEXT in summary_notice["content"]["body"]
    marker = summary_notice["content"][layout.SUMMARY_KEY]
    assert marker["platform_chat_id"] == (await binding(s))["platform_chat_id"]

    # The fake saw the summarisation request(s), then the answer request with the summary.
    bodies = fake.bodies[mark:]
    last_summary = max(i for i, b in enumerate(bodies) if is_summary_request(b))
    transcript = bodies[last_summary]["messages"][1]["content"]
    assert "garden" in transcript, "the oldest turns were not what got summarised"
    for body in bodies:
        if is_summary_request(body):
            assert estimated_tokens(body) <= BUDGET, body
    after = bodies[last_summary + 1]
    assert not is_summary_request(after)
    assert f"{SUMMARY_HEADING}\n{SUMMARY_TEXT}" in system_text(after)
    assert system_text(after).startswith(SYSTEM_PROMPT)
    assert turns(after)[-1] == ("user", LONG_MESSAGES[sent - 1])
    assert not any("grandmother" in content for _, content in turns(after)), (
        "the summarised first message is still sent as it is"
    )
    assert estimated_tokens(after) <= BUDGET

    # The conversation goes on within the budget, still carrying the summary.
    answer = await say(s, "And what should I cook for the guests?")
    assert s.alice.latest_text(s.room, answer) == "ok: And what should I"
    last = fake.bodies[-1]
    assert SUMMARY_TEXT in system_text(last)
    assert turns(last)[-1] == ("user", "And what should I cook for the guests?")
    assert estimated_tokens(last) <= BUDGET
    for body in fake.bodies[mark:]:
        if not is_summary_request(body):
            assert estimated_tokens(body) <= BUDGET, body

    replies = await s.alice.command(s.room, "!ai context", s.bot.user_id, quiet=0.2)
    assert any("- summary: yes" in r and f"of {BUDGET} (" in r for r in replies), replies


# ---------------------------------------------------------------------------------------------
# 2. reset


async def test_reset_starts_a_new_conversation_without_the_old_turns(
    bot: StandaloneBot, make_user: MakeUser, fake: FakeOpenAI
) -> None:
    s = await onboard(bot, make_user)
    await say(s, "My favourite colour is teal.")
    await say(s, "I was born in Lisbon.")
    before = await binding(s)
    assert len(turns(fake.bodies[-1])) == 3  # the old conversation is sent while it lasts

    asked = await s.alice.send_text(s.room, "!ai reset")
    notice = await s.alice.wait_for(
        s.room,
        lambda e: is_message(e, s.bot.user_id, "m.notice") and layout.RESET_KEY in e["content"],
        after=asked,
    )
    after = await binding(s)
    new_id = after["platform_chat_id"]
    assert new_id and new_id != before["platform_chat_id"]
    assert notice["content"][layout.RESET_KEY] == {"platform_chat_id": new_id}
    assert notice["content"]["body"].startswith(f"Started a fresh conversation with `{AGENT}`")
    # Only the conversation changed in the binding.
    assert {k: v for k, v in after.items() if k != "platform_chat_id"} == {
        k: v for k, v in before.items() if k != "platform_chat_id"
    }

    answer = await say(s, "What is my favourite colour?")
    body = fake.bodies[-1]
    assert turns(body) == [("user", "What is my favourite colour?")]
    assert "teal" not in str(body["messages"]) and "Lisbon" not in str(body["messages"])
    assert answer["content"][layout.TURN_KEY]["platform_chat_id"] == new_id


# ---------------------------------------------------------------------------------------------
# 3. shared memory


async def test_memory_note_reaches_another_room_of_the_same_user(
    bot: StandaloneBot, make_user: MakeUser, fake: FakeOpenAI
) -> None:
    s = await onboard(bot, make_user)
    note = "I am vegetarian and live in Porto."
    replies = await s.alice.command(s.room, f"!ai memory add {note}", s.bot.user_id, quiet=0.2)
    assert any(r.startswith("Noted as 1.") for r in replies), replies

    memory = await s.alice.get_state_event(s.space, layout.MEMORY_TYPE)
    assert memory == {"v": 1, "notes": [note]}

    replies = await s.alice.command(s.dm, "!ai new Recipes", s.bot.user_id, quiet=0.2)
    assert any(r.startswith("New working room [Recipes]") for r in replies), replies
    second = await s.alice.wait_for_invite(_working_invite)
    assert second != s.room
    await s.alice.join(second)
    assert (await binding(s, second))["title"] == "Recipes"

    await say(s, "Suggest a dinner.", room=second)
    body = fake.bodies[-1]
    assert f"- {note}" in system_text(body)
    assert system_text(body).startswith(SYSTEM_PROMPT)
    assert turns(body) == [("user", "Suggest a dinner.")]


# ---------------------------------------------------------------------------------------------
# 4. history rebuilt from the timeline after the plugin database is lost


async def test_history_is_rebuilt_from_the_timeline_after_the_database_is_lost(
    bot_factory: BotFactory, make_user: MakeUser, fake: FakeOpenAI
) -> None:
    bot = bot_factory(bot_config(fake, streaming=True))  # its own bot: its database is wiped
    s = await onboard(bot, make_user)
    await talk_until_compacted(s)  # the history now has a summary, in the room and the cache
    answer = await finished(s, await say(s, "Also, the meeting moved to Thursday."))
    assert answer == "ok: Also, the meeting moved"
    before = fake.bodies[-1]
    assert SUMMARY_TEXT in system_text(before)
    requests_before = len(fake.bodies)

    bot.stop()
    dropped = bot.drop_plugin_tables()
    assert {"rooms", "messages", "chats"} <= set(dropped), dropped
    bot.start()

    await finished(s, await say(s, "When is the meeting?"))
    assert len(fake.bodies) == requests_before + 1, "old messages were answered again"
    after = fake.bodies[-1]
    # Everything the agent saw before the loss, rebuilt from the room: the system prompt with
    # the summary, the turns after it, then the last answer and the new question.
    assert after["messages"] == [
        *before["messages"],
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "When is the meeting?"},
    ]
    assert estimated_tokens(after) <= BUDGET


# ---------------------------------------------------------------------------------------------
# 5. export


async def test_export_uploads_a_markdown_file_with_the_turns(
    bot: StandaloneBot, make_user: MakeUser, fake: FakeOpenAI
) -> None:
    s = await onboard(bot, make_user)
    await say(s, "The capital of Iceland is Reykjavik.")
    await say(s, "It has a famous concert hall called Harpa.")

    asked = await s.alice.send_text(s.room, "!ai export")
    file_event = await s.alice.wait_for(
        s.room,
        lambda e: is_message(e, s.bot.user_id, "m.file"),
        after=asked,
    )
    content = file_event["content"]
    assert re.fullmatch(r"general-\d{8}-\d{4}\.md", content["body"]), content
    assert content["url"].startswith("mxc://")
    data, mime = await s.alice.download_media(content["url"])
    assert mime.startswith("text/markdown")
    assert content["info"]["size"] == len(data)
    text = data.decode("utf-8")
    assert text.startswith("# General\n")
    assert "- Agent: Fake GPT (`gpt`)" in text
    assert "- Messages: 4" in text
    assert f"### You ({s.alice.user_id})" in text and "### Fake GPT · " in text
    order = [
        "The capital of Iceland is Reykjavik.",
        "ok: The capital of Iceland",
        "It has a famous concert hall called Harpa.",
        "ok: It has a famous",
    ]
    positions = [text.index(turn) for turn in order]
    assert positions == sorted(positions), text
    assert "!ai export" not in text  # commands are not turns
