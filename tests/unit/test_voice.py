"""The pure parts of voice: what is read aloud, how a long answer is cut, how long audio plays,
and the layout of transcripts, voice messages and the binding's voice flag."""

from __future__ import annotations

import struct

from devtools.audio import make_wav
from surfaces_plugin import layout
from surfaces_plugin.voice import audio_duration_ms, first_part, speakable


def ogg_page(granule: int, payload: bytes, page_type: int = 0) -> bytes:
    """One Ogg page (CRC left zero: the duration reader does not check it)."""
    segments = bytes([255] * (len(payload) // 255) + [len(payload) % 255])
    header = b"OggS" + struct.pack("<BBqIIIB", 0, page_type, granule, 7, 0, 0, len(segments))
    return header + segments + payload


def opus_file(samples_48k: int, pre_skip: int = 312) -> bytes:
    head = b"OpusHead" + struct.pack("<BBHIhB", 1, 1, pre_skip, 48000, 0, 0)
    return (
        ogg_page(0, head, page_type=2)
        + ogg_page(0, b"OpusTags" + b"\x00" * 8)
        + ogg_page(samples_48k // 2 + pre_skip, b"\x00" * 40)
        + ogg_page(samples_48k + pre_skip, b"\x00" * 40, page_type=4)
    )


def test_the_duration_of_wav_and_ogg_opus_audio() -> None:
    assert audio_duration_ms(make_wav("hi", seconds=1.25), "audio/wav") == 1250
    assert audio_duration_ms(opus_file(48_000 * 3), "audio/ogg") == 3000
    assert audio_duration_ms(b"ID3 not parsed", "audio/mpeg") is None
    assert audio_duration_ms(b"RIFF\x00\x00\x00\x00WAVE broken", "audio/wav") is None


def test_markdown_marks_are_not_read_aloud() -> None:
    answer = "# Plan\n\n**Bold** and *soft* `code`, see [the docs](https://x.example).\n\n- one\n> quoted\n```py\nx = 1\n```"
    assert speakable(answer) == "Plan\n\nBold and soft code, see the docs.\n\none\nquoted\nx = 1"
    assert speakable("snake_case stays") == "snake_case stays"


def test_a_long_text_is_cut_after_a_sentence_or_a_word() -> None:
    sentence = "This sentence has six words. "
    text = sentence * 10
    cut = first_part(text, 100)
    assert len(cut) <= 100 and cut.endswith("words.") and text.startswith(cut)
    words = "word " * 50
    cut = first_part(words, 33)
    assert cut == "word " * 5 + "word"
    assert first_part("short", 100) == "short"


def test_transcripts_read_back_from_their_notice() -> None:
    text = "first line\n\nthird line"
    content = {"msgtype": "m.notice", "body": layout.transcript_notice_text(text),
               **layout.transcript_marker("$voice")}
    assert content["body"].startswith("> 🎤 first line\n>\n> third")
    assert layout.parse_transcript(content) == layout.Transcript("$voice", text)
    assert layout.parse_transcript({"body": "> 🎤 x", layout.TRANSCRIPT_KEY: {"of": 3}}) is None


def test_the_binding_voice_flag_is_optional_and_tolerant() -> None:
    binding = layout.Binding("@a:hs", "!s:hs", "echo", "T", "c1", voice=True)
    content = binding.to_content()
    assert content["voice"] is True and layout.parse_binding(content) == binding
    assert "voice" not in layout.Binding("@a:hs", "!s:hs", "echo", "T", "c1").to_content()
    odd = layout.parse_binding({**content, "voice": "yes"})
    assert odd is not None and odd.voice is None


def test_a_voice_message_content() -> None:
    content = layout.voice_message_content("Voice answer", "answer.ogg", {"url": "mxc://hs/a"},
                                           "audio/ogg", 1234, 2500)
    assert content["msgtype"] == "m.audio" and content[layout.VOICE_FLAG_KEY] == {}
    assert content["info"] == {"mimetype": "audio/ogg", "size": 1234, "duration": 2500}
    assert content["url"] == "mxc://hs/a"
    unknown = layout.voice_message_content("Voice answer", "a.mp3", {"url": "mxc://hs/b"},
                                           "audio/mpeg", 9, None)
    assert "duration" not in unknown["info"]
