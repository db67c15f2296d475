"""Conversations on a real Synapse: answers from the echo backend (streamed) and from an
OpenAI-compatible server over real HTTP + SSE, provider failures, agent switching, cancel and
retry, and the API key never leaking."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio

from devtools.e2e import MakeUser
from devtools.fake_openai import FakeOpenAI
from devtools.matrix_user import Event, MatrixUser, is_message
from devtools.maubot_standalone import StandaloneBot
from devtools.procs import LogCursor, free_port
from devtools.synapse import SynapseServer
from tests.e2e.conftest import PLUGIN_DIR, watched

pytestmark = pytest.mark.e2e

API_KEY = f"sk-surfaces-e2e-{secrets.token_hex(12)}"
SYSTEM_PROMPT = "You are the e2e test model. Answer briefly."
TIMEOUT_S = 2
STORY = " ".join(f"word{i}" for i in range(1, 61))  # a long answer for cancel


def _agent(
    agent_id: str, name: str, description: str, backend: str, **extra: Any
) -> dict[str, Any]:
    return {
        "id": agent_id,
        "name": name,
        "description": description,
        "backend": backend,
        "model": "",
        "system_prompt": "You are a helpful assistant.",
        "context_tokens": 4096,
        "temperature": 0.7,
        **extra,
    }


def bot_config(fake_port: int) -> dict[str, Any]:
    return {
        "backends": [
            {
                "id": "echo",
                "type": "echo",
                "base_url": "",
                "api_key": "",
                "timeout_s": 60,
                "max_retries": 2,
            },
            {
                "id": "fake",
                "type": "openai",
                "base_url": f"http://127.0.0.1:{fake_port}/v1",
                "api_key": API_KEY,
                "timeout_s": TIMEOUT_S,
                "max_retries": 0,
            },
        ],
        "agents": [
            _agent("echo", "Echo", "Repeats what you say.", "echo"),
            _agent("writer", "Writer", "Drafts prose for you.", "echo"),
            _agent(
                "gpt",
                "Fake GPT",
                "An OpenAI-compatible model on loopback.",
                "fake",
                model="fake-model",
                system_prompt=SYSTEM_PROMPT,
                temperature=0.2,
            ),
        ],
        "default_agent": "echo",
        "streaming": {"enabled": True, "edit_interval_ms": 0},
    }


@dataclass
class Harness:
    bot: StandaloneBot
    fake_port: int


@pytest.fixture(scope="module")
def module_harness(
    synapse: SynapseServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Harness]:
    """One bot for the module; its `fake` backend points at a loopback port each test's
    FakeOpenAI listens on (tests use fresh users, so they stay independent)."""
    port = free_port()
    data_dir = tmp_path_factory.mktemp("conversations-bot")
    with StandaloneBot(synapse, bot_config(port), data_dir=data_dir, repo_root=PLUGIN_DIR) as bot:
        yield Harness(bot, port)


@pytest.fixture
def harness(module_harness: Harness, request: pytest.FixtureRequest) -> Harness:
    watched(request, module_harness.bot)
    return module_harness


@pytest_asyncio.fixture
async def fake(harness: Harness) -> AsyncIterator[FakeOpenAI]:
    """The OpenAI-compatible server, in this test's event loop (it only accepts our key)."""
    server = FakeOpenAI(port=harness.fake_port, require_key=API_KEY)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


# -- helpers -----------------------------------------------------------------------------------


def _kind(state: list[Event]) -> str | None:
    for event in state:
        if event.get("type") == "m.room.create":
            return event.get("content", {}).get("org.surfaces.kind")
    return None


@dataclass
class Chat:
    user: MatrixUser
    bot: str
    dm: str
    room: str


async def onboard(user: MatrixUser, bot: StandaloneBot) -> Chat:
    """DM the bot, `!ai start`, join the Space and the first working room."""
    dm = await user.open_dm(bot.user_id)
    await user.wait_for_notice(dm, "Hi! I'm Surfaces", sender=bot.user_id)
    await user.send_text(dm, "!ai start")
    space = await user.wait_for_invite(lambda _r, s: _kind(s) == "space", timeout=15)
    room = await user.wait_for_invite(lambda _r, s: _kind(s) == "working", timeout=15)
    await user.join(space)
    await user.join(room)
    return Chat(user, bot.user_id, dm, room)


async def say(chat: Chat, text: str, timeout: float = 15.0) -> tuple[str, Event]:
    """Send text in the working room; (its event id, the bot's first message after it)."""
    sent = await chat.user.send_text(chat.room, text)
    reply = await chat.user.wait_for(
        chat.room, lambda e: is_message(e, chat.bot), timeout=timeout, after=sent
    )
    return sent, reply


async def final_text(chat: Chat, event: Event, expected: str, timeout: float = 15.0) -> str:
    return await chat.user.wait_for_text(
        chat.room, event["event_id"], lambda t: t == expected, timeout=timeout
    )


async def command(chat: Chat, text: str, room: str | None = None) -> list[str]:
    return await chat.user.command(room or chat.room, text, chat.bot, quiet=0.4)


async def binding(chat: Chat) -> dict[str, Any]:
    content = await chat.user.get_state_event(chat.room, "org.surfaces.binding")
    assert content is not None
    return content


def answer_bodies(fake: FakeOpenAI) -> list[dict[str, Any]]:
    return [b for b in fake.bodies if isinstance(b, dict)]


def assert_key_hidden(chat: Chat, bot: StandaloneBot) -> None:
    """The API key is in no event the user can see, nowhere in the bot's log or stdout/stderr."""
    for room_id in (chat.dm, chat.room):
        for event in chat.user.events(room_id):
            assert API_KEY not in json.dumps(event), event
    assert API_KEY not in bot.log_text()
    assert API_KEY not in bot.stdout_text()


# -- tests -------------------------------------------------------------------------------------


async def test_echo_answer_is_streamed_and_marked(harness: Harness, make_user: MakeUser) -> None:
    chat = await onboard(await make_user(), harness.bot)
    text = "please repeat these fifteen words back to me one at a time so the edits show"

    _sent, answer = await say(chat, text)
    assert await final_text(chat, answer, f"echo: {text}") == f"echo: {text}"

    assert answer["content"]["msgtype"] == "m.text"
    assert chat.user.edits(chat.room, answer), "the answer was not streamed (no edits)"
    assert answer["content"]["body"] != f"echo: {text}", "the first event already had it all"
    bound = await binding(chat)
    marker = answer["content"]["org.surfaces.turn"]
    assert (marker["platform_chat_id"], marker["agent"]) == (bound["platform_chat_id"], "echo")
    # Exactly one answer (edits aside) for one message.
    await asyncio.sleep(0.3)
    assert len(chat.user.messages(chat.room, chat.bot)) == 1


async def test_agents_listing_and_switching(harness: Harness, make_user: MakeUser) -> None:
    chat = await onboard(await make_user(), harness.bot)

    (listing,) = await command(chat, "!ai agents", room=chat.dm)
    for agent_id, name, description in (
        ("echo", "Echo", "Repeats what you say."),
        ("writer", "Writer", "Drafts prose for you."),
        ("gpt", "Fake GPT", "An OpenAI-compatible model on loopback."),
    ):
        line = next((ln for ln in listing.splitlines() if f"`{agent_id}`" in ln), "")
        assert name in line and description in line, listing
    assert API_KEY not in listing and "127.0.0.1" not in listing

    before = await binding(chat)
    (switched,) = await command(chat, "!ai agent writer")
    assert "writer" in switched
    after = await binding(chat)
    assert after["agent"] == "writer"
    assert after["platform_chat_id"] == before["platform_chat_id"]  # history kept

    _sent, answer = await say(chat, "hello writer")
    await final_text(chat, answer, "echo: hello writer")
    assert answer["content"]["org.surfaces.turn"]["agent"] == "writer"

    (wrong,) = await command(chat, "!ai agent nobody")
    assert "nobody" in wrong and "`writer`" in wrong  # names the valid ones
    assert (await binding(chat))["agent"] == "writer"


async def test_openai_backend_gets_system_prompt_and_history(
    harness: Harness, fake: FakeOpenAI, make_user: MakeUser
) -> None:
    chat = await onboard(await make_user(), harness.bot)
    await command(chat, "!ai agent gpt")
    assert (await binding(chat))["agent"] == "gpt"

    _sent, first = await say(chat, "first question")
    await final_text(chat, first, "Fake model says: first question")
    assert first["content"]["org.surfaces.turn"]["agent"] == "gpt"
    _sent, second = await say(chat, "second question")
    await final_text(chat, second, "Fake model says: second question")

    bodies = answer_bodies(fake)
    assert len(bodies) == 2
    request = bodies[1]
    assert request["model"] == "fake-model"
    assert request["stream"] is True
    assert request["temperature"] == pytest.approx(0.2)
    messages = request["messages"]
    assert messages[0]["role"] == "system" and SYSTEM_PROMPT in messages[0]["content"]
    assert [(m["role"], m["content"]) for m in messages[1:]] == [
        ("user", "first question"),
        ("assistant", "Fake model says: first question"),
        ("user", "second question"),
    ]
    assert all(r["authorization"] == f"Bearer {API_KEY}" for r in fake.requests)
    assert_key_hidden(chat, harness.bot)


async def test_backend_failures_are_reported_then_recover(
    harness: Harness, fake: FakeOpenAI, make_user: MakeUser
) -> None:
    chat = await onboard(await make_user(), harness.bot)
    await command(chat, "!ai agent gpt")
    log = LogCursor(harness.bot.log_path)

    def check_notice(event: Event) -> str:
        text = chat.user.latest_text(chat.room, event)
        assert event["content"]["msgtype"] == "m.notice", text
        assert "`gpt`" in text, text
        assert "Traceback" not in text and API_KEY not in text
        return text

    # HTTP 500 (no retries configured).
    fake.set_mode("status", status=500, times=1)
    _sent, notice = await say(chat, "are you there")
    assert "HTTP 500" in check_notice(notice)
    _sent, answer = await say(chat, "now?")
    await final_text(chat, answer, "Fake model says: now?")

    # A provider that never answers: the backend's timeout.
    fake.set_mode("hang", times=1)
    _sent, notice = await say(chat, "hello hang", timeout=TIMEOUT_S + 15)
    assert f"did not answer within {TIMEOUT_S} s" in check_notice(notice)

    # The server gone entirely, then back on the same port.
    await fake.stop()
    _sent, notice = await say(chat, "anyone?")
    assert "could not be reached" in check_notice(notice)
    await fake.start()
    _sent, answer = await say(chat, "back again")
    await final_text(chat, answer, "Fake model says: back again")
    assert "Traceback" not in log.new_text()  # failures are logged as one-line warnings
    assert_key_hidden(chat, harness.bot)


async def test_cancel_marks_partial_answer_and_retry_answers_again(
    harness: Harness, fake: FakeOpenAI, make_user: MakeUser
) -> None:
    chat = await onboard(await make_user(), harness.bot)
    await command(chat, "!ai agent gpt")

    fake.set_mode("normal", reply=STORY, delay_s=0.15)
    _sent, partial = await say(chat, "tell me a long story")
    cancel_sent = await chat.user.send_text(chat.room, "!ai cancel")
    text = await chat.user.wait_for_text(
        chat.room, partial["event_id"], lambda t: t.endswith("*(cancelled)*"), timeout=10
    )
    assert text.startswith("word1") and "word60" not in text
    await asyncio.sleep(0.5)
    assert chat.user.latest_text(chat.room, partial) == text  # no edits after the cancel
    assert not [
        e
        for e in chat.user.messages(chat.room, chat.bot, after=cancel_sent)
        if "Nothing is being generated" in chat.user.latest_text(chat.room, e)
    ]

    fake.set_mode("normal", reply="A short answer this time.")
    retry_sent = await chat.user.send_text(chat.room, "!ai retry")
    again = await chat.user.wait_for(
        chat.room, lambda e: is_message(e, chat.bot, "m.text"), timeout=15, after=retry_sent
    )
    await final_text(chat, again, "A short answer this time.")
    assert again["event_id"] != partial["event_id"]

    bodies = answer_bodies(fake)
    assert len(bodies) == 2
    assert bodies[1]["messages"][-1] == {"role": "user", "content": "tell me a long story"}
    assert_key_hidden(chat, harness.bot)
