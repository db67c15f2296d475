"""Voice in working rooms on a real Synapse and maubot.

The user uploads real WAV bytes (devtools.audio.make_wav) to Synapse's media repository and sends
them as a voice message (`m.audio` with the MSC3245 flag); the in-process FakeOpenAI transcribes
them (the words the WAV carries), answers the transcript ("Fake model says: …"), and speaks the
answer as a WAV that the test downloads and transcribes back.
"""

from __future__ import annotations

from typing import Any

import pytest

from devtools.audio import make_wav, read_wav
from devtools.e2e import BotFactory, MakeE2EEUser, MakeUser
from devtools.fake_openai import FakeOpenAI, content_text
from devtools.matrix_user import Event, is_message
from surfaces_plugin import layout
from tests.e2e.test_context import Setup, onboard
from tests.e2e.test_encryption import encrypted_working_room
from tests.e2e.test_media import answer_to, last_user_content, notice_after

pytestmark = pytest.mark.e2e

VOICE_FLAGS = {layout.VOICE_FLAG_KEY: {}, "org.matrix.msc1767.audio": {"duration": 500}}


def bot_config(model: FakeOpenAI) -> dict[str, Any]:
    return {
        "backends": [
            {"id": "fake", "type": "openai", "base_url": model.base_url, "api_key": "sk-test",
             "timeout_s": 15, "max_retries": 0}
        ],
        "agents": [
            {"id": "talker", "name": "Talker", "backend": "fake", "model": "fake-model",
             "description": "The test's model."}
        ],
        "default_agent": "talker",
        "streaming": {"enabled": False},
        "speech": {"transcription_backend": "fake", "voice_backend": "fake"},
        "limits": {"per_user_requests_per_minute": 1000},
    }


async def send_voice(s: Setup, words: str) -> str:
    """What a client sends for a recorded voice message: real audio, uploaded, then m.audio."""
    audio = make_wav(words)
    mxc = await s.alice.upload_media(audio, "audio/wav", "voice.wav")
    content = {"msgtype": "m.audio", "body": "Voice message", "url": mxc,
               "info": {"mimetype": "audio/wav", "size": len(audio)}, **VOICE_FLAGS}
    return await s.alice.send_event(s.room, "m.room.message", content)


def transcript_of(s: Setup, audio_id: str) -> list[str]:
    """The bodies of the bot's transcript notices for one voice message."""
    shown = [layout.parse_transcript(e["content"]) for e in s.alice.messages(s.room, s.bot.user_id)]
    return [t.text for t in shown if t is not None and t.of == audio_id]


def is_voice_answer(bot_id: str) -> Any:
    return lambda e: is_message(e, bot_id) and e["content"].get("msgtype") == "m.audio"


def transcriptions(model: FakeOpenAI) -> int:
    return sum(r["path"].endswith("/audio/transcriptions") for r in model.requests)


async def test_voice_in_and_out_survive_a_restart_and_a_database_loss(
    bot_factory: BotFactory, make_user: MakeUser
) -> None:
    async with FakeOpenAI() as model:
        bot = bot_factory(bot_config(model))
        s = await onboard(bot, make_user)

        sent = await send_voice(s, "what is the tallest mountain")
        await notice_after(s, sent, "> 🎤 what is the tallest mountain")
        assert await answer_to(s, sent) == "Fake model says: what is the tallest mountain"
        assert content_text(last_user_content(model)) == "what is the tallest mountain"
        assert transcript_of(s, sent) == ["what is the tallest mountain"]

        asked = await s.alice.send_text(s.room, "!ai voice on")
        await notice_after(s, asked, "Voice answers are on")
        sent = await send_voice(s, "and the deepest lake")
        answer = await answer_to(s, sent)
        spoken: Event = await s.alice.wait_for(
            s.room, is_voice_answer(bot.user_id), timeout=30, after=sent
        )
        content = spoken["content"]
        assert content[layout.VOICE_FLAG_KEY] == {} and "file" not in content
        data, _ = await s.alice.download_media(content["url"])
        assert content["info"]["size"] == len(data) and content["info"]["mimetype"] == "audio/wav"
        assert read_wav(data).text == answer  # it speaks the answer

        bot.stop()
        sent = await send_voice(s, "sent while you were away")
        bot.start()
        answer = await answer_to(s, sent, timeout=60)
        assert answer == "Fake model says: sent while you were away"
        await s.alice.wait_for(s.room, is_voice_answer(bot.user_id), timeout=30, after=sent)
        assert transcript_of(s, sent) == ["sent while you were away"]
        heard = transcriptions(model)

        bot.stop()
        assert "messages" in bot.drop_plugin_tables()
        bot.start()
        sent = await s.alice.send_text(s.room, "What did I ask?")
        assert await answer_to(s, sent, timeout=60) == "Fake model says: What did I ask?"
        users = [m["content"] for m in model.bodies[-1]["messages"] if m["role"] == "user"]
        assert [content_text(c) for c in users] == [
            "what is the tallest mountain",
            "and the deepest lake",
            "sent while you were away",
            "What did I ask?",
        ]
        assert transcriptions(model) == heard  # rebuilt from the transcript notices
        # Voice stays on: it is in the room's binding, which survived the loss.
        await s.alice.wait_for(s.room, is_voice_answer(bot.user_id), timeout=30, after=sent)
        answers = [
            e for e in s.alice.messages(s.room, bot.user_id)
            if layout.TURN_KEY in e["content"] and "sent while you were away" in e["content"]["body"]
        ]
        assert len(answers) == 1, "answered twice"


async def test_an_encrypted_voice_message_is_answered_and_the_voice_answer_is_encrypted(
    bot_factory: BotFactory, make_e2ee_user: MakeE2EEUser
) -> None:
    async with FakeOpenAI() as model:
        bot = bot_factory(bot_config(model), encryption=True)
        alice = await make_e2ee_user()
        room = await encrypted_working_room(alice, bot)
        asked = await alice.send_text(room, "!ai voice on")
        await alice.wait_for_reply(room, bot.user_id, asked, "Voice answers are on", timeout=30)

        audio = make_wav("a secret question")
        sent = await alice.send_file(
            room, audio, "voice.wav", "audio/wav", msgtype="m.audio", extra=VOICE_FLAGS
        )
        shown = await alice.wait_for_reply(room, bot.user_id, sent, "> 🎤 a secret question", 30)
        assert shown.encrypted and shown.decrypted
        answer = await alice.wait_for_reply(
            room, bot.user_id, sent, "Fake model says: a secret question", timeout=30
        )
        assert answer.encrypted
        assert content_text(last_user_content(model)) == "a secret question"

        spoken = await alice.wait_for_message(
            room, lambda r: r.content.get("msgtype") == "m.audio" and r.sender == bot.user_id,
            timeout=30, after=sent,
        )
        assert spoken.encrypted and "file" in spoken.content and "url" not in spoken.content
        assert spoken.content[layout.VOICE_FLAG_KEY] == {}
        data = await alice.download_decrypted(spoken.content)
        assert read_wav(data).text == answer.body
