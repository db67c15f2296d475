"""Voice in working rooms: voice messages transcribed, shown and answered; spoken answers.

Speech goes to the real local fake OpenAI server (devtools/fake_openai.py): it transcribes the
WAV files devtools.audio makes (the words they carry) and speaks WAVs that transcribe back to
their input. The agent is a recording backend, so a test reads exactly what a request carried.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest_asyncio

from devtools.audio import make_wav, read_wav
from devtools.fake_openai import FakeOpenAI
from surfaces_plugin import layout
from surfaces_plugin.backends import Chunk
from surfaces_plugin.backends.speech import MAX_SPEECH_CHARS
from surfaces_plugin.voice import NO_TRANSCRIPTION

from .conftest import BASE_CONFIG
from .test_context import ALICE, RecordingBackend, forget_messages, pcid


@pytest_asyncio.fixture
async def speech_server() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as server:
        yield server


def speech_config(server: FakeOpenAI | None, *, transcribe: bool = True, speak: bool = True,
                  **extra: Any) -> dict[str, Any]:
    [echo] = BASE_CONFIG["backends"]
    config: dict[str, Any] = {"streaming": {"enabled": False}, **extra}
    if server is not None:
        speech = {**echo, "id": "speech", "type": "openai", "base_url": server.base_url,
                  "api_key": "sk-voice-test", "timeout_s": 5, "max_retries": 0}
        config["backends"] = [echo, speech]
        config["speech"] = {"transcription_backend": "speech" if transcribe else "",
                            "voice_backend": "speech" if speak else ""}
    return config


async def voice_room(make_surfaces, server: FakeOpenAI | None, client=None, **options: Any):
    h = await make_surfaces(client, **speech_config(server, **options))
    if client is None:
        await h.say(h.dm(ALICE), ALICE, "!ai start")
    [room] = h.app.rooms.all_rooms()
    backend = RecordingBackend(h.app.settings.backends["echo"])
    h.app.backends.put(backend)
    return h, room.room_id, backend


def voice_content(mxc: str, size: int, mime: str = "audio/wav") -> dict[str, Any]:
    """What a client sends for a recorded voice message (MSC3245)."""
    return {"msgtype": "m.audio", "body": "Voice message", "url": mxc,
            "info": {"mimetype": mime, "size": size, "duration": 500},
            "org.matrix.msc1767.audio": {"duration": 500}, layout.VOICE_FLAG_KEY: {}}


async def post_voice(h, room: str, words: str, *, data: bytes | None = None, live: bool = True,
                     mime: str = "audio/wav") -> str:
    """Upload a voice message saying `words` and send it; returns its event id."""
    audio = make_wav(words) if data is None else data
    mxc = await h.client.upload_media(audio, mime_type=mime, filename="voice.wav")
    event = h.client.media_message(room, ALICE, voice_content(mxc, len(audio), mime))
    if live:
        await h.app.on_message(event)
        await h.settle()
    return str(event.event_id)


def transcriptions(server: FakeOpenAI) -> list[dict[str, Any]]:
    return [r["body"] for r in server.requests if r["path"].endswith("/audio/transcriptions")]


def shown_transcripts(h, room: str) -> list[layout.Transcript]:
    found = [layout.parse_transcript(e["content"]) for e in h.client.messages(room)]
    return [t for t in found if t is not None]


def voice_answers(h, room: str) -> list[dict[str, Any]]:
    return [e["content"] for e in h.client.messages(room) if e["content"].get("msgtype") == "m.audio"]


# voice in


async def test_a_voice_message_is_transcribed_shown_and_answered(make_surfaces, speech_server) -> None:
    h, room, backend = await voice_room(make_surfaces, speech_server)
    audio_id = await post_voice(h, room, "what is the capital of France")

    transcript_notice, answer = h.client.bodies(room)[-2:]
    assert transcript_notice == "> 🎤 what is the capital of France"
    assert shown_transcripts(h, room) == [layout.Transcript(audio_id, "what is the capital of France")]
    assert backend.requests[-1].messages[-1].content == "what is the capital of France"
    assert answer == f"re: {'what is the capital of France'[:20]}".strip()  # RecordingBackend
    [asked] = transcriptions(speech_server)
    assert asked["model"] == "whisper-1" and asked["filename"] == "audio.wav"
    [stored] = [m for m in await h.app.stores.messages.history(pcid(h, room)) if m.role == "user"]
    assert stored.content == "what is the capital of France"
    assert stored.attachment is not None and stored.attachment.kind == "audio"

    await h.say(room, ALICE, "!ai retry")  # the stored transcript is answered again, not re-heard
    assert backend.requests[-1].messages[-1].content == "what is the capital of France"
    assert len(transcriptions(speech_server)) == 1


async def test_without_a_transcription_backend_one_notice_says_which_setting(make_surfaces) -> None:
    h, room, backend = await voice_room(make_surfaces, None)
    before = len(h.client.bodies(room))
    await post_voice(h, room, "hello there")
    assert h.client.bodies(room)[before:] == [NO_TRANSCRIPTION]
    assert "`speech.transcription_backend`" in NO_TRANSCRIPTION
    assert backend.requests == []
    await h.say(room, ALICE, "typed instead")
    assert h.last_reply(room) == "re: typed instead"


async def test_a_failed_transcription_is_one_voice_notice_and_the_next_message_works(
    make_surfaces, speech_server
) -> None:
    h, room, backend = await voice_room(make_surfaces, speech_server)
    before = len(h.client.bodies(room))
    await post_voice(h, room, "", data=b"OggS not really audio", mime="audio/ogg")
    [notice] = h.client.bodies(room)[before:]
    assert notice.startswith("I could not transcribe your voice message: the speech service refused")
    assert "corrupted" in notice and "Nothing was sent to the agent" in notice
    assert "The agent" not in notice and "sk-voice-test" not in notice
    assert backend.requests == [] and shown_transcripts(h, room) == []

    speech_server.set_mode("status", status=401, times=1)
    await post_voice(h, room, "second try")
    assert "refused the bot's key (HTTP 401)" in h.last_reply(room)
    assert "`api_key` of backend `speech`" in h.last_reply(room)

    await post_voice(h, room, "third time lucky")
    assert h.client.bodies(room)[-2:] == ["> 🎤 third time lucky", "re: third time lucky"]


async def test_a_voice_message_over_the_size_limit_is_not_sent_anywhere(
    make_surfaces, speech_server
) -> None:
    h, room, backend = await voice_room(make_surfaces, speech_server, media={"max_audio_bytes": 1000})
    await post_voice(h, room, "a long speech")
    assert "`media.max_audio_bytes`" in h.last_reply(room)
    assert h.last_reply(room).startswith("I could not transcribe your voice message: it is ")
    assert transcriptions(speech_server) == [] and backend.requests == []


# durable: rebuild and catch-up


async def test_the_rebuilt_history_has_the_transcript(make_surfaces, speech_server) -> None:
    h, room, _ = await voice_room(make_surfaces, speech_server)
    await post_voice(h, room, "remember the blue door")
    chat_id = pcid(h, room)
    await forget_messages(h, chat_id)
    await h.app.stop()

    h2, _, backend2 = await voice_room(make_surfaces, speech_server, client=h.client)
    await h2.say(room, ALICE, "What did I say?")
    turns = backend2.turns()
    assert turns[0] == ("user", "remember the blue door")
    assert turns[-1] == ("user", "What did I say?")
    stored = await h2.app.stores.messages.history(chat_id)
    assert stored[0].attachment is not None and stored[0].attachment.kind == "audio"
    assert len(transcriptions(speech_server)) == 1  # read back, not heard again


async def test_a_voice_message_sent_while_the_bot_was_down_is_answered_once(
    make_surfaces, speech_server
) -> None:
    h, room, _ = await voice_room(make_surfaces, speech_server)
    await h.say(room, ALICE, "hello")
    await h.app.stop()
    await post_voice(h, room, "are you back", live=False)

    h2, _, _ = await voice_room(make_surfaces, speech_server, client=h.client)
    # Caught up by the real echo backend (catch-up runs at start, before a test can swap it).
    assert h.client.bodies(room)[-2:] == ["> 🎤 are you back", "echo: are you back"]
    await h2.app.stop()
    await voice_room(make_surfaces, speech_server, client=h.client)
    assert [b for b in h.client.bodies(room) if "are you back" in b] == [
        "> 🎤 are you back", "echo: are you back"
    ]
    assert len(transcriptions(speech_server)) == 1


async def test_a_transcript_shown_before_a_crash_is_used_not_heard_again(
    make_surfaces, speech_server
) -> None:
    h, room, _ = await voice_room(make_surfaces, speech_server)
    await h.app.stop()
    audio_id = await post_voice(h, room, "what the audio says", live=False)
    # The bot had shown this transcript, then died before answering.
    shown = {"msgtype": "m.notice", "body": layout.transcript_notice_text("what was shown"),
             **layout.transcript_marker(audio_id)}
    await h.client.send_message_event(room, "m.room.message", shown)

    await voice_room(make_surfaces, speech_server, client=h.client)
    assert h.last_reply(room) == "echo: what was shown"
    assert transcriptions(speech_server) == []
    assert len(shown_transcripts(h, room)) == 1


# voice out


async def test_voice_answers_are_switched_in_the_binding_and_refused_without_a_backend(
    make_surfaces, speech_server
) -> None:
    h, room, _ = await voice_room(make_surfaces, speech_server, speak=False)
    await h.say(room, ALICE, "!ai voice")
    assert "Voice answers are off in this room" in h.last_reply(room)
    await h.say(room, ALICE, "!ai voice on")
    assert "`speech.voice_backend`" in h.last_reply(room)
    assert not h.app.rooms.room(room).voice
    await h.say(room, ALICE, "!ai voice loud")
    assert "neither `on` nor `off`" in h.last_reply(room)
    await h.app.stop()

    h2, _, _ = await voice_room(make_surfaces, speech_server, client=h.client)
    await h2.say(room, ALICE, "!ai voice on")
    assert h2.last_reply(room).startswith("Voice answers are on")
    state = h.client.rooms[room].state[(layout.BINDING_TYPE, "")][1]
    assert state["voice"] is True
    stored = await h2.app.stores.rooms.get(room)
    assert stored is not None and stored.binding is not None and stored.binding.voice is True
    await h2.say(room, ALICE, "!ai voice")
    assert "Voice answers are on: answers also come as voice messages" in h2.last_reply(room)
    await h2.say(room, ALICE, "!ai voice off")
    assert h.client.rooms[room].state[(layout.BINDING_TYPE, "")][1]["voice"] is False


async def test_with_voice_on_the_answer_also_comes_as_a_voice_message(
    make_surfaces, speech_server
) -> None:
    h, room, _ = await voice_room(make_surfaces, speech_server)
    await h.say(room, ALICE, "!ai voice on")
    await post_voice(h, room, "say something")

    assert h.client.bodies(room)[-3:] == ["> 🎤 say something", "re: say something", "Voice answer"]
    [spoken] = voice_answers(h, room)
    assert spoken[layout.VOICE_FLAG_KEY] == {} and "file" not in spoken
    assert spoken["info"]["mimetype"] == "audio/wav"
    data = h.client.media[spoken["url"]][0]
    assert spoken["info"]["size"] == len(data)
    assert spoken["info"]["duration"] == 300  # the fake speaks 0.3 s
    assert read_wav(data).text == "re: say something"
    [asked] = [r["body"] for r in speech_server.requests if r["path"].endswith("/audio/speech")]
    assert asked == {"model": "tts-1", "input": "re: say something", "voice": "alloy",
                     "response_format": "opus"}

    await h.say(room, ALICE, "!ai voice off")
    await h.say(room, ALICE, "quietly")
    assert h.last_reply(room) == "re: quietly" and len(voice_answers(h, room)) == 1


async def test_a_long_answer_speaks_its_first_part_and_says_so(make_surfaces, speech_server) -> None:
    h, room, backend = await voice_room(make_surfaces, speech_server)
    long_answer = "This is one sentence of the answer. " * 200
    backend.stream = lambda request: _say(long_answer)  # type: ignore[method-assign]
    await h.say(room, ALICE, "!ai voice on")
    await h.say(room, ALICE, "tell me everything")
    [spoken] = voice_answers(h, room)
    heard = read_wav(h.client.media[spoken["url"]][0]).text
    assert len(heard) <= MAX_SPEECH_CHARS and long_answer.strip().startswith(heard)
    assert heard.endswith("answer.")
    assert spoken["body"] == (f"Voice answer (only the first {len(heard):,} of "
                              f"{len(long_answer.strip()):,} characters are spoken; the rest is "
                              "in the text answer)")


async def test_a_failed_voice_answer_is_one_notice_and_the_text_stands(
    make_surfaces, speech_server
) -> None:
    h, room, _ = await voice_room(make_surfaces, speech_server)
    await h.say(room, ALICE, "!ai voice on")
    speech_server.set_mode("rate_limit", times=1)
    before = len(h.client.bodies(room))
    await h.say(room, ALICE, "hello")
    assert h.client.bodies(room)[before:] == [
        "re: hello",
        "I could not send this answer as a voice message: the speech service is busy (rate "
        "limited) right now. The text answer above stands.",
    ]
    await h.say(room, ALICE, "again")
    assert h.client.bodies(room)[-2:] == ["re: again", "Voice answer"]


async def _say(text: str) -> AsyncIterator[Chunk]:
    yield Chunk(text)
