"""Messages sent while the bot was down: maubot drops them, so we read them back with /messages.

A message is missed when the owner sent it after the room's processed mark and after the
bot's newest answer (answers go in order), within `reconciliation.catch_up_minutes`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .commands import split_command
from .matrix import GatewayError
from .timeline import is_bot_answer, is_owner_text, read_back

if TYPE_CHECKING:
    from .app import Surfaces
    from .chats import WorkingRoom
    from .dispatch import Job

MAX_PAGES = 4  # at most 200 events back per room; older ones are past any sane downtime


def missed_in_timeline(
    events_newest_first: list[dict[str, Any]],
    owner: str,
    bot_id: str,
    after_ts: int,
    is_command: Callable[[str], bool] = lambda body: False,
) -> list[dict[str, Any]]:
    """Owner messages newer than the bot's last answer and `after_ts`, oldest first (pure).

    Commands are left out: they are not turns for the agent.
    """
    missed: list[dict[str, Any]] = []
    for event in events_newest_first:
        if is_bot_answer(event, bot_id) or int(event.get("origin_server_ts", 0)) <= after_ts:
            break
        if is_owner_text(event, owner) and not is_command(event["content"]["body"]):
            missed.append(event)
    missed.reverse()
    return missed


async def _room_missed(app: Surfaces, room: WorkingRoom, window_start: int) -> list[Job]:
    from .dispatch import Job

    mark = await app.stores.processed.get(room.room_id)
    after_ts = max(window_start, mark.ts if mark else 0)

    def reached_known(chunk: list[dict[str, Any]]) -> bool:
        oldest = int(chunk[-1].get("origin_server_ts", 0))
        return oldest <= after_ts or any(is_bot_answer(e, app.bot_id) for e in chunk)

    events = await read_back(app, room.room_id, stop=reached_known, max_pages=MAX_PAGES)
    return [
        Job(
            room_id=room.room_id,
            event_id=e["event_id"],
            sender=e["sender"],
            body=e["content"]["body"],
            ts=int(e.get("origin_server_ts", 0)),
        )
        for e in missed_in_timeline(
            events,
            room.owner,
            app.bot_id,
            after_ts,
            lambda body: split_command(body, app.settings.command_prefix) is not None,
        )
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
