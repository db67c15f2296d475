"""Messages sent while the bot was down: maubot drops them, so we read them back with /messages.

A message is missed when the owner sent it after the room's processed mark and after the
message the bot's newest answer answers (answers go in order), within
`reconciliation.catch_up_minutes`. A streamed answer the crash cut off (still `partial`) is
edited to say so, and not answered again. `!ai` commands in the same stretch (and in the DMs
with the bot) that nothing the bot sent names as handled go to `replay_commands`, before the
room's messages are answered: a later scan then still reaches them, so each is answered once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from . import layout, replies
from .commands import split_command
from .config import Settings
from .e2ee import E2EE, session_of
from .history import History
from .jobs import Job
from .matrix import GatewayError, MatrixIO, NotFound, PermissionDenied
from .rooms import RoomDirectory, WorkingRoom
from .store.processed import ProcessedStore
from .timeline import (
    Interrupted,
    Scan,
    UnfinishedToolRun,
    edit_text,
    is_bot_answer,
    is_owner_turn,
    read_back,
    scan_timeline,
    user_turn,
)
from .txn import txn_id

MAX_PAGES = 4  # at most 200 events back per room; older ones are past any sane downtime
COMPACTION_INTERRUPTED = "Compaction was interrupted by a restart."
TOOLS_INTERRUPTED = (
    "*interrupted by a restart: this turn is not run again by itself (its tools would be called "
    "again); send `!{prefix} retry` to run it again*"
)
INTERRUPTED_MARK = "\n\n*(interrupted by a restart; send `!{prefix} retry` for a full answer)*"
# Answers commands (raw events, oldest first) that arrived in a room while the bot was down.
ReplayCommands = Callable[[str, Sequence[dict[str, Any]]], Awaitable[None]]


class CatchUp:
    def __init__(
        self,
        io: MatrixIO,
        rooms: RoomDirectory,
        history: History,
        processed: ProcessedStore,
        e2ee: E2EE,
        settings: Callable[[], Settings],
        log: logging.Logger,
        *,
        replay_commands: ReplayCommands,
    ) -> None:
        self.replay_commands = replay_commands
        self.io = io
        self.rooms = rooms
        self.history = history
        self.e2ee = e2ee
        self.processed = processed
        self.settings = settings
        self.log = log

    async def missed_in_room(self, room: WorkingRoom) -> list[Job]:
        """The room's messages sent while the bot was down, oldest first; [] when none or unreadable."""
        minutes = self.settings().reconciliation.catch_up_minutes
        if minutes <= 0:
            return []
        window_start = int((time.time() - minutes * 60) * 1000)
        try:
            return await self._missed(room, window_start)
        except GatewayError as e:
            self.log.warning("Catch-up skipped %s: %s", room.room_id, e)
            return []

    async def commands_in(self, room_id: str) -> int:
        """Answer the commands sent while the bot was down in a room that is not a working room
        (a DM with the bot); returns how many there were (0 when unreadable)."""
        minutes = self.settings().reconciliation.catch_up_minutes
        if minutes <= 0:
            return 0
        window_start = int((time.time() - minutes * 60) * 1000)

        def reached_window(chunk: list[dict[str, Any]]) -> bool:
            oldest = chunk[-1].get("origin_server_ts", 0)
            return isinstance(oldest, int) and oldest <= window_start

        try:
            events = await read_back(self.io, room_id, stop=reached_window, max_pages=MAX_PAGES)
        except (PermissionDenied, NotFound) as e:  # a DM the user or the bot has left
            self.log.debug("No catch-up of commands in %s: %s", room_id, e)
            return 0
        except GatewayError as e:
            self.log.warning("Catch-up of commands skipped %s: %s", room_id, e)
            return 0
        scan = scan_timeline(events, "", self.io.bot_id, window_start, self._is_command)
        await self.replay_commands(room_id, scan.commands)
        return len(scan.commands)

    def _is_command(self, body: str) -> bool:
        return split_command(body, self.settings().command_prefix) is not None

    async def _missed(self, room: WorkingRoom, window_start: int) -> list[Job]:
        bot = self.io.bot_id
        mark = await self.processed.get(room.room_id)
        after_ts = max(window_start, mark.ts if mark else 0)
        read: list[dict[str, Any]] = []

        def reached_known(chunk: list[dict[str, Any]]) -> bool:
            read.extend(chunk)
            oldest = chunk[-1].get("origin_server_ts", 0)
            if isinstance(oldest, int) and oldest <= after_ts:
                return True
            scan = scan_timeline(read, room.owner, bot, after_ts)
            if scan.answered is not None:  # read on until the message it answers
                return any(e.get("event_id") == scan.answered for e in read)
            return any(is_bot_answer(e, bot) for e in chunk)

        events = await read_back(self.io, room.room_id, stop=reached_known, max_pages=MAX_PAGES)
        is_command = self._is_command
        scan = scan_timeline(events, room.owner, bot, after_ts, is_command)
        if scan.interrupted is not None:
            await self._mark_interrupted(room, scan.interrupted)
        for notice in scan.unfinished_compactions:
            ended = replies.notice(COMPACTION_INTERRUPTED)
            await self.io.edit(room.room_id, notice, ended, txn=txn_id(notice, "compaction ended"))
            self.log.info("Ended the compaction notice %s in %s", notice, room.room_id)
        if events and room.last_activity_ms is None:  # the cache lost it: the timeline dates it
            newest = events[0].get("origin_server_ts")
            if isinstance(newest, int):
                await self.rooms.touch(room, newest)
        recovered, commands = await self._recover(room, scan, is_command)
        # Before the messages are answered: a crash in between must not hide them from a scan.
        await self.replay_commands(room.room_id, sorted([*scan.commands, *commands], key=_ts))
        missed = sorted(scan.missed + recovered, key=_ts)
        cut_off = {run.marker.answers for run in scan.unfinished_tool_runs}
        for run in scan.unfinished_tool_runs:
            await self._end_tool_run(room, run)
        for event in [e for e in missed if e["event_id"] in cut_off]:
            missed.remove(event)  # told above; stored so that `!ai retry` finds it
            text, attachment = _turn(event)
            text = scan.transcripts.get(event["event_id"], text)
            await self.history.add_user_turn(
                room, event["event_id"], event["sender"], text, _ts(event), attachment
            )
            await self.history.mark_processed(room, event["event_id"], _ts(event))
        jobs = [
            Job(
                room_id=room.room_id,
                event_id=e["event_id"],
                sender=e["sender"],
                body=_turn(e)[0],
                ts=int(e.get("origin_server_ts", 0)),
                attachment=_turn(e)[1],
                transcript=scan.transcripts.get(e["event_id"]),  # shown: not transcribed again
            )
            for e in missed
            if not (mark and e["event_id"] == mark.event_id)
        ]
        edit = _regeneration(room, scan, is_command)
        # In the order sent: the worker decides, as live, whether it still edits the last message.
        return jobs if edit is None else sorted([*jobs, edit], key=lambda job: job.ts)

    async def _recover(
        self, room: WorkingRoom, scan: Scan, is_command: Callable[[str], bool]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Missed messages and commands the bot had no key for: (messages, commands) whose key
        comes now; the rest are told once."""
        recovered: list[dict[str, Any]] = []
        commands: list[dict[str, Any]] = []
        lost: list[dict[str, Any]] = []
        missing: set[str] = set()  # sessions whose key did not come: ask once per session
        for raw in scan.undecryptable:
            session = session_of(raw)
            event = None if session in missing else await self.e2ee.recover(room.room_id, raw)
            if event is None:
                missing.add(session)
                lost.append(raw)
            elif is_owner_turn(event, room.owner):
                text, attachment = _turn(event)
                (commands if attachment is None and is_command(text) else recovered).append(event)
        await self.e2ee.tell_undecryptable(room.room_id, lost, scan.noticed_sessions)
        return recovered, commands

    async def _end_tool_run(self, room: WorkingRoom, run: UnfinishedToolRun) -> None:
        """Say on the tool notice that a restart cut the turn off (once: the edit sets `done`)."""
        was = run.marker
        note = TOOLS_INTERRUPTED.format(prefix=self.settings().command_prefix)
        body = str(run.content.get("body", "")).rstrip()
        marker = layout.tools_marker(
            was.platform_chat_id, was.agent, was.steps, answers=was.answers, done=True
        )
        content = replies.notice(f"{body}\n{note}" if body else note, marker)
        await self.io.edit(room.room_id, run.event_id, content, txn_id(run.event_id, "tools cut"))
        self.log.info(
            "Ended the tool run %s in %s (cut off by a restart)", run.event_id, room.room_id
        )

    async def _mark_interrupted(self, room: WorkingRoom, cut: Interrupted) -> None:
        """Say in the answer itself that it was cut off (once: the edit drops `partial`)."""
        text = cut.text + INTERRUPTED_MARK.format(prefix=self.settings().command_prefix)
        was = cut.marker
        marker = layout.turn_marker(
            was.platform_chat_id,
            was.agent,
            answers=was.answers,
            continues=was.continues,
            revision=was.revision,  # an edit answered before the crash is not answered again
        )
        content = replies.rendered(text, "m.text", marker)
        # Keyed by the answer: if a crash comes before the edit is seen, the next start's is one.
        await self.io.edit(room.room_id, cut.event_id, content, txn_id(cut.event_id, "interrupted"))
        self.log.info("Marked the answer %s in %s as interrupted", cut.event_id, room.room_id)
        if cut.marker.platform_chat_id == room.platform_chat_id:
            await self.history.ensure(room)  # after a lost cache: rebuild before adding
            await self.history.add_answer(room, text, cut.event_id, None)


def _turn(event: dict[str, Any]) -> tuple[str, layout.Attachment | None]:
    """(text, attachment) of a missed message: scan_timeline only lists text or media."""
    turn = user_turn(event)
    assert turn is not None
    return turn


def _regeneration(room: WorkingRoom, scan: Scan, is_command: Callable[[str], bool]) -> Job | None:
    """The answered message again, with its new text: the owner edited it while the bot was down."""
    edit = scan.edit
    text = edit_text(edit, is_command)
    if edit is None or text is None or scan.answered is None:
        return None
    return Job(
        room_id=room.room_id,
        event_id=scan.answered,
        sender=room.owner,
        body=text,
        ts=_ts(edit),
        regenerate=edit["event_id"],
        edited=True,
    )


def _ts(event: dict[str, Any]) -> int:
    ts = event.get("origin_server_ts")
    return ts if isinstance(ts, int) else 0
