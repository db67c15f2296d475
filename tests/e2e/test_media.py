"""Images and files in working rooms on a real Synapse and maubot.

The user uploads real files to Synapse's media repository and sends them as `m.image` /
`m.file`; the bot downloads them (authenticated media), and the in-process FakeOpenAI shows
what reached the model: its default reply describes each image it decoded ("I see an image
(image/png, 75 bytes, 4x3)"), and its request log holds the text parts.
"""

from __future__ import annotations

from typing import Any

import pytest

from devtools.documents import make_pdf
from devtools.e2e import BotFactory, MakeE2EEUser, MakeUser
from devtools.fake_openai import FakeOpenAI, content_images, content_text
from devtools.images import describe_image, make_png
from devtools.matrix_user import Event, is_message
from surfaces_plugin import layout
from tests.e2e.test_context import Setup, finished, onboard
from tests.e2e.test_encryption import encrypted_working_room

pytestmark = pytest.mark.e2e

PNG = make_png(4, 3, (0, 128, 255))
SEEN = describe_image("image/png", PNG)  # what the fake says when it received this PNG
MAX_FILE_BYTES = 4000


def bot_config(model: FakeOpenAI) -> dict[str, Any]:
    agent = {"backend": "fake", "model": "fake-model", "description": "The test's model."}
    return {
        "backends": [
            {"id": "fake", "type": "openai", "base_url": model.base_url, "api_key": "sk-test",
             "timeout_s": 15, "max_retries": 0}
        ],
        "agents": [
            {**agent, "id": "seer", "name": "Seer", "vision": True},
            {**agent, "id": "plain", "name": "Plain"},
        ],
        "default_agent": "seer",
        "streaming": {"enabled": False},
        "media": {"max_file_bytes": MAX_FILE_BYTES},
        "limits": {"per_user_requests_per_minute": 1000},
    }


def is_answer(bot_id: str) -> Any:
    return lambda e: is_message(e, bot_id) and layout.TURN_KEY in e["content"]


async def answer_to(s: Setup, sent: str, timeout: float = 30) -> str:
    answer = await s.alice.wait_for(s.room, is_answer(s.bot.user_id), timeout=timeout, after=sent)
    return await finished(s, answer)


async def notice_after(s: Setup, sent: str, contains: str) -> Event:
    return await s.alice.wait_for_notice(
        s.room, contains, sender=s.bot.user_id, after=sent, timeout=30
    )


def last_user_content(model: FakeOpenAI) -> Any:
    return [m for m in model.bodies[-1]["messages"] if m["role"] == "user"][-1]["content"]


async def test_images_and_files_reach_the_agent_and_refusals_are_one_notice(
    bot_factory: BotFactory, make_user: MakeUser
) -> None:
    async with FakeOpenAI() as model:
        bot = bot_factory(bot_config(model))
        s = await onboard(bot, make_user)

        # A real PNG, uploaded to Synapse, reaches the vision agent as image input.
        sent = await s.alice.send_media(
            s.room, "m.image", PNG, "blue.png", "image/png", caption="What colour?"
        )
        answer = await answer_to(s, sent)
        assert answer == f"Fake model says: [image: blue.png]\nWhat colour? {SEEN}."
        assert content_images(last_user_content(model)) == [("image/png", PNG)]

        # A text file and a PDF reach the request as labelled text.
        notes = "Packing list:\n- tent\n- stove\n"
        sent = await s.alice.send_media(s.room, "m.file", notes.encode(), "list.txt", "text/plain")
        await answer_to(s, sent)
        assert content_text(last_user_content(model)) == (
            f"[file: list.txt, {len(notes)} characters]\n{notes}"
        )
        pdf = make_pdf(["Train leaves at 07:42 from platform 3."])
        sent = await s.alice.send_media(
            s.room, "m.file", pdf, "ticket.pdf", "application/pdf", caption="When?"
        )
        await answer_to(s, sent)
        text = "Train leaves at 07:42 from platform 3."
        assert content_text(last_user_content(model)) == (
            f"When?\n\n[file: ticket.pdf, {len(text)} characters]\n{text}"
        )

        # Too large, corrupt: one notice each, nothing sent to the model.
        requests = len(model.bodies)
        sent = await s.alice.send_media(
            s.room, "m.file", b"x" * (MAX_FILE_BYTES + 1), "huge.txt", "text/plain"
        )
        notice = await notice_after(s, sent, "I could not pass on your file `huge.txt`")
        assert (
            f"it is {MAX_FILE_BYTES + 1} bytes, over the limit of {MAX_FILE_BYTES} bytes "
            "(`media.max_file_bytes`)"
        ) in notice["content"]["body"]
        sent = await s.alice.send_media(
            s.room, "m.image", PNG[:20] + b"\x00" * 20, "broken.png", "image/png"
        )
        notice = await notice_after(s, sent, "I could not pass on your image `broken.png`")
        assert "not a readable image" in notice["content"]["body"]

        # Nothing broke: the next message is answered, and still carries the image.
        sent = await s.alice.send_text(s.room, "Still there?")
        assert await answer_to(s, sent) == "Fake model says: Still there?"
        assert len(model.bodies) == requests + 1
        users = [m["content"] for m in model.bodies[-1]["messages"] if m["role"] == "user"]
        assert content_images(users[0]) == [("image/png", PNG)]
        assert not any("huge.txt" in content_text(c) or "broken" in content_text(c) for c in users)

        # `!ai context` lists the attachments and their cost.
        sent = await s.alice.send_text(s.room, "!ai context")
        context = (await notice_after(s, sent, "Context of the next request"))["content"]["body"]
        assert "- attachments: 3" in context
        for label in ("[image: blue.png]", "[file: list.txt]", "[file: ticket.pdf]"):
            assert f"  - {label}: about " in context

        # An agent that cannot see gives the one notice naming the one that can.
        sent = await s.alice.send_text(s.room, "!ai agent plain")
        await notice_after(s, sent, "now talks to `plain`")
        requests = len(model.bodies)
        sent = await s.alice.send_media(s.room, "m.image", PNG, "again.png", "image/png")
        notice = await notice_after(s, sent, "`plain` cannot see images")
        assert "`seer`" in notice["content"]["body"]
        sent = await s.alice.send_text(s.room, "ok, text")
        assert await answer_to(s, sent) == "Fake model says: ok, text"
        assert len(model.bodies) == requests + 1
        assert all(not content_images(m["content"]) for m in model.bodies[-1]["messages"])


async def test_an_image_sent_while_down_is_answered_once_and_survives_a_database_loss(
    bot_factory: BotFactory, make_user: MakeUser
) -> None:
    async with FakeOpenAI() as model:
        bot = bot_factory(bot_config(model))
        s = await onboard(bot, make_user)
        sent = await s.alice.send_text(s.room, "hello")
        await answer_to(s, sent)

        bot.stop()
        sent = await s.alice.send_media(
            s.room, "m.image", PNG, "late.png", "image/png", caption="Sent while you slept"
        )
        bot.start()
        answer = await answer_to(s, sent, timeout=60)
        assert answer == f"Fake model says: [image: late.png]\nSent while you slept {SEEN}."

        bot.stop()
        assert "messages" in bot.drop_plugin_tables()
        bot.start()
        sent = await s.alice.send_text(s.room, "What did I send?")
        assert await answer_to(s, sent, timeout=60) == "Fake model says: What did I send?"
        users = [m["content"] for m in model.bodies[-1]["messages"] if m["role"] == "user"]
        assert [content_text(c) for c in users] == [
            "hello", "[image: late.png]\nSent while you slept", "What did I send?"
        ]
        assert content_images(users[1]) == [("image/png", PNG)]  # rebuilt from the timeline
        answers = [e for e in s.alice.messages(s.room, bot.user_id) if is_answer(bot.user_id)(e)]
        assert sum(SEEN in a["content"]["body"] for a in answers) == 1, "answered twice"


async def test_an_encrypted_image_is_decrypted_and_answered(
    bot_factory: BotFactory, make_e2ee_user: MakeE2EEUser
) -> None:
    async with FakeOpenAI() as model:
        bot = bot_factory(bot_config(model), encryption=True)
        alice = await make_e2ee_user()
        room = await encrypted_working_room(alice, bot)
        sent = await alice.send_file(room, PNG, "secret.png", "image/png", msgtype="m.image")
        answer = await alice.wait_for_reply(room, bot.user_id, sent, SEEN, timeout=30)
        assert answer.encrypted and answer.decrypted
        assert content_images(last_user_content(model)) == [("image/png", PNG)]
