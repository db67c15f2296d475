"""Messages sent while the bot was down: maubot drops them, so we read them back with /messages.

A message is missed when the owner sent it after the room's processed mark and after the
message the bot's newest answer answers (answers go in order), within
`reconciliation.catch_up_minutes`. A streamed answer the crash cut off (still `partial`) is
edited to say so, and not answered again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mautrix.types import RoomID

from . import layout, replies
from .commands import split_command
from .matrix import GatewayError
from .timeline import is_bot_answer, is_owner_text, read_back

if TYPE_CHECKING:
    from .app import Surfaces
    from .chats import WorkingRoom
    from .dispatch import Job

MAX_PAGES = 4  # at most 200 events back per room; older ones are past any sane downtime
INTERRUPTED_MARK = "\n\n*(interrupted by a restart; send `!{prefix} retry` for a full answer)*"


@dataclass(frozen=True)
class Interrupted:
    """A streamed answer cut off by a crash: its latest version still says `partial`."""

    event_id: str
    text: str
    marker: layout.TurnMarker


@dataclass(frozen=True)
class Scan:
    missed: list[dict[str, Any]]  # oldest first
    interrupted: Interrupted | None = None
    answered: str | None = None  # the user message the bot's newest answer answers


def _edit_target(event: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    content = event.get("content")
    if not isinstance(content, dict):
        return None
    relates, new = content.get("m.relates_to"), content.get("m.new_content")
    if not (isinstance(relates, dict) and relates.get("rel_type") == "m.replace"):
        return None
    target = relates.get("event_id")
    if not isinstance(target, str) or not isinstance(new, dict):
        return None
    return target, new


def scan_timeline(
    events_newest_first: list[dict[str, Any]],
    owner: str,
    bot_id: str,
    after_ts: int,
    is_command: Callable[[str], bool] = lambda body: False,
) -> Scan:
    """What catch-up must do, from the room's newest events back (pure, never raises).

    Owner messages after the one the bot's newest answer answers (or after that answer, when
    it does not say) and newer than `after_ts` are missed; commands are not turns. When that
    answer's latest version is still partial, the bot died while streaming it.
    """
    missed: list[dict[str, Any]] = []
    newest_edit: dict[str, dict[str, Any]] = {}  # answer id -> its latest m.new_content
    interrupted: Interrupted | None = None
    answered: str | None = None
    for event in events_newest_first:
        if not isinstance(event, dict):
            continue
        if answered is not None and event.get("event_id") == answered:
            break
        ts = event.get("origin_server_ts")
        if isinstance(ts, int) and ts <= after_ts:
            break
        if answered is None and event.get("sender") == bot_id:
            edit = _edit_target(event)
            if edit is not None:
                newest_edit.setdefault(*edit)  # newest first: the first edit seen is the latest
                continue
        if answered is None and is_bot_answer(event, bot_id):
            latest = newest_edit.get(str(event.get("event_id")), event.get("content"))
            marker = layout.parse_turn_marker(latest)
            if marker is not None and marker.partial:
                body = latest.get("body") if isinstance(latest, dict) else None
                interrupted = Interrupted(
                    str(event.get("event_id")), body if isinstance(body, str) else "", marker
                )
            first = layout.parse_turn_marker(event.get("content"))
            if first is None or first.answers is None:
                break  # an older answer that does not say what it answers: stop here
            answered = first.answers
            continue
        if is_owner_text(event, owner) and not is_command(event["content"]["body"]):
            missed.append(event)
    missed.reverse()
    return Scan(missed=missed, interrupted=interrupted, answered=answered)


def missed_in_timeline(
    events_newest_first: list[dict[str, Any]],
    owner: str,
    bot_id: str,
    after_ts: int,
    is_command: Callable[[str], bool] = lambda body: False,
) -> list[dict[str, Any]]:
    """Owner messages the bot has not answered, oldest first (see `scan_timeline`)."""
    return scan_timeline(events_newest_first, owner, bot_id, after_ts, is_command).missed


async def _room_missed(app: Surfaces, room: WorkingRoom, window_start: int) -> list[Job]:
    from .dispatch import Job

    mark = await app.stores.processed.get(room.room_id)
    after_ts = max(window_start, mark.ts if mark else 0)
    read: list[dict[str, Any]] = []

    def reached_known(chunk: list[dict[str, Any]]) -> bool:
        read.extend(chunk)
        oldest = chunk[-1].get("origin_server_ts", 0)
        if isinstance(oldest, int) and oldest <= after_ts:
            return True
        scan = scan_timeline(read, room.owner, app.bot_id, after_ts)
        if scan.answered is not None:  # read on until the message it answers
            return any(e.get("event_id") == scan.answered for e in read)
        return any(is_bot_answer(e, app.bot_id) for e in chunk)

    events = await read_back(app, room.room_id, stop=reached_known, max_pages=MAX_PAGES)
    prefix = app.settings.command_prefix
    scan = scan_timeline(
        events,
        room.owner,
        app.bot_id,
        after_ts,
        lambda body: split_command(body, prefix) is not None,
    )
    if scan.interrupted is not None:
        await _mark_interrupted(app, room, scan.interrupted)
    if events and room.last_activity_ms is None:  # the cache lost it: the timeline dates it
        newest = events[0].get("origin_server_ts")
        if isinstance(newest, int):
            await app.chats.touch(room, newest)
    return [
        Job(
            room_id=room.room_id,
            event_id=e["event_id"],
            sender=e["sender"],
            body=e["content"]["body"],
            ts=int(e.get("origin_server_ts", 0)),
        )
        for e in scan.missed
        if not (mark and e["event_id"] == mark.event_id)
    ]


async def _mark_interrupted(app: Surfaces, room: WorkingRoom, cut: Interrupted) -> None:
    """Say in the answer itself that it was cut off (once: the edit drops `partial`)."""
    text = cut.text + INTERRUPTED_MARK.format(prefix=app.settings.command_prefix)
    marker = layout.turn_marker(
        cut.marker.platform_chat_id, cut.marker.agent, answers=cut.marker.answers
    )
    new = replies.rendered(text, "m.text", marker)
    await app.send_content(RoomID(room.room_id), replies.edit(cut.event_id, new))
    app.log.info("Marked the answer %s in %s as interrupted", cut.event_id, room.room_id)
    if cut.marker.platform_chat_id == room.platform_chat_id:
        await app.chats.ensure_history(room)  # after a lost cache: rebuild before adding
        await app.chats.add_answer(room, text, cut.event_id, None)


async def missed_in_room(app: Surfaces, room: WorkingRoom) -> list[Job]:
    """The room's messages sent while the bot was down, oldest first; [] when none or unreadable."""
    minutes = app.settings.reconciliation.catch_up_minutes
    if minutes <= 0:
        return []
    window_start = int((time.time() - minutes * 60) * 1000)
    try:
        return await _room_missed(app, room, window_start)
    except GatewayError as e:
        app.log.warning("Catch-up skipped %s: %s", room.room_id, e)
        return []
