"""The speech client (speech to text, text to speech) against the real local fake OpenAI server,
the registry's speech clients, and the devtools that make real audio and image bytes."""

from __future__ import annotations

import io
import logging
import socket
import struct
import wave
import zlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from devtools.audio import make_wav, read_wav, transcribe_wav
from devtools.fake_openai import FakeOpenAI
from devtools.images import make_png, png_size
from surfaces_plugin.backends import BackendError, BackendRegistry, ErrorKind, Speech
from surfaces_plugin.backends.speech import SPEECH_FORMAT, upload_name
from surfaces_plugin.config import BackendSpec, parse_settings

KEY = "sk-test-SECRET-0123456789abcdef"


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as server:
        yield server


@pytest_asyncio.fixture
async def speech(fake: FakeOpenAI) -> AsyncIterator[Speech]:
    client = make(fake.base_url)
    yield client
    await client.close()


def make(base_url: str, *, key: str = KEY, timeout_s: float = 5, max_retries: int = 2) -> Speech:
    spec = BackendSpec(
        id="voice",
        type="openai",
        base_url=base_url,
        api_key=key,
        timeout_s=timeout_s,
        max_retries=max_retries,
    )
    return Speech(spec, backoff_base_s=0.01)


def audio_requests(fake: FakeOpenAI, endpoint: str) -> list[dict[str, Any]]:
    return [r for r in fake.requests if r["path"].endswith(endpoint)]


async def failure(client: Speech, call: str) -> BackendError:
    with pytest.raises(BackendError) as caught:
        if call == "transcribe":
            await client.transcribe(make_wav("hello"), "audio/wav", "hello.wav", "whisper-1")
        else:
            await client.speak("Hello there", "tts-1", "alloy")
    error = caught.value
    key = client.spec.api_key
    assert not key or (key not in str(error) and key not in error.user_message("voice"))
    return error


# ---- speech to text


async def test_transcribes_real_wav_audio(speech: Speech, fake: FakeOpenAI) -> None:
    audio = make_wav("turn on the kitchen lights", seconds=0.4)
    text = await speech.transcribe(audio, "audio/wav", "note.wav", "whisper-1")
    assert text == "turn on the kitchen lights"
    [sent] = audio_requests(fake, "/audio/transcriptions")
    assert sent["authorization"] == f"Bearer {KEY}"
    assert sent["body"] == {
        "model": "whisper-1",
        "response_format": "json",
        "language": None,
        "filename": "audio.wav",
        "content_type": "audio/wav",
        "bytes": len(audio),
    }


async def test_a_wordless_tone_is_heard_as_its_frequency(speech: Speech) -> None:
    text = await speech.transcribe(make_wav(frequency=660), "audio/wav", "tone.wav", "whisper-1")
    assert text == "a tone of 660 hertz"


async def test_a_name_without_extension_gets_one_from_the_type(
    speech: Speech, fake: FakeOpenAI
) -> None:
    # The API decides the format by the file name; Matrix bodies often have none.
    text = await speech.transcribe(make_wav("hi"), "audio/x-wav", "Voice message", "whisper-1")
    assert text == "hi"
    assert audio_requests(fake, "/audio/transcriptions")[0]["body"]["filename"] == "audio.wav"


def test_upload_names() -> None:
    assert upload_name("memo.OGG", "audio/ogg") == "audio.ogg"
    assert upload_name("Voice message", "audio/ogg; codecs=opus") == "audio.ogg"
    assert upload_name("recording.bin", "audio/mpeg") == "audio.mp3"
    assert upload_name("", "audio/webm") == "audio.webm"
    assert upload_name("x", "application/octet-stream") == "audio.ogg"


async def test_audio_the_server_cannot_read_is_a_bad_request(speech: Speech) -> None:
    with pytest.raises(BackendError) as caught:
        await speech.transcribe(b"OggS" + bytes(200), "audio/ogg", "v.ogg", "whisper-1")
    assert caught.value.kind is ErrorKind.BAD_REQUEST and caught.value.status == 400
    assert "corrupted or unsupported" in caught.value.detail


async def test_an_unreadable_answer_is_malformed(speech: Speech, fake: FakeOpenAI) -> None:
    fake.set_mode("malformed")
    error = await failure(speech, "transcribe")
    assert error.kind is ErrorKind.MALFORMED
    fake.set_mode("wrong_type")
    assert (await failure(speech, "transcribe")).kind is ErrorKind.MALFORMED


# ---- text to speech


async def test_speaks_and_the_type_comes_from_the_answer(speech: Speech, fake: FakeOpenAI) -> None:
    spoken = await speech.speak("The lights are on.", "tts-1", "nova")
    # Opus was asked for; this server sends WAV and says so, and the client believes the server.
    assert spoken.mime == "audio/wav"
    assert read_wav(spoken.data).seconds > 0
    [sent] = audio_requests(fake, "/audio/speech")
    assert sent["body"] == {
        "model": "tts-1",
        "input": "The lights are on.",
        "voice": "nova",
        "response_format": SPEECH_FORMAT,
    }
    assert sent["authorization"] == f"Bearer {KEY}"


async def test_what_is_spoken_transcribes_back(speech: Speech) -> None:
    spoken = await speech.speak("Round trip works.", "tts-1", "alloy")
    heard = await speech.transcribe(spoken.data, spoken.mime, "answer", "whisper-1")
    assert heard == "Round trip works."


async def test_text_longer_than_the_api_takes_is_a_bad_request(speech: Speech) -> None:
    with pytest.raises(BackendError) as caught:
        await speech.speak("word " * 1000, "tts-1", "alloy")
    assert caught.value.kind is ErrorKind.BAD_REQUEST and "maximum length" in caught.value.detail


async def test_an_answer_that_is_not_audio_is_malformed(speech: Speech, fake: FakeOpenAI) -> None:
    fake.set_mode("wrong_type")
    error = await failure(speech, "speak")
    assert error.kind is ErrorKind.MALFORMED and "text/html" in error.detail


# ---- errors, retries, the key


@pytest.mark.parametrize("call", ["transcribe", "speak"])
async def test_a_wrong_key_is_auth_and_never_repeated(call: str) -> None:
    async with FakeOpenAI(require_key="sk-the-right-key-000000") as server:
        client = make(server.base_url, key="local-gateway-token-31337")  # no sk- to spot
        try:
            error = await failure(client, call)  # the fake echoes the wrong key back
        finally:
            await client.close()
    assert error.kind is ErrorKind.AUTH and error.status == 401
    assert "Incorrect API key" in error.detail and "***" in error.detail


@pytest.mark.parametrize("call", ["transcribe", "speak"])
async def test_rate_limits_are_retried_then_answered(
    speech: Speech, fake: FakeOpenAI, call: str
) -> None:
    fake.set_mode("rate_limit", retry_after="0", times=2)
    if call == "transcribe":
        assert await speech.transcribe(make_wav("again"), "audio/wav", "a.wav", "w") == "again"
    else:
        assert (await speech.speak("again", "tts-1", "alloy")).data
    assert len(fake.requests) == 3  # two refusals, then the answer


async def test_server_errors_end_after_the_retries(speech: Speech, fake: FakeOpenAI) -> None:
    fake.set_mode("status", status=503, message="busy")
    error = await failure(speech, "speak")
    assert error.kind is ErrorKind.SERVER and error.status == 503
    assert len(fake.requests) == 3  # max_retries 2


async def test_a_silent_server_times_out(fake: FakeOpenAI) -> None:
    client = make(fake.base_url, timeout_s=0.3, max_retries=0)
    fake.set_mode("hang")
    try:
        error = await failure(client, "transcribe")
    finally:
        await client.close()
    assert error.kind is ErrorKind.TIMEOUT
    await fake.disconnected.wait()  # the client hung up rather than leaving it waiting


async def test_nothing_listening_is_unreachable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # free, and nothing will listen on it
    client = make(f"http://127.0.0.1:{port}/v1", max_retries=0)
    try:
        assert (await failure(client, "speak")).kind is ErrorKind.UNREACHABLE
    finally:
        await client.close()


async def test_no_key_sends_no_authorization(fake: FakeOpenAI) -> None:
    client = make(fake.base_url, key="")
    try:
        await client.speak("hi", "tts-1", "alloy")
    finally:
        await client.close()
    assert fake.requests[0]["authorization"] is None


# ---- the registry's speech clients


def settings(base_url: str) -> Any:
    return parse_settings(
        {
            "backends": [
                {"id": "local", "type": "openai", "base_url": base_url},
                {"id": "claude", "type": "anthropic", "api_key": "k"},
            ],
            "agents": [{"id": "a", "backend": "local", "model": "m"}],
            "default_agent": "a",
        }
    )


async def test_the_registry_makes_one_speech_client_per_backend_and_follows_config() -> None:
    async with FakeOpenAI() as first, FakeOpenAI() as second:
        registry = BackendRegistry(settings(first.base_url), logging.getLogger("test"))
        try:
            client = registry.speech("local")
            assert registry.speech("local") is client
            assert await client.transcribe(make_wav("one"), "audio/wav", "a.wav", "w") == "one"
            registry.apply(settings(second.base_url))
            moved = registry.speech("local")
            assert moved is not client
            assert await moved.transcribe(make_wav("two"), "audio/wav", "a.wav", "w") == "two"
            assert len(first.requests) == 1 and len(second.requests) == 1
            with pytest.raises(KeyError):
                registry.speech("nowhere")
            with pytest.raises(ValueError, match="no speech"):
                registry.speech("claude")
        finally:
            await registry.close()


# ---- the devtools' audio and images are real files


def test_make_wav_is_a_real_wav() -> None:
    data = make_wav("words", frequency=300, seconds=0.25, rate=8000)
    with wave.open(io.BytesIO(data)) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 8000)
        assert wav.getnframes() == 2000
    assert struct.unpack("<I", data[4:8])[0] == len(data) - 8  # the RIFF size covers the text
    info = read_wav(data)
    assert (info.text, round(info.frequency)) == ("words", 300)
    assert transcribe_wav(data) == "words"
    with pytest.raises(ValueError):
        read_wav(data[:30])


def test_make_png_is_a_real_png() -> None:
    data = make_png(3, 2, (1, 2, 3))
    assert png_size(data) == (3, 2)
    # The pixels, decoded the way any PNG reader does: IDAT inflated, one filter byte a row.
    idat_length = struct.unpack(">I", data[33:37])[0]
    assert data[37:41] == b"IDAT"
    rows = zlib.decompress(data[41 : 41 + idat_length])
    assert rows == (b"\x00" + bytes([1, 2, 3]) * 3) * 2
    assert data.endswith(b"IEND\xaeB`\x82")  # the standard IEND chunk with its CRC
