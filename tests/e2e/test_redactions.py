# ruff: noqa: F811  (the fixtures imported from gpt_bot are test parameters here)
"""Redactions on a real Synapse, with an OpenAI-compatible server recording what it received:
a message redacted while it waits is never sent, a redacted answered message leaves the next
request, and redacting a message while its answer streams cancels that answer."""

from __future__ import annotations

import asyncio

import pytest

from devtools.e2e import MakeUser
from devtools.fake_openai import FakeOpenAI
from devtools.maubot_standalone import StandaloneBot
from surfaces_plugin.dispatch import REDACTED_TEXT
from tests.e2e.gpt_bot import bot, conversation, fake, gpt_chat, module_bot  # noqa: F401
from tests.e2e.test_conversations import (
    answer_bodies,
    final_text,
    say,
)

pytestmark = pytest.mark.e2e

SECRET = "my password is hunter2"
STORY = " ".join(f"word{i}" for i in range(1, 41))  # streamed slowly: others wait behind it


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
