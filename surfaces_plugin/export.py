"""`!ai export`: the room's current conversation as a Markdown file, uploaded into the room."""

from __future__ import annotations

import re
import time
from typing import Any

from .clock import now_ms, utc_text
from .context_builder import ContextBuilder
from .e2ee import E2EE
from .history import History
from .layout import Attachment
from .matrix import MatrixIO
from .rooms import WorkingRoom
from .store.chats import Chat
from .store.messages import Message
from .tool_runs import ToolRun

MIME_TYPE = "text/markdown"


def _when(ms: int | None) -> str:
    return utc_text(ms, never="unknown")


def filename(title: str, at_ms: int) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:40] or "conversation"
    return f"{slug}-{time.strftime('%Y%m%d-%H%M', time.gmtime(at_ms / 1000))}.md"


def attachment_line(attachment: Attachment) -> str:
    """An attachment by name and link (the bytes stay in the media repository)."""
    sealed = ", encrypted" if attachment.encrypted else ""
    return f"Attachment ({attachment.kind}): {attachment.name} <{attachment.mxc}>{sealed}"


def render_markdown(
    room: WorkingRoom,
    agent_name: str,
    chat: Chat | None,
    messages: list[Message],
    at_ms: int,
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
        f"- Exported: {_when(at_ms)}",
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
        if message.role == "tools":
            run = ToolRun.loads(message.content)
            calls = run.transcript() if run is not None else "(tool calls)"
            lines += ["", f"### {agent_name} used tools · {_when(message.ts)}", "", calls]
            continue
        who = f"You ({message.sender})" if message.role == "user" else agent_name
        lines += ["", f"### {who} · {_when(message.ts)}", "", message.content]
        if message.attachment is not None:
            lines += ["", attachment_line(message.attachment)]
    return "\n".join(lines) + "\n"


async def export_conversation(
    io: MatrixIO,
    e2ee: E2EE,
    history: History,
    context: ContextBuilder,
    room: WorkingRoom,
    handled: dict[str, Any] | None = None,
) -> int:
    """Upload the conversation and post it as a file; returns how many messages it holds.

    In an encrypted room the file is an encrypted attachment: the media repository never holds
    the plaintext. `handled`: keys to merge into the file message (the `!ai export` it answers)."""
    chat, messages = await history.all_turns(room)
    if not messages:
        return 0
    agent = context.agent_of(room)
    now = now_ms()
    data = render_markdown(room, agent.name, chat, messages, now).encode("utf-8")
    name = filename(room.title, now)
    media = await e2ee.upload(room.room_id, data, MIME_TYPE, name)
    await io.send_content(
        room.room_id,
        {
            "msgtype": "m.file",
            "body": name,
            "filename": name,
            **media,
            "info": {"mimetype": MIME_TYPE, "size": len(data)},
            **(handled or {}),
        },
    )
    return len(messages)
