"""Real image bytes for tests, and what the fake providers make of the images they are sent.

`make_png(4, 3, (255, 0, 0))` is a valid 4x3 red PNG (stdlib zlib only). The fakes decode an
image the way a provider would before looking at it: `decode_data_url` for the OpenAI-style
`data:<mime>;base64,<data>` URLs, `check_image` for the bytes (a supported format, declared
as what it is, a readable header), and `describe_image` is what their default replies say, so a
test can prove the image arrived intact: "I see an image (image/png, 75 bytes, 4x3)".
"""

from __future__ import annotations

import base64
import binascii
import struct
import zlib

# The formats the three APIs take as image input.
SUPPORTED_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_png(width: int, height: int, rgb: tuple[int, int, int] = (255, 0, 0)) -> bytes:
    """A width x height PNG of one colour (8-bit RGB, no interlace)."""
    if width < 1 or height < 1:
        raise ValueError("a PNG needs at least one pixel")
    row = b"\x00" + bytes(rgb) * width  # each scanline starts with filter type 0 (none)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        _PNG_SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(row * height))
        + _chunk(b"IEND", b"")
    )


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data)
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, checking its CRC; ValueError if unreadable."""
    if not data.startswith(_PNG_SIGNATURE) or len(data) < 33:
        raise ValueError("not a PNG")
    length, kind = struct.unpack(">I4s", data[8:16])
    if kind != b"IHDR" or length != 13:
        raise ValueError("the PNG does not start with its IHDR chunk")
    (crc,) = struct.unpack(">I", data[29:33])
    if zlib.crc32(data[12:29]) != crc:
        raise ValueError("the PNG header is corrupt")
    width, height = struct.unpack(">II", data[16:24])
    if width < 1 or height < 1:
        raise ValueError("the PNG has no pixels")
    return width, height


def sniff_type(data: bytes) -> str | None:
    """The image type the bytes are, by their magic number (what providers go by)."""
    if data.startswith(_PNG_SIGNATURE):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def decode_data_url(url: str) -> tuple[str, bytes]:
    """(mime, bytes) of a `data:<mime>;base64,<data>` URL; ValueError saying what is wrong."""
    if not url.startswith("data:"):
        raise ValueError("only data URLs are accepted here")
    header, comma, payload = url[5:].partition(",")
    mime, _, encoding = header.partition(";")
    if not comma or encoding != "base64":
        raise ValueError("the data URL is not base64-encoded")
    return mime, decode_base64(payload)


def decode_base64(payload: str) -> bytes:
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the image data is not valid base64") from None


def check_image(declared: str, data: bytes) -> None:
    """Refuse what a provider refuses: an unsupported type, bytes of another type than
    declared, a PNG whose header cannot be read."""
    if declared not in SUPPORTED_TYPES:
        raise ValueError(
            f"unsupported image type {declared!r}; supported: {', '.join(SUPPORTED_TYPES)}"
        )
    actual = sniff_type(data)
    if actual is None:
        raise ValueError("the image data is not a valid image")
    if actual != declared:
        raise ValueError(f"the image was declared {declared} but the data is {actual}")
    if actual == "image/png":
        png_size(data)


def describe_image(mime: str, data: bytes) -> str:
    """What the fakes say they see; a PNG's size comes from its header."""
    size = ""
    if sniff_type(data) == "image/png":
        width, height = png_size(data)
        size = f", {width}x{height}"
    return f"I see an image ({mime}, {len(data)} bytes{size})"
