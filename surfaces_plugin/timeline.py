"""Reading a working room's timeline back with /messages, and what it says about a conversation.

Used where the plugin database cannot answer: messages sent while the bot was down (catch-up)
and a conversation's history after the database was lost (rebuild). The predicates and the
parse are pure functions of event dicts, newest first as /messages returns them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mautrix.api import Method, Path

from . import layout

if TYPE_CHECKING:
    from .app import Surfaces

PAGE_SIZE = 50

Event = dict[str, Any]


async def read_back(
    app: Surfaces,
    room_id: str,
    stop: Callable[[list[Event]], bool] | None = None,
    max_pages: int = 4,
    page_size: int = PAGE_SIZE,
) -> list[Event]:
    """The room's events, newest first, page by page until `stop(page)`, the start or `max_pages`."""
    events: list[Event] = []
    token: str | None = None
    for _ in range(max_pages):
        query: dict[str, Any] = {"dir": "b", "limit": str(page_size)}
        if token:
            query["from"] = token
        page = await app.gateway.read(
            "read the room's messages",
            lambda q=query: app.client.api.request(
                Method.GET, Path.v3.rooms[room_id].messages, query_params=q
            ),
        )
        chunk = page.get("chunk") or []
        events += chunk
        token = page.get("end")
        if not chunk or not token or (stop is not None and stop(chunk)):
            break
        # A page holding the room's creation reached the start: save a request.
        if any(e.get("type") == "m.room.create" for e in chunk):
            break
    return events


def _content(event: Event) -> dict[str, Any]:
    content = event.get("content")
    return content if isinstance(content, dict) else {}


def _is_edit(content: dict[str, Any]) -> bool:
    relates = content.get("m.relates_to")
    return isinstance(relates, dict) and relates.get("rel_type") == "m.replace"


def _ts(event: Event) -> int:
    ts = event.get("origin_server_ts")
    return ts if isinstance(ts, int) and not isinstance(ts, bool) else 0


def _well_formed(event: object) -> bool:
    """What the homeserver always sends; anything else in a page is skipped, never trusted."""
    return isinstance(event, dict) and isinstance(event.get("event_id"), str)


def is_owner_text(event: Event, owner: str) -> bool:
    if not isinstance(event, dict):
        return False
    content = _content(event)
    return (
        event.get("type") == "m.room.message"
        and event.get("sender") == owner
        and content.get("msgtype") in ("m.text", "m.emote")
        and isinstance(content.get("body"), str)
        and not _is_edit(content)
    )


def is_bot_answer(event: Event, bot_id: str) -> bool:
    if not isinstance(event, dict):
        return False
    content = _content(event)
    return (
        event.get("type") == "m.room.message"
        and event.get("sender") == bot_id
        and layout.TURN_KEY in content
        and not _is_edit(content)
    )


@dataclass(frozen=True)
class TimelineTurn:
    role: str  # "user" | "assistant"
    content: str
    event_id: str
    sender: str
    ts: int


@dataclass(frozen=True)
class TimelineHistory:
    turns: list[TimelineTurn]  # oldest first
    summary: str | None = None
    summary_upto_event_id: str | None = None


def ends_conversation(event: Event, bot_id: str, platform_chat_id: str) -> bool:
    """Read further back than this and the events belong to another conversation (or none)."""
    if not isinstance(event, dict):
        return False
    if event.get("type") == "m.room.create":
        return True
    if event.get("sender") != bot_id:
        return False
    content = _content(event)
    if layout.parse_reset_marker(content) is not None:
        return True
    marker = layout.parse_turn_marker(content)
    return marker is not None and marker.platform_chat_id != platform_chat_id


def history_from_timeline(
    events_newest_first: Sequence[Event],
    *,
    owner: str,
    bot_id: str,
    platform_chat_id: str,
    is_command: Callable[[str], bool],
) -> TimelineHistory:
    """The conversation's turns and latest summary, back to its reset notice or the room start."""
    final_text: dict[str, str] = {}  # answer event id → its latest edit's text
    turns: list[TimelineTurn] = []
    summary: str | None = None
    summary_upto: str | None = None
    for event in events_newest_first:
        if not _well_formed(event):
            continue
        if ends_conversation(event, bot_id, platform_chat_id):
            break
        content = _content(event)
        sender = str(event.get("sender", ""))
        ts = _ts(event)
        if sender == bot_id and event.get("type") == "m.room.message":
            if _is_edit(content):
                target = content["m.relates_to"].get("event_id")
                new = content.get("m.new_content")
                # Newest first: the first edit seen is the latest one.
                if isinstance(target, str) and isinstance(new, dict):
                    final_text.setdefault(target, str(new.get("body", "")))
                continue
            marker = layout.parse_summary_marker(content)
            if marker is not None and marker.platform_chat_id == platform_chat_id:
                if summary is None:
                    summary = summary_text(str(content.get("body", "")))
                    summary_upto = marker.upto_event_id
                continue
            if is_bot_answer(event, bot_id):
                text = final_text.get(event["event_id"], str(content.get("body", "")))
                turns.append(TimelineTurn("assistant", text, event["event_id"], sender, ts))
            continue
        if is_owner_text(event, owner) and not is_command(content["body"]):
            turns.append(TimelineTurn("user", content["body"], event["event_id"], sender, ts))
    turns.reverse()
    return TimelineHistory(turns=turns, summary=summary, summary_upto_event_id=summary_upto)


SUMMARY_TITLE = "**Summary of the earlier conversation**"


def summary_notice_text(summary: str, summarised: int) -> str:
    """The visible summary notice; `summary_text` reads the summary back out of it."""
    return f"{SUMMARY_TITLE} ({summarised} messages)\n\n{summary}"


def summary_text(notice_body: str) -> str:
    return notice_body.partition("\n\n")[2].strip()
