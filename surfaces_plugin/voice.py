"""Voice in working rooms: voice messages in, spoken answers out.

In: an owner's `m.audio` is downloaded (decrypted in encrypted rooms), transcribed by
`speech.transcription_backend`, and the transcript shown in the room (a quoted notice carrying
`layout.transcript_marker`) before it is answered like typed text: the transcript is the turn.
Catch-up and the rebuild after database loss read that notice back instead of transcribing again.

Out: in a room with `!ai voice on`, the final answer is also spoken by `speech.voice_backend` and
sent as a voice message (an encrypted attachment in encrypted rooms). A failure there is one
notice; the text answer stands.
"""

from __future__ import annotations

import asyncio
import io as bytes_io
import logging
import re
import wave
from collections.abc import Callable

from . import layout
from .backends import BackendError, BackendRegistry, ErrorKind
from .backends.speech import MAX_SPEECH_CHARS
from .config import Settings
from .e2ee import E2EE
from .jobs import Job
from .matrix import GatewayError, MatrixIO
from .media import MediaError, MediaService
from .rooms import WorkingRoom

NO_TRANSCRIPTION = (
    "Voice messages need speech to text, which is not set up here: an admin needs to set "
    "`speech.transcription_backend` in the bot's config. Nothing was sent to the agent; type "
    "your message instead."
)
NOTHING_HEARD = (
    "I heard no words in your voice message, so nothing was sent to the agent. Send it again "
    "or type your message."
)
OPUS_RATE = 48_000  # Ogg/Opus granule positions count 48 kHz samples, whatever was recorded
_EXTENSIONS = {"audio/ogg": "ogg", "audio/opus": "ogg", "audio/wav": "wav", "audio/x-wav": "wav",
               "audio/wave": "wav", "audio/mpeg": "mp3", "audio/aac": "aac", "audio/flac": "flac"}


class VoiceError(Exception):
    """A spoken answer that could not be made or sent; `reason` is one line for the room."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# pure helpers

_FENCE = re.compile(r"^[ \t]*```.*(?:\n|\Z)", re.MULTILINE)
_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")
_LINE_MARKS = re.compile(r"^[ \t]*(?:#{1,6}[ \t]+|>[ \t]?|[-*+][ \t]+(?=\S))", re.MULTILINE)


def speakable(text: str) -> str:
    """The answer as it is read aloud: Markdown marks (fences, emphasis, headings, quotes, link
    targets) dropped, the words kept."""
    text = _FENCE.sub("", text)
    text = _LINK.sub(r"\1", text)
    text = _LINE_MARKS.sub("", text)
    text = text.replace("**", "").replace("`", "").replace("*", "")
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def first_part(text: str, limit: int = MAX_SPEECH_CHARS) -> str:
    """At most `limit` characters, cut after a sentence (or else a word) when one ends late
    enough; the whole text when it fits."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    ends = [head.rfind(mark) for mark in (". ", "! ", "? ", "\n")]
    cut = max(ends)
    if cut >= limit // 2:
        return head[: cut + 1].rstrip()
    space = head.rfind(" ")
    return head[:space].rstrip() if space >= limit // 2 else head


def audio_duration_ms(data: bytes, mime: str) -> int | None:
    """How long the audio plays, for a WAV or an Ogg/Opus file; None when it cannot be told."""
    mime = mime.split(";")[0].strip().lower()
    if data.startswith(b"RIFF") and data[8:12] == b"WAVE":
        try:
            with wave.open(bytes_io.BytesIO(data), "rb") as audio:
                return round(audio.getnframes() * 1000 / audio.getframerate())
        except (wave.Error, EOFError, ZeroDivisionError):
            return None
    if data.startswith(b"OggS") and b"OpusHead" in data[:64]:
        last = data.rfind(b"OggS")
        if last < 0 or len(data) < last + 14:
            return None
        granule = int.from_bytes(data[last + 6 : last + 14], "little", signed=True)
        head = data.find(b"OpusHead")
        pre_skip = int.from_bytes(data[head + 10 : head + 12], "little")
        samples = granule - pre_skip
        return round(samples * 1000 / OPUS_RATE) if samples > 0 else None
    return None


def _extension(mime: str) -> str:
    return _EXTENSIONS.get(mime.split(";")[0].strip().lower(), "ogg")


def _speech_trouble(e: BackendError, backend_id: str) -> str:
    """What went wrong with a speech backend, in words for the room (no secrets: `e` has none)."""
    status = f" (HTTP {e.status})" if e.status else ""
    if e.kind is ErrorKind.AUTH:
        return f"the speech service refused the bot's key{status}; an admin needs to fix the `api_key` of backend `{backend_id}`"
    if e.kind is ErrorKind.RATE_LIMITED:
        return "the speech service is busy (rate limited) right now"
    if e.kind is ErrorKind.TIMEOUT:
        return "the speech service did not answer in time"
    if e.kind is ErrorKind.BAD_REQUEST:
        said = f": {e.detail}" if e.detail else ""
        return f"the speech service refused the request{status}{said}"
    if e.kind is ErrorKind.UNREACHABLE:
        return f"the speech service could not be reached; an admin should check the `base_url` of backend `{backend_id}`"
    return f"the speech service failed{status}"


class Voice:
    def __init__(
        self,
        io: MatrixIO,
        media: MediaService,
        e2ee: E2EE,
        backends: BackendRegistry,
        settings: Callable[[], Settings],
        log: logging.Logger,
    ) -> None:
        self.io = io
        self.media = media
        self.e2ee = e2ee
        self.backends = backends
        self.settings = settings
        self.log = log

    # in

    async def transcript(self, room: WorkingRoom, job: Job) -> str:
        """The turn's text for a voice message: its transcript, shown in the room first.

        A transcript already shown before a restart (`job.transcript`, found by catch-up) is
        used as it is. Raises MediaError with the one notice the room gets instead."""
        if job.transcript is not None:
            return job.transcript
        attachment = job.attachment
        assert attachment is not None and attachment.kind == "audio"
        settings = self.settings()
        backend_id = settings.speech.transcription_backend
        if not backend_id:
            raise MediaError(NO_TRANSCRIPTION)
        try:
            audio = await self.media.audio(attachment)
        except MediaError as e:
            raise self._not_transcribed(e.reason) from e
        try:
            speech = self.backends.speech(backend_id)
            mime = attachment.mime or "audio/ogg"
            model = settings.speech.transcription_model
            text = await speech.transcribe(audio, mime, attachment.name, model)
        except BackendError as e:
            self.log.warning("Transcribing %s with %s failed: %s", job.event_id, backend_id, e)
            raise self._not_transcribed(_speech_trouble(e, backend_id)) from e
        if not text:
            raise MediaError(NOTHING_HEARD)
        limit = settings.limits.max_message_chars
        if len(text) > limit:
            raise self._not_transcribed(
                f"its transcript has {len(text)} characters, over the limit of {limit} for a "
                "message; send a shorter one"
            )
        await self.io.send_notice(
            room.room_id,
            layout.transcript_notice_text(text),
            layout.transcript_marker(job.event_id),
            txn=job.txn("transcript"),
        )
        return text

    @staticmethod
    def _not_transcribed(why: str) -> MediaError:
        return MediaError(
            f"I could not transcribe your voice message: {why}. Nothing was sent to the agent; "
            "send it again or type your message."
        )

    # out

    async def speak_answer(self, room: WorkingRoom, job: Job, text: str) -> None:
        """With voice answers on in the room, the final answer `text` also as a voice message.

        Never raises (but cancellation): a failure is one notice, the text answer stands."""
        if not room.voice or not speakable(text):
            return
        try:
            await self._speak(room, job, text)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if isinstance(e, VoiceError):
                reason = e.reason
                self.log.warning("No voice answer in %s: %s", room.room_id, reason)
            else:
                reason = "of an error on my side (the operator can find it in the bot's log)"
                self.log.exception("Speaking the answer in %s failed", room.room_id)
            notice = f"I could not send this answer as a voice message: {reason}. The text answer above stands."
            try:
                await self.io.send_notice(room.room_id, notice, txn=job.txn("voice failed"))
            except Exception as told:
                self.log.warning("Could not say in %s that the voice answer failed: %s", room.room_id, told)

    async def _speak(self, room: WorkingRoom, job: Job, text: str) -> None:
        speech = self.settings().speech
        prefix = self.settings().command_prefix
        if not speech.voice_backend:
            raise VoiceError(
                f"no `speech.voice_backend` is configured (an admin can set one; `!{prefix} "
                "voice off` stops voice answers here)"
            )
        words = speakable(text)
        spoken = first_part(words)
        try:
            client = self.backends.speech(speech.voice_backend)
            audio = await client.speak(spoken, speech.voice_model, speech.voice)
        except BackendError as e:
            raise VoiceError(_speech_trouble(e, speech.voice_backend)) from e
        name = f"answer.{_extension(audio.mime)}"
        body = "Voice answer"
        if len(spoken) < len(words):
            body += (
                f" (only the first {len(spoken):,} of {len(words):,} characters are spoken; "
                "the rest is in the text answer)"
            )
        try:
            media = await self.e2ee.upload(room.room_id, audio.data, audio.mime, name)
            content = layout.voice_message_content(
                body,
                name,
                media,
                audio.mime,
                len(audio.data),
                audio_duration_ms(audio.data, audio.mime),
            )
            await self.io.send_content(room.room_id, content, txn=job.txn("voice"))
        except GatewayError as e:
            raise VoiceError(f"it could not be sent ({e.reason})") from e
