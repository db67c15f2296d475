"""Real audio bytes for tests, and the fake speech server's "transcriber" (stdlib only).

`make_wav("what is the weather")` is a valid 16-bit mono PCM WAV file: a sine tone with the
words it stands for in a RIFF `LIST/INFO` chunk (`ICMT`, a standard comment field that players
ignore). `transcribe_wav` is how devtools.fake_openai hears it: it opens the file with `wave`
(so the bytes must be real WAV) and answers those words, or, for a WAV without them, the
tone's frequency measured from the samples ("a tone of 440 hertz"). So a test knows exactly what
the transcript of the audio it made will be, and the fake's spoken answers (also made here)
can be transcribed back to the text they were made from.
"""

from __future__ import annotations

import io
import math
import struct
import wave
from dataclasses import dataclass

_TEXT_FIELD = b"ICMT"


def make_wav(
    text: str = "", *, frequency: float = 440.0, seconds: float = 0.5, rate: int = 16000
) -> bytes:
    """A WAV file of a `frequency` Hz tone lasting `seconds`, carrying `text` when given."""
    frames = int(rate * seconds)
    samples = (int(12000 * math.sin(2 * math.pi * frequency * i / rate)) for i in range(frames))
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b"".join(struct.pack("<h", s) for s in samples))
    data = buffer.getvalue()
    if not text:
        return data
    words = text.encode("utf-8") + b"\x00"
    field = _TEXT_FIELD + struct.pack("<I", len(words)) + words + b"\x00" * (len(words) % 2)
    info = b"INFO" + field
    data += b"LIST" + struct.pack("<I", len(info)) + info
    return data[:4] + struct.pack("<I", len(data) - 8) + data[8:]  # the RIFF size grows


@dataclass(frozen=True)
class WavInfo:
    text: str  # the words in its LIST/INFO chunk, "" when it has none
    frequency: float  # of its (first channel's) tone, from upward zero crossings; 0 if none
    seconds: float


def read_wav(data: bytes) -> WavInfo:
    """What a WAV file holds; ValueError when it is not a readable PCM WAV."""
    try:
        with wave.open(io.BytesIO(data), "rb") as wav:
            channels, width, rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
            frames = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError, struct.error) as e:
        raise ValueError(f"not a readable WAV file ({e})") from None
    if width != 2 or rate <= 0:
        raise ValueError("only 16-bit PCM WAV is understood")
    samples = struct.unpack(f"<{len(frames) // 2}h", frames[: len(frames) // 2 * 2])[::channels]
    seconds = len(samples) / rate
    rises = [i for i in range(1, len(samples)) if samples[i - 1] < 0 <= samples[i]]
    # Whole periods between the first and the last upward crossing: exact to a hertz or so.
    periods = len(rises) - 1
    frequency = periods * rate / (rises[-1] - rises[0]) if periods > 0 else 0.0
    return WavInfo(_info_text(data), frequency, seconds)


def transcribe_wav(data: bytes) -> str:
    """The fake transcriber's transcript of a WAV file."""
    info = read_wav(data)
    return info.text or f"a tone of {round(info.frequency)} hertz"


def _info_text(data: bytes) -> str:
    """The ICMT text of the first LIST/INFO chunk, walking the RIFF chunks after the header."""
    position = 12
    while position + 8 <= len(data):
        kind = data[position : position + 4]
        (size,) = struct.unpack("<I", data[position + 4 : position + 8])
        body = data[position + 8 : position + 8 + size]
        if kind == b"LIST" and body[:4] == b"INFO":
            inner = 4
            while inner + 8 <= len(body):
                field = body[inner : inner + 4]
                (length,) = struct.unpack("<I", body[inner + 4 : inner + 8])
                if field == _TEXT_FIELD:
                    raw = body[inner + 8 : inner + 8 + length]
                    return raw.rstrip(b"\x00").decode("utf-8", errors="replace")
                inner += 8 + length + length % 2
        position += 8 + size + size % 2
    return ""
