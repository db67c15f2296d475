"""Attachments in working rooms: fetched from the media repository and read into request parts.

Images become `ImagePart`s (allow-listed types, checked by their magic bytes), text-like files
and PDFs (with `pypdf`, a soft dependency) become text. Nothing is written to disk: bytes live
in memory while a request needs them, plus a small bounded cache (`RecentMedia`) so the next
requests of a conversation do not download the same files again.
"""

from __future__ import annotations

import asyncio
import io as bytes_io
import logging
import posixpath
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import ClientResponseError
from mautrix.types import ContentURI

from .backends import ChatMessage, ImagePart
from .config import AgentSpec, MediaSettings, Settings
from .layout import Attachment
from .matrix import GatewayError, MatrixIO

CACHE_BYTES = 16 * 1024 * 1024  # decoded images and file texts kept for the next requests
BINARY_SHARE = 0.05  # more undecodable bytes than this and a "text" file is binary
MAGIC_PROBE = 8192  # bytes looked at for NULs, which text files never hold

# The first bytes of each image type the models accept.
_IMAGE_MAGIC: tuple[tuple[str, Callable[[bytes], bool]], ...] = (
    ("image/png", lambda b: b.startswith(b"\x89PNG\r\n\x1a\n")),
    ("image/jpeg", lambda b: b.startswith(b"\xff\xd8\xff")),
    ("image/gif", lambda b: b[:6] in (b"GIF87a", b"GIF89a")),
    ("image/webp", lambda b: b[:4] == b"RIFF" and b[8:12] == b"WEBP"),
)
_MIME_ALIASES = {"image/jpg": "image/jpeg", "image/pjpeg": "image/jpeg", "image/x-png": "image/png"}

TEXT_MIMES = frozenset(
    {
        "application/json",
        "application/xml",
        "application/yaml",
        "application/x-yaml",
        "application/toml",
        "application/javascript",
        "application/x-javascript",
        "application/typescript",
        "application/x-sh",
        "application/x-python",
        "application/sql",
        "application/csv",
        "application/x-ndjson",
    }
)
TEXT_EXTENSIONS = frozenset(
    ".txt .text .md .markdown .rst .org .tex .csv .tsv .json .jsonl .ndjson .yaml .yml .toml "
    ".ini .cfg .conf .properties .log .xml .html .htm .css .scss .svg .py .pyi .js .mjs .cjs .ts "
    ".tsx .jsx .java .kt .kts .scala .groovy .c .h .cc .cpp .cxx .hpp .hh .cs .go .rs .rb .php "
    ".pl .pm .lua .r .jl .swift .m .mm .dart .ex .exs .erl .hs .ml .clj .elm .sh .bash .zsh "
    ".fish .ps1 .bat .sql .graphql .proto .gradle .cmake .mk .dockerfile .diff .patch .vue "
    ".svelte .nix .tf .hcl .env .gitignore .editorconfig".split()
)
TEXT_NAMES = frozenset({"makefile", "dockerfile", "readme", "license", "gemfile", "rakefile"})


class MediaError(Exception):
    """An attachment that cannot be used; `reason` is one line for the room (no secrets)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class FileText:
    """A file's text as a request carries it: at most `max_file_chars`, and how long it was."""

    text: str
    total_chars: int

    @property
    def cut(self) -> bool:
        return self.total_chars > len(self.text)


# pure readers


def megabytes(size: int) -> str:
    if size < 1000:
        return f"{size} bytes"
    return f"{size / 1_000_000:.1f} MB" if size >= 100_000 else f"{size / 1000:.0f} kB"


def sniff_image(data: bytes) -> str | None:
    """The image type the bytes show, from their magic number; None when not a known image."""
    for mime, matches in _IMAGE_MAGIC:
        if matches(data):
            return mime
    return None


def _png_intact(data: bytes) -> bool:
    """The IHDR chunk first, with a matching CRC, and the IEND chunk last."""
    if len(data) < 45 or data[12:16] != b"IHDR" or data[8:12] != b"\x00\x00\x00\x0d":
        return False
    crc = int.from_bytes(data[29:33], "big")
    return zlib.crc32(data[12:29]) == crc and data[-8:-4] == b"IEND"


def _webp_intact(data: bytes) -> bool:
    """The RIFF size covers exactly the bytes there are (a cut-off upload does not)."""
    return len(data) >= 16 and int.from_bytes(data[4:8], "little") + 8 == len(data)


# Beyond the magic number, what a whole file of each type has (a damaged or cut-off one not).
_INTACT: dict[str, Callable[[bytes], bool]] = {
    "image/png": _png_intact,
    "image/jpeg": lambda b: b"\xff\xd9" in b[-32:],  # the end-of-image marker
    "image/gif": lambda b: len(b) >= 14 and b"\x3b" in b[-4:],  # the trailer
    "image/webp": _webp_intact,
}


def normal_mime(mime: str) -> str:
    mime = mime.split(";", 1)[0].strip().lower()
    return _MIME_ALIASES.get(mime, mime)


def image_type_refusal(declared: str, allowed: tuple[str, ...]) -> str | None:
    """Why an image of the declared type is not accepted (before downloading it), or None."""
    declared = normal_mime(declared)
    if declared and declared not in allowed:
        return f"its type `{declared}` is not one I pass on (allowed: {', '.join(allowed)})"
    return None


def read_image(data: bytes, declared: str, allowed: tuple[str, ...]) -> ImagePart:
    """The image as a request part: its bytes must be an allowed image of the declared type."""
    actual = sniff_image(data)
    if actual is None or not _INTACT[actual](data):
        raise MediaError("the file is not a readable image (it may be damaged)")
    declared = normal_mime(declared)
    if declared and declared != actual:
        raise MediaError(f"it says it is `{declared}` but its bytes are `{actual}`")
    if actual not in allowed:
        raise MediaError(f"its type `{actual}` is not one I pass on (allowed: {', '.join(allowed)})")
    return ImagePart(actual, data)


def _extension(name: str) -> str:
    return posixpath.splitext(name.lower())[1]


def is_pdf(attachment: Attachment) -> bool:
    return normal_mime(attachment.mime) == "application/pdf" or _extension(attachment.name) == ".pdf"


def is_text_like(attachment: Attachment) -> bool:
    """Plain text, Markdown, code, JSON, CSV…: by MIME type, else by the file name."""
    mime = normal_mime(attachment.mime)
    if mime.startswith("text/") or mime in TEXT_MIMES or mime.endswith(("+json", "+xml")):
        return True
    name = attachment.name.lower()
    return _extension(name) in TEXT_EXTENSIONS or name in TEXT_NAMES


def decode_text(data: bytes) -> str:
    """A text file's text: UTF-8 (or UTF-16 with a byte-order mark), undecodable bytes replaced;
    binary content is refused."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16", errors="replace")
    if b"\x00" in data[:MAGIC_PROBE]:
        raise MediaError("it is a binary file, not text")
    text = data.decode("utf-8-sig", errors="replace")
    if text.count("\ufffd") > max(8, len(text) * BINARY_SHARE):
        raise MediaError("it is a binary file, not text (or not in UTF-8)")
    return text


def pdf_text(data: bytes, max_chars: int) -> str:
    """The text of a PDF's pages, read with pypdf (stops once past `max_chars`).

    Raises MediaError when pypdf is not installed, or the PDF is damaged, locked or has no text."""
    try:
        from pypdf import PdfReader  # soft dependency: maubot installs nothing
    except ImportError:
        raise MediaError(
            "PDFs cannot be read here: the bot's operator needs to install `pypdf` in maubot's "
            "environment"
        ) from None
    if not data.startswith(b"%PDF-"):
        raise MediaError("the file is not a PDF (it may be damaged)")
    pages: list[str] = []
    total = 0
    try:
        reader = PdfReader(bytes_io.BytesIO(data))
        if reader.is_encrypted:
            raise MediaError("the PDF is password-protected")
        for page in reader.pages:
            text = page.extract_text() or ""
            pages.append(text)
            total += len(text)
            if total > max_chars:
                break
    except MediaError:
        raise
    except Exception as e:  # pypdf raises many kinds of errors on damaged files
        raise MediaError(f"the PDF could not be read ({type(e).__name__})") from e
    text = "\n\n".join(p.strip() for p in pages if p.strip())
    if not text:
        raise MediaError("the PDF has no text to read (a scan without a text layer?)")
    return text


def file_part(text: str, max_chars: int) -> FileText:
    return FileText(text[:max_chars], len(text))


def labelled_file(attachment: Attachment, part: FileText) -> str:
    """The file as a labelled part of a request's text; a cut says so."""
    lines = [f"[file: {attachment.name}, {part.total_chars} characters]", part.text]
    if part.cut:
        lines.append(
            f"[… the file goes on: only its first {len(part.text)} of {part.total_chars} "
            "characters are included]"
        )
    return "\n".join(lines)


# fetching


class RecentMedia:
    """The parts of recently used attachments, by mxc URI, within `max_bytes` (oldest go first)."""

    def __init__(self, max_bytes: int = CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.used = 0
        self._items: OrderedDict[str, tuple[ImagePart | FileText, int]] = OrderedDict()

    @staticmethod
    def _size(part: ImagePart | FileText) -> int:
        return len(part.data) if isinstance(part, ImagePart) else len(part.text) * 2

    def get(self, key: str) -> ImagePart | FileText | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: str, part: ImagePart | FileText) -> None:
        size = self._size(part)
        if size > self.max_bytes:
            return  # larger than the whole cache: used once, then dropped
        old = self._items.pop(key, None)
        if old is not None:
            self.used -= old[1]
        self._items[key] = (part, size)
        self.used += size
        while self.used > self.max_bytes:
            _, (_, dropped) = self._items.popitem(last=False)
            self.used -= dropped


class MediaService:
    def __init__(self, io: MatrixIO, settings: Callable[[], Settings], log: logging.Logger) -> None:
        self.io = io
        self.settings = settings
        self.log = log
        self.recent = RecentMedia()

    @property
    def limits(self) -> MediaSettings:
        return self.settings().media

    # intake

    async def admit(self, attachment: Attachment, agent: AgentSpec) -> str:
        """Check an attachment the owner sent before it becomes a turn; returns the turn's text.

        Raises MediaError with the one notice the room gets when it cannot be used."""
        if attachment.kind == "audio":  # voice.Voice transcribes those (dispatch routes them)
            raise MediaError("Voice messages are not handled here.")
        if attachment.kind == "image" and not agent.vision:
            raise MediaError(self.cannot_see(agent))
        try:
            if attachment.kind == "image":
                await self.image(attachment)
            else:
                await self.file_text(attachment)
        except MediaError as e:
            raise MediaError(
                f"I could not pass on your {attachment.kind} `{attachment.name}`: {e.reason}. "
                f"Nothing was sent to `{agent.id}`."
            ) from e
        return attachment.turn_text

    def cannot_see(self, agent: AgentSpec) -> str:
        """The notice for an image sent to an agent without `vision`, naming those with it."""
        settings = self.settings()
        seeing = [f"`{a.id}`" for a in settings.agents.values() if a.vision]
        prefix = settings.command_prefix
        if seeing:
            can = (
                f"Agents that can: {', '.join(seeing)} (switch with `!{prefix} agent <id>`, then "
                "send the image again)."
            )
        else:
            can = "No agent here can see images (an admin can set `vision: true` on an agent whose model can)."
        return (
            f"`{agent.id}` cannot see images, so I did not send it your image (nor its caption). "
            + can
        )

    # request parts

    async def image(self, attachment: Attachment) -> ImagePart:
        """The image's bytes, checked (raises MediaError)."""
        cached = self.recent.get(attachment.mxc)
        if isinstance(cached, ImagePart):
            return cached
        limits = self.limits
        refusal = image_type_refusal(attachment.mime, limits.image_types)
        if refusal:
            raise MediaError(refusal)
        data = await self._download(attachment, limits.max_image_bytes, "max_image_bytes")
        part = read_image(data, attachment.mime, limits.image_types)
        self.recent.put(attachment.mxc, part)
        return part

    async def file_text(self, attachment: Attachment) -> FileText:
        """The file's text, cut to `max_file_chars` (raises MediaError)."""
        max_chars = self.limits.max_file_chars
        key = f"{attachment.mxc} {max_chars}"  # a changed limit reads the file again
        cached = self.recent.get(key)
        if isinstance(cached, FileText):
            return cached
        pdf, text_like = is_pdf(attachment), is_text_like(attachment)
        if not pdf and not text_like:
            what = f" (`{attachment.mime}`)" if attachment.mime else ""
            raise MediaError(
                f"I read text files (plain text, Markdown, code, JSON, CSV) and PDFs, and this "
                f"file{what} is neither"
            )
        data = await self._download(attachment, self.limits.max_file_bytes, "max_file_bytes")
        if pdf:
            # pypdf is pure Python and slow on big files: off the event loop.
            text = await asyncio.to_thread(pdf_text, data, max_chars)
        else:
            text = decode_text(data)
        part = file_part(text, max_chars)
        self.recent.put(key, part)
        return part

    async def audio(self, attachment: Attachment) -> bytes:
        """A voice message's bytes (decrypted), within `max_audio_bytes` (raises MediaError)."""
        return await self._download(attachment, self.limits.max_audio_bytes, "max_audio_bytes")

    async def request_message(self, text: str, attachment: Attachment, *, vision: bool) -> ChatMessage:
        """A stored user turn (`text`) with its attachment as a request carries it: an image as
        image input (for an agent that can see), a file's text as a labelled part. Media that
        can no longer be read becomes a short note: the answer goes on without it."""
        caption = attachment.caption
        label = attachment.label
        if attachment.kind == "image":
            if not vision:
                return ChatMessage("user", _with_caption(label, caption))
            try:
                part = await self.image(attachment)
            except MediaError as e:
                note = f"{label} (no longer available: {e.reason})"
                return ChatMessage("user", _with_caption(note, caption))
            return ChatMessage("user", _with_caption(label, caption), images=(part,))
        if attachment.kind == "file":
            try:
                body = labelled_file(attachment, await self.file_text(attachment))
            except MediaError as e:
                body = f"{label} (no longer available: {e.reason})"
            return ChatMessage("user", f"{caption}\n\n{body}" if caption else body)
        return ChatMessage("user", text)  # voice: the stored text (a transcript) is the turn

    async def _download(self, attachment: Attachment, limit: int, key: str) -> bytes:
        """The attachment's bytes (decrypted), within `limit`: the declared size is checked
        before downloading, the real one after."""
        declared = attachment.size
        if declared is not None and declared > limit:
            raise MediaError(self._too_large(declared, limit, key))
        client = self.io.client

        async def download() -> bytes:
            try:
                return await client.download_media(ContentURI(attachment.mxc))
            except ClientResponseError as e:
                if 400 <= e.status < 500:  # gone or refused: asking again will not help
                    raise MediaError(
                        f"the homeserver no longer has it (HTTP {e.status})"
                    ) from None
                raise  # 5xx: the gateway tries again

        try:
            data = await self.io.gateway.read("download the attachment", download)
        except GatewayError as e:
            raise MediaError(f"it could not be downloaded ({e.reason})") from e
        if attachment.file is not None:
            data = _decrypt(data, attachment.file)
        if len(data) > limit:
            raise MediaError(self._too_large(len(data), limit, key))
        return data

    @staticmethod
    def _too_large(size: int, limit: int, key: str) -> str:
        shown, limit_shown = megabytes(size), megabytes(limit)
        if shown == limit_shown:  # just over: rounded, both would read the same
            shown, limit_shown = f"{size} bytes", f"{limit} bytes"
        return f"it is {shown}, over the limit of {limit_shown} (`media.{key}`)"


def _decrypt(data: bytes, file: dict[str, object]) -> bytes:
    try:
        # Imported here: mautrix.crypto needs maubot[encryption], absent without crypto.
        from mautrix.crypto.attachments import decrypt_attachment
    except ImportError:
        raise MediaError("encrypted files need the crypto packages, which are not installed") from None
    key, hashes = file["key"], file["hashes"]
    assert isinstance(key, dict) and isinstance(hashes, dict)  # checked by layout.parse_attachment
    try:
        return decrypt_attachment(data, key["k"], hashes["sha256"], str(file["iv"]))
    except Exception as e:  # DecryptionError, or a key that is not valid base64
        raise MediaError(f"it could not be decrypted ({e})") from e


def _with_caption(head: str, caption: str | None) -> str:
    return f"{head}\n{caption}" if caption else head
