# ruff: noqa: F811  (the fixtures imported from gpt_bot are test parameters here)
"""Edit to regenerate and reactions on a real Synapse, with an OpenAI-compatible server that
records what it was asked: editing the last message replaces its answer in place, editing an
older one is explained once, 🔁 regenerates an answer, ⏹️ stops a streaming one, and other
users' reactions change nothing."""

from __future__ import annotations

from typing import Any

import pytest

from devtools.e2e import MakeUser
from devtools.fake_openai import FakeOpenAI
from devtools.matrix_user import is_message
from devtools.maubot_standalone import StandaloneBot
from surfaces_plugin import layout
from surfaces_plugin.dispatch import EDITS_EXPLAINED
from tests.e2e.gpt_bot import bot, conversation, fake, gpt_chat, module_bot  # noqa: F401
from tests.e2e.test_conversations import (
    Chat,
    answer_bodies,
    final_text,
    say,
)

pytestmark = pytest.mark.e2e

STORY = " ".join(f"word{i}" for i in range(1, 41))  # streamed slowly, so it can be stopped


def answers_after(chat: Chat, event_id: str) -> list[dict[str, Any]]:
    """The bot's answer events (not edits, not notices) after `event_id`."""
    return [
        e for e in chat.user.messages(chat.room, chat.bot, after=event_id)
        if layout.TURN_KEY in e["content"]
    ]


def notices(chat: Chat, text: str) -> list[dict[str, Any]]:
    return [
        e for e in chat.user.messages(chat.room, chat.bot)
        if e["content"].get("msgtype") == "m.notice" and e["content"].get("body") == text
    ]


async def next_answer(chat: Chat, text: str) -> tuple[str, dict[str, Any]]:
    """Send `text` and wait for its answer's final text (the default reply)."""
    sent, answer = await say(chat, text)
    await final_text(chat, answer, f"Fake model says: {text}")
    return sent, answer


async def test_editing_the_last_message_replaces_its_answer(
    bot: StandaloneBot, fake: FakeOpenAI, make_user: MakeUser
) -> None:
    chat = await gpt_chat(bot, make_user)
    question, answer = await next_answer(chat, "what is two plus two")
    await chat.user.edit_text(chat.room, question, "what is three plus three")

    await final_text(chat, answer, "Fake model says: what is three plus three")
    bodies = answer_bodies(fake)
    assert conversation(bodies[-1]) == [("user", "what is three plus three")]
    # The conversation goes on from the edited turn; the positive signal for "one answer".
    sent, _ = await next_answer(chat, "and then?")
    assert conversation(answer_bodies(fake)[-1]) == [
        ("user", "what is three plus three"),
        ("assistant", "Fake model says: what is three plus three"),
        ("user", "and then?"),
    ]
    [only, after] = answers_after(chat, question)  # the edited answer, then the next one
    assert only["event_id"] == answer["event_id"]
    assert after["content"][layout.TURN_KEY]["answers"] == sent
    assert len(answer_bodies(fake)) == 3


async def test_editing_an_older_message_is_explained_once(
    bot: StandaloneBot, fake: FakeOpenAI, make_user: MakeUser
) -> None:
    chat = await gpt_chat(bot, make_user)
    first, first_answer = await next_answer(chat, "first question")
    await next_answer(chat, "second question")
    edit = await chat.user.edit_text(chat.room, first, "first question, reworded")
    await chat.user.wait_for(
        chat.room,
        lambda e: is_message(e, chat.bot, "m.notice") and e["content"]["body"] == EDITS_EXPLAINED,
        after=edit,
    )
    await chat.user.edit_text(chat.room, first, "first question, reworded again")
    await next_answer(chat, "third question")

    assert len(notices(chat, EDITS_EXPLAINED)) == 1
    assert chat.user.latest_text(chat.room, first_answer) == "Fake model says: first question"
    assert [conversation(b)[-1][1] for b in answer_bodies(fake)] == [
        "first question", "second question", "third question",
    ]


async def test_retry_reaction_regenerates_and_stop_reaction_cancels(
    bot: StandaloneBot, fake: FakeOpenAI, make_user: MakeUser
) -> None:
    chat = await gpt_chat(bot, make_user)
    question, answer = await next_answer(chat, "tell me a joke")
    fake.set_mode("normal", reply="Another joke, freshly made.")
    await chat.user.react(chat.room, answer["event_id"], "🔁")
    await final_text(chat, answer, "Another joke, freshly made.")
    assert conversation(answer_bodies(fake)[-1]) == [("user", "tell me a joke")]

    fake.set_mode("normal", reply=STORY, delay_s=0.15)
    _sent, streaming = await say(chat, "now a long story")
    await chat.user.react(chat.room, streaming["event_id"], "⏹️")
    stopped = await chat.user.wait_for_text(
        chat.room, streaming["event_id"], lambda t: t.endswith("*(cancelled)*"), timeout=15
    )
    assert stopped.startswith("word1") and not stopped.startswith(STORY)
    fake.set_mode("normal")
    await next_answer(chat, "still there?")
    assert len(answers_after(chat, question)) == 3  # the joke (regenerated), the story, this


async def test_other_users_reactions_are_ignored(
    bot: StandaloneBot, fake: FakeOpenAI, make_user: MakeUser
) -> None:
    chat = await gpt_chat(bot, make_user)
    bob = await make_user()
    await chat.user.invite(chat.room, bob.user_id)
    await bob.join(chat.room)
    await chat.user.wait_for_membership(chat.room, bob.user_id, "join")

    fake.set_mode("normal", reply=STORY, delay_s=0.05)
    question, story = await say(chat, "a story please")
    await bob.wait_for(chat.room, lambda e: e.get("event_id") == story["event_id"])
    for key in ("⏹️", "❌", "🔁"):
        await bob.react(chat.room, story["event_id"], key)
    await final_text(chat, story, STORY, timeout=30)  # not stopped, not regenerated
    fake.set_mode("normal")
    await next_answer(chat, "and now?")

    assert len(answer_bodies(fake)) == 2
    assert chat.user.latest_text(chat.room, story) == STORY
    said = chat.user.messages(chat.room, chat.bot, after=question)
    assert [e["content"].get("msgtype") for e in said] == ["m.text", "m.text"]  # no notices
