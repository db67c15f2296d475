"""Redactions on a real Synapse, with an OpenAI-compatible server recording what it received:
a message redacted while it waits is never sent, a redacted answered message leaves the next
request, and redacting a message while its answer streams cancels that answer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio

from devtools.e2e import MakeUser
from devtools.fake_openai import FakeOpenAI
from devtools.maubot_standalone import StandaloneBot
from devtools.procs import free_port
from devtools.synapse import SynapseServer
from surfaces_plugin.dispatch import REDACTED_TEXT
from tests.e2e.conftest import PLUGIN_DIR, watched
from tests.e2e.test_conversations import (
    API_KEY,
    Chat,
    answer_bodies,
    bot_config,
    command,
    final_text,
    onboard,
    say,
)

pytestmark = pytest.mark.e2e

SECRET = "my password is hunter2"
STORY = " ".join(f"word{i}" for i in range(1, 41))  # streamed slowly: others wait behind it


@pytest.fixture(scope="module")
def module_bot(
    synapse: SynapseServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[StandaloneBot, int]]:
    """One bot for the module; its `fake` backend is each test's FakeOpenAI on this port."""
    port = free_port()
    data_dir = tmp_path_factory.mktemp("redactions-bot")
    with StandaloneBot(synapse, bot_config(port), data_dir=data_dir, repo_root=PLUGIN_DIR) as bot:
        yield bot, port


@pytest.fixture
def bot(module_bot: tuple[StandaloneBot, int], request: pytest.FixtureRequest) -> StandaloneBot:
    return watched(request, module_bot[0])


@pytest_asyncio.fixture
async def fake(module_bot: tuple[StandaloneBot, int]) -> AsyncIterator[FakeOpenAI]:
    server = FakeOpenAI(port=module_bot[1], require_key=API_KEY)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def gpt_chat(bot: StandaloneBot, make_user: MakeUser) -> Chat:
    chat = await onboard(await make_user(), bot)
    await command(chat, "!ai agent gpt")
    return chat


def conversation(body: dict[str, Any]) -> list[tuple[str, str]]:
    """A request's messages after the system prompt, as (role, content)."""
    return [(m["role"], m["content"]) for m in body["messages"][1:]]


def mentions_secret(fake: FakeOpenAI) -> bool:
    return any(
        "hunter2" in str(m.get("content")) for b in answer_bodies(fake) for m in b["messages"]
    )


async def test_message_redacted_while_waiting_is_never_sent(
    bot: StandaloneBot, fake: FakeOpenAI, make_user: MakeUser
) -> None:
    chat = await gpt_chat(bot, make_user)
    fake.set_mode("normal", reply=STORY, delay_s=0.1)
    _sent, slow = await say(chat, "tell me a story")  # its answer has started streaming
    secret = await chat.user.send_text(chat.room, SECRET)
    await chat.user.redact(chat.room, secret)  # at once, while it waits behind the story
    fake.set_mode("normal")  # the answers after the story come at once
    last, after = await say(chat, "after the secret", timeout=30)

    await final_text(chat, slow, STORY)
    await final_text(chat, after, "Fake model says: after the secret")
    assert not mentions_secret(fake)
    bodies = answer_bodies(fake)
    assert len(bodies) == 2
    assert conversation(bodies[1]) == [
        ("user", "tell me a story"),
        ("assistant", STORY),
        ("user", "after the secret"),
    ]
    replies = chat.user.messages(chat.room, chat.bot, after=secret)
    assert [e["content"].get("org.surfaces.turn", {}).get("answers") for e in replies] == [
        last  # the one answer after the secret is to the message after it
    ]


async def test_redacted_answered_message_is_absent_from_the_next_request(
    bot: StandaloneBot, fake: FakeOpenAI, make_user: MakeUser
) -> None:
    chat = await gpt_chat(bot, make_user)
    secret, first = await say(chat, SECRET)
    await final_text(chat, first, f"Fake model says: {SECRET}")
    _sent, second = await say(chat, "second question")
    await final_text(chat, second, "Fake model says: second question")
    assert mentions_secret(fake)  # in the history until it is redacted

    await chat.user.redact(chat.room, secret)
    fake.reset()
    _sent, third = await say(chat, "third question")
    await final_text(chat, third, "Fake model says: third question")

    assert not mentions_secret(fake)
    [body] = answer_bodies(fake)
    # The bot's answer to the redacted message went with it (it quoted the message).
    assert conversation(body) == [
        ("user", "second question"),
        ("assistant", "Fake model says: second question"),
        ("user", "third question"),
    ]


async def test_redaction_while_the_answer_streams_cancels_it(
    bot: StandaloneBot, fake: FakeOpenAI, make_user: MakeUser
) -> None:
    chat = await gpt_chat(bot, make_user)
    fake.set_mode("normal", reply=f"About {SECRET}: {STORY}", delay_s=0.15)
    question, partial = await say(chat, SECRET)
    await chat.user.redact(chat.room, question)

    await chat.user.wait_for_text(
        chat.room, partial["event_id"], lambda t: t == REDACTED_TEXT, timeout=10
    )
    last_edit = chat.user.edits(chat.room, partial)[-1]["content"]["m.new_content"]
    assert "partial" not in last_edit["org.surfaces.turn"]
    await asyncio.wait_for(fake.disconnected.wait(), timeout=5)
    assert fake.disconnects == 1  # the provider's stream was closed, not read to its end

    fake.reset()
    _sent, nxt = await say(chat, "a new question")
    await final_text(chat, nxt, "Fake model says: a new question")
    [body] = answer_bodies(fake)
    assert conversation(body) == [("user", "a new question")]
