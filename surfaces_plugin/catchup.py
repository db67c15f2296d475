"""Messages sent while the bot was down: maubot drops them, so we read them back with /messages.

A message is missed when the owner sent it after the room's processed mark and after the
bot's newest answer (answers go in order), within `reconciliation.catch_up_minutes`.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from mautrix.api import Method, Path

from . import layout
from .matrix import GatewayError

if TYPE_CHECKING:
    from .app import Surfaces
    from .chats import WorkingRoom
    from .dispatch import Job

PAGE_SIZE = 50
MAX_PAGES = 4  # at most 200 events back per room; older ones are past any sane downtime


def is_owner_text(event: dict[str, Any], owner: str) -> bool:
    content = event.get("content") or {}
    relates = content.get("m.relates_to") or {}
    return (
        event.get("type") == "m.room.message"
        and event.get("sender") == owner
        and content.get("msgtype") in ("m.text", "m.emote")
        and isinstance(content.get("body"), str)
        and relates.get("rel_type") != "m.replace"
    )


def is_bot_answer(event: dict[str, Any], bot_id: str) -> bool:
    content = event.get("content") or {}
    return (
        event.get("type") == "m.room.message"
        and event.get("sender") == bot_id
        and layout.TURN_KEY in content
        and (content.get("m.relates_to") or {}).get("rel_type") != "m.replace"
    )


def missed_in_timeline(
    events_newest_first: list[dict[str, Any]], owner: str, bot_id: str, after_ts: int
) -> list[dict[str, Any]]:
    """Owner messages newer than the bot's last answer and `after_ts`, oldest first (pure)."""
    missed: list[dict[str, Any]] = []
    for event in events_newest_first:
        if is_bot_answer(event, bot_id) or int(event.get("origin_server_ts", 0)) <= after_ts:
            break
        if is_owner_text(event, owner):
            missed.append(event)
    missed.reverse()
    return missed


async def _room_missed(app: Surfaces, room: WorkingRoom, window_start: int) -> list[Job]:
    from .dispatch import Job

    mark = await app.stores.processed.get(room.room_id)
    after_ts = max(window_start, mark.ts if mark else 0)
    events: list[dict[str, Any]] = []
    token: str | None = None
    for _ in range(MAX_PAGES):
        query: dict[str, Any] = {"dir": "b", "limit": str(PAGE_SIZE)}
        if token:
            query["from"] = token
        page = await app.gateway.read(
            "read recent messages",
            lambda q=query: app.client.api.request(
                Method.GET, Path.v3.rooms[room.room_id].messages, query_params=q
            ),
        )
        chunk = page.get("chunk") or []
        events += chunk
        token = page.get("end")
        oldest = int(chunk[-1].get("origin_server_ts", 0)) if chunk else 0
        reached_answer = any(is_bot_answer(e, app.bot_id) for e in chunk)
        if not chunk or not token or oldest <= after_ts or reached_answer:
            break
    return [
        Job(
            room_id=room.room_id,
            event_id=e["event_id"],
            sender=e["sender"],
            body=e["content"]["body"],
            ts=int(e.get("origin_server_ts", 0)),
        )
        for e in missed_in_timeline(events, room.owner, app.bot_id, after_ts)
        if not (mark and e["event_id"] == mark.event_id)
    ]


async def find_missed(app: Surfaces, rooms: list[WorkingRoom]) -> list[Job]:
    minutes = app.settings.reconciliation.catch_up_minutes
    if minutes <= 0:
        return []
    window_start = int((time.time() - minutes * 60) * 1000)
    slots = asyncio.Semaphore(app.settings.reconciliation.concurrency)

    async def one(room: WorkingRoom) -> list[Job]:
        async with slots:
            try:
                return await _room_missed(app, room, window_start)
            except GatewayError as e:
                app.log.warning("Catch-up skipped %s: %s", room.room_id, e)
                return []

    per_room = await asyncio.gather(*(one(room) for room in rooms))
    return [job for jobs in per_room for job in jobs]
