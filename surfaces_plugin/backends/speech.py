"""Speech through an OpenAI-compatible backend: `/audio/transcriptions` (speech to text, which
OpenAI and local servers such as faster-whisper-server, speaches or LocalAI offer) and
`/audio/speech` (text to speech). Errors are BackendErrors like a generation's, key redacted."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import aiohttp

from .base import ErrorKind
from .http import HttpClient

# The longest text /audio/speech takes in one request (OpenAI's limit; longer is a 400).
MAX_SPEECH_CHARS = 4096
# A spoken answer larger than this is not a voice message anyone wants; refuse, don't buffer.
MAX_SPOKEN_BYTES = 25_000_000
SPEECH_FORMAT = "opus"  # Ogg/Opus: what Matrix clients record and play as voice messages
_SPEECH_FORMAT_TYPE = "audio/ogg"  # assumed when the server does not say what it sent
# File name extensions the transcription API recognises, by MIME type: it goes by the name.
_EXTENSIONS = {
    "audio/ogg": "ogg",
    "audio/opus": "ogg",
    "audio/mpeg": "mp3",
    "audio/mp3": "mp3",
    "audio/mp4": "m4a",
    "audio/x-m4a": "m4a",
    "audio/aac": "m4a",
    "audio/wav": "wav",
    "audio/wave": "wav",
    "audio/x-wav": "wav",
    "audio/webm": "webm",
    "audio/flac": "flac",
    "audio/x-flac": "flac",
}
_KNOWN_EXTENSIONS = frozenset(_EXTENSIONS.values()) | {"mp4", "mpeg", "mpga", "oga"}


@dataclass(frozen=True)
class SpokenAudio:
    data: bytes = field(repr=False)
    mime: str


def upload_name(filename: str, mime: str) -> str:
    """A file name the transcription API accepts: its extension says the format (Matrix
    bodies are often "Voice message" or a name without one)."""
    _, dot, extension = filename.rpartition(".")
    if dot and extension.lower() in _KNOWN_EXTENSIONS:
        return filename
    base = filename if filename.strip() else "audio"
    return f"{base}.{_EXTENSIONS.get(mime.split(';')[0].strip().lower(), 'ogg')}"


class Speech(HttpClient):
    """Speech to text and text to speech of one `openai` backend spec."""

    @property
    def base_url(self) -> str:
        return self.spec.base_url.rstrip("/")

    async def transcribe(self, audio: bytes, mime: str, filename: str, model: str) -> str:
        """The words spoken in `audio`."""
        name = upload_name(filename, mime)

        def form() -> aiohttp.FormData:  # afresh for each attempt: a form is sent only once
            data = aiohttp.FormData()
            data.add_field("file", audio, filename=name, content_type=mime)
            data.add_field("model", model)
            data.add_field("response_format", "json")
            return data

        url = f"{self.base_url}/audio/transcriptions"
        answer = await self._call(
            lambda: self._post(url, form=form(), accept="application/json"), self._json_object
        )
        text = answer.get("text")
        if not isinstance(text, str):
            raise self._error(ErrorKind.MALFORMED, "the transcription has no text")
        return text.strip()

    async def speak(self, text: str, model: str, voice: str) -> SpokenAudio:
        """`text` spoken by `voice`, as Ogg/Opus unless the server sends something else (the
        MIME type says which)."""
        body: dict[str, Any] = {
            "model": model,
            "input": text,
            "voice": voice,
            "response_format": SPEECH_FORMAT,
        }
        url = f"{self.base_url}/audio/speech"
        return await self._call(lambda: self._post(url, body, accept="audio/*"), self._audio)

    async def _audio(self, response: aiohttp.ClientResponse) -> SpokenAudio:
        mime = response.content_type
        if mime == "application/octet-stream":
            mime = _SPEECH_FORMAT_TYPE  # a server that does not label it sent what was asked
        if not mime.startswith("audio/"):
            raise self._error(ErrorKind.MALFORMED, f"unexpected content type {mime}")
        data = b""
        async for piece in response.content.iter_any():
            data += piece
            if len(data) > MAX_SPOKEN_BYTES:
                raise self._error(ErrorKind.MALFORMED, "the spoken answer is too large")
        if not data:
            raise self._error(ErrorKind.MALFORMED, "the spoken answer is empty")
        return SpokenAudio(data, mime)
