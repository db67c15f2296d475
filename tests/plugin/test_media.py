"""Images and files in working rooms: intake, requests, refusals, catch-up, rebuild and export.

The homeserver's media repository is the fake client's (uploads and downloads in memory); the
agent is a recording backend, so a test reads exactly what a request carried.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from devtools.documents import make_pdf
from devtools.images import make_png
from surfaces_plugin.backends import ChatMessage, ImagePart
from surfaces_plugin.context_window import IMAGE_TOKENS
from surfaces_plugin.media import RecentMedia

from .conftest import BASE_CONFIG
from .test_context import ALICE, RecordingBackend, agents, forget_messages, onboarded, pcid

PNG = make_png(4, 3, (255, 0, 0))


async def upload(h, data: bytes, mime: str, name: str) -> str:
    """What the user's client does first: put the file in the media repository."""
    return await h.client.upload_media(data, mime_type=mime, filename=name)


def media(msgtype: str, mxc: str, name: str, mime: str, size: int, caption: str | None = None
          ) -> dict[str, Any]:
    content: dict[str, Any] = {"msgtype": msgtype, "body": caption or name, "url": mxc,
                               "info": {"mimetype": mime, "size": size}}
    if caption:
        content["filename"] = name
    return content


async def send(h, room: str, content: dict[str, Any]) -> None:
    await h.app.on_message(h.client.media_message(room, ALICE, content))
    await h.settle()


async def send_image(h, room: str, caption: str | None = None, data: bytes = PNG) -> str:
    mxc = await upload(h, data, "image/png", "red.png")
    await send(h, room, media("m.image", mxc, "red.png", "image/png", len(data), caption))
    return mxc


def user_messages(backend: RecordingBackend, index: int = -1) -> list[ChatMessage]:
    return [m for m in backend.requests[index].messages if m.role == "user"]


def seeing_agents(**changes: Any) -> list[dict[str, Any]]:
    """The default `echo` agent (which cannot see) and `seer`, which can."""
    [echo] = agents(**changes)
    return [echo, {**echo, "id": "seer", "name": "Seer", "vision": True}]


# images


async def test_an_image_reaches_a_vision_agent_and_stays_in_the_conversation(
    make_surfaces,
) -> None:
    h, room, backend, _ = await onboarded(make_surfaces, vision=True)
    mxc = await send_image(h, room, caption="What colour is this?")

    shown = user_messages(backend)[-1]
    assert shown == ChatMessage(
        "user", "[image: red.png]\nWhat colour is this?", images=(ImagePart("image/png", PNG),)
    )
    assert h.last_reply(room).startswith("re: [image: red.png]")
    [stored] = [m for m in await h.app.stores.messages.history(pcid(h, room)) if m.role == "user"]
    assert stored.content == "What colour is this?" and stored.attachment is not None
    assert stored.attachment.mxc == mxc

    await h.say(room, ALICE, "And the shape?")
    first, latest = user_messages(backend)
    assert first.images == (ImagePart("image/png", PNG),) and latest.content == "And the shape?"
    assert h.client.downloads == [mxc]  # the next request used the image kept in memory

    await h.say(room, ALICE, "!ai context")
    context = h.last_reply(room)
    assert "- attachments: 1" in context
    cost = int(context.split("  - [image: red.png]: about ")[1].split()[0])
    assert cost >= IMAGE_TOKENS  # the image's fixed cost, plus its label and caption


async def test_an_agent_that_cannot_see_gives_one_notice_naming_one_that_can(
    make_surfaces,
) -> None:
    h = await make_surfaces(streaming={"enabled": False}, agents=seeing_agents())
    dm = h.dm(ALICE)
    await h.say(dm, ALICE, "!ai start")
    [working] = h.app.rooms.all_rooms()
    room = working.room_id
    backend = RecordingBackend(h.app.settings.backends["echo"])
    h.app.backends.put(backend)
    before = len(h.client.bodies(room))

    await send_image(h, room, caption="Describe it")
    notices = h.client.bodies(room)[before:]
    assert len(notices) == 1
    assert "`echo` cannot see images" in notices[0] and "`seer`" in notices[0]
    assert "!ai agent <id>" in notices[0]
    assert backend.requests == [] and h.client.downloads == []  # nothing fetched, nothing sent

    await h.say(room, ALICE, "Just text then")
    assert h.last_reply(room) == "re: Just text then"
    assert [m.content for m in user_messages(backend)] == ["Just text then"]


async def test_with_no_vision_agent_configured_the_notice_says_so(make_surfaces) -> None:
    h, room, backend, _ = await onboarded(make_surfaces)
    await send_image(h, room)
    assert "No agent here can see images" in h.last_reply(room)
    assert "`vision: true`" in h.last_reply(room)
    assert backend.requests == []


async def test_an_encrypted_image_is_decrypted(make_surfaces) -> None:
    from mautrix.crypto.attachments import encrypt_attachment

    h, room, backend, _ = await onboarded(make_surfaces, vision=True)
    ciphertext, file = encrypt_attachment(PNG)
    file.url = await upload(h, ciphertext, "application/octet-stream", "")
    await send(h, room, {"msgtype": "m.image", "body": "secret.png", "file": file.serialize(),
                         "info": {"mimetype": "image/png", "size": len(PNG)}})
    assert user_messages(backend)[-1].images == (ImagePart("image/png", PNG),)

    # A ciphertext that does not match its hash is refused, not passed on.
    tampered, bad = encrypt_attachment(PNG)
    bad.url = await upload(h, tampered[:-1] + b"\x00", "application/octet-stream", "")
    await send(h, room, {"msgtype": "m.image", "body": "bad.png", "file": bad.serialize(),
                         "info": {"mimetype": "image/png"}})
    assert "could not be decrypted" in h.last_reply(room)
    assert len(backend.requests) == 1


# files


async def test_a_text_file_and_a_pdf_become_labelled_text(make_surfaces) -> None:
    pytest.importorskip("pypdf")
    h, room, backend, _ = await onboarded(make_surfaces)
    notes = "# Plan\n\n- fly to Lyon\n- rent a bike\n"
    mxc = await upload(h, notes.encode(), "text/markdown", "plan.md")
    await send(h, room, media("m.file", mxc, "plan.md", "text/markdown", len(notes), "Summarise"))
    assert user_messages(backend)[-1].content == (
        f"Summarise\n\n[file: plan.md, {len(notes)} characters]\n{notes}"
    )

    pdf = make_pdf(["Invoice 2024-117", "Total due: 240 EUR"])
    mxc = await upload(h, pdf, "application/pdf", "invoice.pdf")
    await send(h, room, media("m.file", mxc, "invoice.pdf", "application/pdf", len(pdf)))
    text = "Invoice 2024-117\n\nTotal due: 240 EUR"
    assert user_messages(backend)[-1].content == (
        f"[file: invoice.pdf, {len(text)} characters]\n{text}"
    )
    assert h.last_reply(room).startswith("re: [file: invoice.pdf")

    await h.say(room, ALICE, "!ai context")
    assert "  - [file: plan.md]: about " in h.last_reply(room)
    assert "  - [file: invoice.pdf]: about " in h.last_reply(room)


async def test_a_long_file_is_cut_to_the_limit_and_says_so(make_surfaces) -> None:
    h, room, backend, _ = await onboarded(make_surfaces)
    settings = h.app.settings
    h.app.apply_settings(replace(settings, media=replace(settings.media, max_file_chars=10)))
    mxc = await upload(h, b"0123456789abcdefghij", "text/plain", "long.txt")
    await send(h, room, media("m.file", mxc, "long.txt", "text/plain", 20))
    assert user_messages(backend)[-1].content == (
        "[file: long.txt, 20 characters]\n0123456789\n"
        "[… the file goes on: only its first 10 of 20 characters are included]"
    )


# refusals: one notice each, and the next message is answered


async def test_oversize_corrupt_and_unreadable_media_get_one_clear_notice_each(
    make_surfaces,
) -> None:
    h, room, backend, _ = await onboarded(make_surfaces, vision=True)
    limit = BASE_CONFIG["media"]["max_image_bytes"]
    cases: list[tuple[dict[str, Any], str]] = []

    big = await upload(h, PNG, "image/png", "big.png")  # declares more than the limit
    cases.append((media("m.image", big, "big.png", "image/png", 2 * limit),
                   "it is 20.0 MB, over the limit of 10.0 MB (`media.max_image_bytes`)"))
    corrupt = await upload(h, b"\x89PNG\r\n\x1a" + b"\x00" * 40, "image/png", "broken.png")
    cases.append((media("m.image", corrupt, "broken.png", "image/png", 48),
                  "not a readable image"))
    svg = await upload(h, b"<svg/>", "image/svg+xml", "logo.svg")
    cases.append((media("m.image", svg, "logo.svg", "image/svg+xml", 6),
                   "`image/svg+xml` is not one I pass on"))
    archive = await upload(h, b"PK\x03\x04", "application/zip", "code.zip")
    cases.append((media("m.file", archive, "code.zip", "application/zip", 4), "is neither"))
    binary = await upload(h, b"\x00\x01\x02 not text", "text/plain", "dump.txt")
    cases.append((media("m.file", binary, "dump.txt", "text/plain", 13), "binary file"))
    cases.append((media("m.image", "mxc://localhost/gone", "gone.png", "image/png", 10),
                   "the homeserver no longer has it (HTTP 404)"))

    for content, reason in cases:
        before = len(h.client.bodies(room))
        await send(h, room, content)
        shown = h.client.bodies(room)[before:]
        assert len(shown) == 1 and reason in shown[0], (reason, shown)
        assert shown[0].startswith("I could not pass on your ") and "Nothing was sent" in shown[0]
    assert big not in h.client.downloads  # refused by its declared size, never downloaded
    assert backend.requests == []

    await h.say(room, ALICE, "Still there?")
    assert h.last_reply(room) == "re: Still there?"
    assert [m.content for m in user_messages(backend)] == ["Still there?"]


async def test_a_file_larger_than_it_declared_is_refused_after_download(make_surfaces) -> None:
    h, room, backend, _ = await onboarded(make_surfaces)
    limit = BASE_CONFIG["media"]["max_file_bytes"]
    mxc = await upload(h, b"a" * (limit + 1), "text/plain", "liar.txt")
    await send(h, room, media("m.file", mxc, "liar.txt", "text/plain", 10))
    # Just over: the exact sizes, since rounded both would read "2.0 MB".
    assert f"it is {limit + 1} bytes, over the limit of {limit} bytes (`media.max_file_bytes`)" in (
        h.last_reply(room)
    )
    assert mxc in h.client.downloads and backend.requests == []


async def test_an_image_gone_from_the_server_later_becomes_a_note(make_surfaces) -> None:
    h, room, backend, _ = await onboarded(make_surfaces, vision=True)
    mxc = await send_image(h, room, caption="Keep this in mind")
    del h.client.media[mxc]  # e.g. removed by the homeserver's retention
    h.app.media.recent = RecentMedia()  # and no longer in memory (a restart)
    await h.say(room, ALICE, "What did I send?")
    earlier = user_messages(backend)[0]
    assert earlier.images == ()
    assert earlier.content == (
        "[image: red.png] (no longer available: the homeserver no longer has it (HTTP 404))\n"
        "Keep this in mind"
    )
    assert h.last_reply(room) == "re: What did I send?"


# durable: export, rebuild, catch-up, compaction


async def test_the_export_names_attachments_with_their_links(make_surfaces) -> None:
    h, room, _, _ = await onboarded(make_surfaces, vision=True)
    mxc = await send_image(h, room, caption="A red square")
    await h.say(room, ALICE, "!ai export")
    [exported] = [data for data, mime, _ in h.client.media.values() if mime == "text/markdown"]
    text = exported.decode()
    assert f"A red square\n\nAttachment (image): red.png <{mxc}>" in text


async def test_the_rebuilt_history_still_carries_the_image(make_surfaces) -> None:
    h, room, _, _ = await onboarded(make_surfaces, vision=True)
    mxc = await send_image(h, room, caption="Remember this")
    chat_id = pcid(h, room)
    await forget_messages(h, chat_id)
    await h.app.stop()

    h2 = await make_surfaces(h.client, streaming={"enabled": False}, agents=agents(vision=True))
    backend2 = RecordingBackend(h2.app.settings.backends["echo"])
    h2.app.backends.put(backend2)
    await h2.say(room, ALICE, "What was it?")
    rebuilt, latest = user_messages(backend2)
    assert rebuilt.images == (ImagePart("image/png", PNG),)
    assert rebuilt.content == "[image: red.png]\nRemember this"
    assert latest.content == "What was it?"
    stored = await h2.app.stores.messages.history(chat_id)
    assert stored[0].attachment is not None and stored[0].attachment.mxc == mxc


async def test_an_image_sent_while_the_bot_was_down_is_answered_once(make_surfaces) -> None:
    h, room, _, _ = await onboarded(make_surfaces, vision=True)
    await h.say(room, ALICE, "hello")
    await h.app.stop()
    mxc = await upload(h, PNG, "image/png", "red.png")
    h.client.media_message(room, ALICE, media("m.image", mxc, "red.png", "image/png", len(PNG),
                                              "while you were away"))

    def restart():
        return make_surfaces(h.client, streaming={"enabled": False}, agents=agents(vision=True))

    h2 = await restart()
    # Caught up by the real echo backend (catch-up runs at start, before a test can swap it).
    answers = [b for b in h.client.bodies(room) if b.startswith("echo: [image: red.png]")]
    assert len(answers) == 1
    stored = await h2.app.stores.messages.history(pcid(h2, room))
    assert [m.attachment.mxc for m in stored if m.attachment is not None] == [mxc]
    await h2.app.stop()
    await restart()
    assert len([b for b in h.client.bodies(room) if b.startswith("echo: [image")]) == 1


async def test_compaction_summarises_images_by_name_and_files_by_their_text(
    make_surfaces,
) -> None:
    h, room, backend, _ = await onboarded(make_surfaces, vision=True, context_tokens=2000)
    await send_image(h, room, caption="my cat")
    notes = "The cat is called Minou."
    mxc = await upload(h, notes.encode(), "text/plain", "cat.txt")
    await send(h, room, media("m.file", mxc, "cat.txt", "text/plain", len(notes)))
    for i in range(3):
        await h.say(room, ALICE, " ".join(["word"] * 400) + f" {i}")
    await h.say(room, ALICE, "!ai compact")
    # The image's fixed token cost may compact automatically first: every summary counts.
    transcript = "\n".join(r.messages[-1].content for r in backend.summaries)
    assert "User: [image: red.png]\nmy cat" in transcript
    assert f"User: [file: cat.txt, {len(notes)} characters]\n{notes}" in transcript
    assert all(m.images == () for r in backend.summaries for m in r.messages)
