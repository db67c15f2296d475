"""`!ai export`: the room's current conversation as a Markdown file, uploaded into the room."""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING

from mautrix.types import RoomID

from .store.chats import Chat
from .store.messages import Message

if TYPE_CHECKING:
    from .app import Surfaces
    from .chats import WorkingRoom

MIME_TYPE = "text/markdown"


def _when(ms: int | None) -> str:
    if not ms:
        return "unknown"
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ms / 1000))


def filename(title: str, now_ms: int) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:40] or "conversation"
    return f"{slug}-{time.strftime('%Y%m%d-%H%M', time.gmtime(now_ms / 1000))}.md"


def render_markdown(
    room: WorkingRoom,
    agent_name: str,
    chat: Chat | None,
    messages: list[Message],
    now_ms: int,
) -> str:
    """The conversation as Markdown: header, the summary if any, then every turn (pure)."""
    first = messages[0].ts if messages else None
    last = messages[-1].ts if messages else None
    lines = [
        f"# {room.title or 'Conversation'}",
        "",
        f"- Agent: {agent_name} (`{room.agent}`)",
        f"- Owner: {room.owner}",
        f"- Conversation: `{room.platform_chat_id}`",
        f"- Started: {_when(chat.created_ms if chat else first)}",
        f"- Last message: {_when(last)}",
        f"- Exported: {_when(now_ms)}",
        f"- Messages: {len(messages)}",
    ]
    if room.system_prompt is not None:
        lines += ["", "## System prompt (this room's override)", "", room.system_prompt]
    if chat is not None and chat.summary:
        covered = sum(1 for m in messages if m.seq <= (chat.summary_upto_seq or 0))
        lines += [
            "",
            f"## Summary (stands for the first {covered} messages in requests)",
            "",
            chat.summary,
        ]
    lines += ["", "## Conversation"]
    for message in messages:
        who = f"You ({message.sender})" if message.role == "user" else agent_name
        lines += ["", f"### {who} · {_when(message.ts)}", "", message.content]
    return "\n".join(lines) + "\n"


async def export_conversation(app: Surfaces, room: WorkingRoom) -> int:
    """Upload the conversation and post it as a file; returns how many messages it holds."""
    await app.chats.ensure_history(room)
    messages = [
        m
        for m in await app.stores.messages.history(room.platform_chat_id)
        if m.role in ("user", "assistant")
    ]
    if not messages:
        return 0
    chat = await app.stores.chats.get(room.platform_chat_id)
    agent = app.chats.agent_of(room)
    now = int(time.time() * 1000)
    data = render_markdown(room, agent.name, chat, messages, now).encode("utf-8")
    name = filename(room.title, now)
    url = await app.gateway.write(
        "upload the export",
        lambda: app.client.upload_media(data, mime_type=MIME_TYPE, filename=name, size=len(data)),
    )
    await app.send_content(
        RoomID(room.room_id),
        {
            "msgtype": "m.file",
            "body": name,
            "filename": name,
            "url": str(url),
            "info": {"mimetype": MIME_TYPE, "size": len(data)},
        },
    )
    return len(messages)
