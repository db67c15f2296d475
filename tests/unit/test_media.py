"""Attachments: the wire-format parser and the readers that turn bytes into request parts."""

from __future__ import annotations

import json

import pytest

from devtools.documents import make_pdf
from devtools.images import make_png
from surfaces_plugin.backends import ImagePart
from surfaces_plugin.layout import Attachment, attachment_from_json, parse_attachment
from surfaces_plugin.media import (
    FileText,
    MediaError,
    RecentMedia,
    decode_text,
    file_part,
    is_pdf,
    is_text_like,
    labelled_file,
    pdf_text,
    read_image,
    sniff_image,
)

IMAGES = ("image/png", "image/jpeg", "image/gif", "image/webp")
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 32 + b"\xff\xd9"
GIF = b"GIF89a" + b"\x01\x00\x01\x00\x00\x00\x00" + b"\x3b"
WEBP_BODY = b"WEBPVP8 " + b"\x00" * 12
WEBP = b"RIFF" + len(WEBP_BODY).to_bytes(4, "little") + WEBP_BODY
ENCRYPTED = {
    "url": "mxc://hs/cipher",
    "key": {"kty": "oct", "alg": "A256CTR", "k": "secretkey", "key_ops": ["encrypt", "decrypt"]},
    "iv": "AAAAAAAAAAAAAAAAAAAAAA",
    "hashes": {"sha256": "abc"},
    "v": "v2",
}


# the parser


def test_an_image_with_a_filename_has_its_body_as_caption() -> None:
    content = {
        "msgtype": "m.image",
        "body": "What is in this picture?",
        "filename": "cat.png",
        "url": "mxc://hs/abc",
        "info": {"mimetype": "image/png", "size": 1234},
    }
    attachment = parse_attachment(content)
    assert attachment == Attachment(
        kind="image", name="cat.png", mime="image/png", size=1234, url="mxc://hs/abc",
        caption="What is in this picture?",
    )
    assert attachment.turn_text == "What is in this picture?"


def test_without_a_filename_the_body_is_the_name_and_the_label_is_the_turn() -> None:
    attachment = parse_attachment({"msgtype": "m.file", "body": "notes.md", "url": "mxc://hs/n"})
    assert attachment is not None
    assert (attachment.name, attachment.caption) == ("notes.md", None)
    assert attachment.turn_text == "[file: notes.md]"
    # A filename equal to the body is no caption either.
    same = parse_attachment({"msgtype": "m.file", "body": "a.txt", "filename": "a.txt",
                             "url": "mxc://hs/a"})
    assert same is not None and same.caption is None


def test_an_encrypted_file_keeps_what_decryption_needs_and_round_trips() -> None:
    attachment = parse_attachment(
        {"msgtype": "m.audio", "body": "voice.ogg", "file": ENCRYPTED,
         "info": {"mimetype": "audio/ogg"}}
    )
    assert attachment is not None and attachment.encrypted
    assert attachment.mxc == "mxc://hs/cipher" and attachment.url is None
    again = attachment_from_json(attachment.to_json())
    assert again == attachment and again is not None and again.file == attachment.file


@pytest.mark.parametrize(
    "content",
    [
        None,
        "text",
        {"msgtype": "m.text", "body": "hi"},
        {"msgtype": "m.image", "body": "x.png"},  # no media at all
        {"msgtype": "m.image", "body": "x.png", "url": "https://example.org/x.png"},
        {"msgtype": "m.image", "body": "x.png", "file": {**ENCRYPTED, "key": "not a map"}},
        {"msgtype": "m.image", "body": "x.png", "file": {**ENCRYPTED, "hashes": {}}},
        {"msgtype": "m.image", "body": "x", "url": "mxc://hs/a",
         "m.relates_to": {"rel_type": "m.replace", "event_id": "$e"}},  # an edit
    ],
)
def test_what_names_no_fetchable_media_is_no_attachment(content: object) -> None:
    assert parse_attachment(content) is None


def test_odd_fields_are_dropped_not_trusted() -> None:
    attachment = parse_attachment(
        {"msgtype": "m.image", "body": 42, "filename": "a\nb\u202e.png", "url": "mxc://hs/a",
         "info": {"mimetype": 7, "size": -3}}
    )
    assert attachment is not None
    assert "\n" not in attachment.name and "\u202e" not in attachment.name
    assert (attachment.mime, attachment.size, attachment.caption) == ("", None, None)
    nameless = parse_attachment({"msgtype": "m.image", "body": "", "url": "mxc://hs/a"})
    assert nameless is not None and nameless.name == "unnamed image"


@pytest.mark.parametrize("stored", ["", "{", "[]", json.dumps({"kind": "video", "url": "mxc://a/b"}),
                                    json.dumps({"kind": "image"})])
def test_a_stored_form_that_is_not_an_attachment_reads_as_none(stored: str) -> None:
    assert attachment_from_json(stored) is None


# images


def test_images_are_recognised_by_their_bytes() -> None:
    png = make_png(4, 3)
    assert sniff_image(png) == "image/png"
    assert sniff_image(JPEG) == "image/jpeg"
    assert sniff_image(GIF) == "image/gif"
    assert sniff_image(WEBP) == "image/webp"
    assert sniff_image(b"<svg xmlns=...>") is None
    assert read_image(png, "image/png", IMAGES) == ImagePart("image/png", png)
    assert read_image(JPEG, "image/jpg", IMAGES).mime == "image/jpeg"  # a common alias
    assert read_image(GIF, "image/gif", IMAGES).mime == "image/gif"
    assert read_image(WEBP, "", IMAGES).mime == "image/webp"


def test_an_image_that_is_not_what_it_says_is_refused() -> None:
    png = make_png(4, 3)
    damaged = [
        b"\x89PNG garbage",  # a cut-off signature
        png[:-12],  # an upload cut off before its end
        png[:20] + b"\x00" * 9 + png[29:],  # a damaged header (its CRC no longer matches)
        JPEG[:-2],
        GIF[:-1],
        WEBP[:-4],
    ]
    for data in damaged:
        with pytest.raises(MediaError, match="not a readable image"):
            read_image(data, "", IMAGES)
    with pytest.raises(MediaError, match="says it is `image/jpeg` but its bytes are `image/png`"):
        read_image(make_png(1, 1), "image/jpeg", IMAGES)
    with pytest.raises(MediaError, match="not one I pass on"):
        read_image(GIF, "", ("image/png",))


# text files and PDFs


def test_text_like_files_by_type_or_name() -> None:
    def file(name: str, mime: str = "") -> Attachment:
        return Attachment("file", name, mime, url="mxc://hs/f")

    assert is_text_like(file("x", "text/plain"))
    assert is_text_like(file("data", "application/json"))
    assert is_text_like(file("x", "application/ld+json"))
    assert is_text_like(file("main.rs", "application/octet-stream"))
    assert is_text_like(file("Makefile"))
    assert not is_text_like(file("photo.zip", "application/zip"))
    assert is_pdf(file("paper.pdf")) and is_pdf(file("x", "application/pdf"))


def test_text_is_decoded_with_replacement_and_binary_is_refused() -> None:
    assert decode_text("Grüße, naïve".encode()) == "Grüße, naïve"
    assert decode_text("\ufeffwith a BOM".encode()) == "with a BOM"
    assert decode_text("utf-16 text".encode("utf-16")) == "utf-16 text"
    assert decode_text(b"one bad byte \xff here") == "one bad byte \ufffd here"
    with pytest.raises(MediaError, match="binary"):
        decode_text(b"PK\x03\x04\x00\x00 zip")
    with pytest.raises(MediaError, match="binary"):
        decode_text(bytes(range(128, 256)) * 4)


def test_a_pdf_is_read_as_text_page_by_page() -> None:
    pytest.importorskip("pypdf")
    data = make_pdf(["The treaty was signed in 1648.", "Page two (with parentheses)."])
    assert pdf_text(data, 10_000) == (
        "The treaty was signed in 1648.\n\nPage two (with parentheses)."
    )
    assert pdf_text(data, 5) == "The treaty was signed in 1648."  # stops once past the limit


def test_a_damaged_or_fake_pdf_is_refused_with_a_reason() -> None:
    pytest.importorskip("pypdf")
    data = make_pdf(["Some text"])
    with pytest.raises(MediaError, match="could not be read"):
        pdf_text(data[: len(data) // 3], 1000)
    with pytest.raises(MediaError, match="not a PDF"):
        pdf_text(b"hello", 1000)


def test_a_long_file_is_cut_and_the_cut_is_said() -> None:
    attachment = Attachment("file", "big.txt", "text/plain", url="mxc://hs/b")
    part = file_part("x" * 50, 20)
    assert part == FileText("x" * 20, 50) and part.cut
    assert labelled_file(attachment, part) == (
        "[file: big.txt, 50 characters]\n" + "x" * 20 + "\n"
        "[… the file goes on: only its first 20 of 50 characters are included]"
    )
    whole = labelled_file(attachment, file_part("short", 20))
    assert whole == "[file: big.txt, 5 characters]\nshort"


def test_the_cache_stays_within_its_bytes() -> None:
    recent = RecentMedia(max_bytes=100)
    recent.put("a", ImagePart("image/png", b"a" * 40))
    recent.put("b", ImagePart("image/png", b"b" * 40))
    assert recent.get("a") is not None  # used: "b" is now the oldest
    recent.put("c", ImagePart("image/png", b"c" * 40))
    assert recent.get("b") is None and recent.get("a") is not None and recent.get("c") is not None
    assert recent.used <= 100
    recent.put("huge", ImagePart("image/png", b"h" * 200))
    assert recent.get("huge") is None and recent.used <= 100
