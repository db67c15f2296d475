"""The one reader of room history: /messages page by page, and what the events say.

Used where the plugin database cannot answer: messages sent while the bot was down (catch-up,
`scan_timeline`) and a conversation's history after the database was lost (rebuild,
`history_from_timeline`). Both follow edits the same way (`latest_edits`). The predicates and
the parses are pure functions of event dicts, newest first as /messages returns them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from mautrix.api import Method, Path

from . import e2ee, layout
from .matrix import MatrixIO

PAGE_SIZE = 50

Event = dict[str, Any]


async def read_back(
    io: MatrixIO,
    room_id: str,
    stop: Callable[[list[Event]], bool] | None = None,
    max_pages: int = 4,
    page_size: int = PAGE_SIZE,
) -> list[Event]:
    """The room's events, newest first, page by page until `stop(page)`, the start or `max_pages`.

    Encrypted events come back decrypted where the bot holds the key (`e2ee.readable`); the
    others stay `m.room.encrypted` (`e2ee.is_undecryptable`).
    """
    events: list[Event] = []
    token: str | None = None
    for _ in range(max_pages):
        query: dict[str, Any] = {"dir": "b", "limit": str(page_size)}
        if token:
            query["from"] = token
        page = await io.gateway.read(
            "read the room's messages",
            lambda q=query: io.client.api.request(
                Method.GET, Path.v3.rooms[room_id].messages, query_params=q
            ),
        )
        chunk = await e2ee.readable(io, room_id, page.get("chunk") or [])
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


def edit_target(event: Event) -> tuple[str, dict[str, Any]] | None:
    """(the edited event's id, its new content) when `event` is a well-formed edit."""
    content = _content(event)
    new = content.get("m.new_content")
    if not _is_edit(content) or not isinstance(new, dict):
        return None
    target = content["m.relates_to"].get("event_id")
    return (target, new) if isinstance(target, str) else None


def note_edit(latest: dict[str, dict[str, Any]], event: Event, sender: str) -> bool:
    """Record an edit by `sender` in `latest` (edited id → newest new content); True if it was one.

    Events come newest first, so the first edit seen of an event is its latest version.
    """
    if event.get("sender") != sender:
        return False
    edit = edit_target(event)
    if edit is None:
        return _is_edit(_content(event))  # a malformed edit is still not a message
    latest.setdefault(*edit)
    return True


def event_ts(event: Event) -> int:
    """The event's origin_server_ts; 0 when it has none that is a whole number."""
    ts = event.get("origin_server_ts")
    return ts if isinstance(ts, int) and not isinstance(ts, bool) else 0


def _well_formed(event: object) -> bool:
    """What the homeserver always sends; anything else in a page is skipped, never trusted."""
    return isinstance(event, dict) and isinstance(event.get("event_id"), str)


def has_text(body: object) -> TypeGuard[str]:
    """A message body there is something to answer in: a string, not only whitespace.

    A remote server may send a number, an object or null as the body; live (app.py) and read
    back (here), such a message is ignored the same way.
    """
    return isinstance(body, str) and bool(body.strip())


def is_text(event: Event) -> bool:
    """A text message someone wrote (not an edit): what the live path routes."""
    if not _well_formed(event):
        return False
    content = _content(event)
    return (
        event.get("type") == "m.room.message"
        and content.get("msgtype") in ("m.text", "m.emote")
        and has_text(content.get("body"))
        and not _is_edit(content)
    )


def is_owner_text(event: Event, owner: str) -> bool:
    return is_text(event) and event.get("sender") == owner


def attachment_of(event: Event) -> layout.Attachment | None:
    """The attachment of an image, file or voice message someone sent (not an edit)."""
    if not _well_formed(event) or event.get("type") != "m.room.message":
        return None
    return layout.parse_attachment(_content(event))


def user_turn(event: Event) -> tuple[str, layout.Attachment | None] | None:
    """(the turn's text, its attachment) of a text or media message; None for anything else."""
    if is_text(event):
        return event["content"]["body"], None
    attachment = attachment_of(event)
    return (attachment.turn_text, attachment) if attachment is not None else None


def is_owner_turn(event: Event, owner: str) -> bool:
    """A message of the owner that can be a turn: text (commands included) or media."""
    return event.get("sender") == owner and user_turn(event) is not None


def is_redacted(event: Event) -> bool:
    """A message the homeserver redacted: its content is gone (`unsigned` says by what)."""
    unsigned = event.get("unsigned")
    if isinstance(unsigned, dict) and "redacted_because" in unsigned:
        return True
    return event.get("type") == "m.room.message" and not _content(event)


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


def new_text(new_content: dict[str, Any] | None, is_command: Callable[[str], bool]) -> str | None:
    """The text an owner's edit gives their message; None when it has none, or is a command
    (an edit never turns a message into a command)."""
    new = new_content.get("body") if new_content else None
    return new if has_text(new) and not is_command(new) else None


def edit_text(edit: Event | None, is_command: Callable[[str], bool]) -> str | None:
    """`new_text` of an edit event."""
    target = edit_target(edit) if edit is not None else None
    return new_text(target[1] if target is not None else None, is_command)


def note_owner_edit(
    edits: dict[str, Event], event: Event, owner: str, is_command: Callable[[str], bool]
) -> bool:
    """Record the owner's edit in `edits` (message id → its newest edit with new text, as the
    live path answers them); True if `event` is an edit by the owner (used or not)."""
    if not owner or event.get("sender") != owner or not _is_edit(_content(event)):
        return False
    target = edit_target(event)
    if target is not None and edit_text(event, is_command) is not None:
        edits.setdefault(target[0], event)  # newest first: the first one seen is the latest
    return True


@dataclass(frozen=True)
class TimelineTurn:
    role: str  # "user" | "assistant" | "tools" (content: the tool run's JSON record)
    content: str
    event_id: str
    sender: str
    ts: int
    attachment: layout.Attachment | None = None  # a user turn's image or file


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
    """The conversation's turns and latest summary, back to its reset notice or the room start.

    Redacted messages of the owner have no text left, and their answers are left out too. The
    owner's messages say what their latest edit says, as the regenerated answers assume.
    """
    latest: dict[str, dict[str, Any]] = {}  # answer id → its latest edit's content
    edited: dict[str, Event] = {}  # owner message id → its latest edit
    retracted = {
        e["event_id"]
        for e in events_newest_first
        if _well_formed(e) and e.get("sender") == owner and is_redacted(e)
    }
    turns: list[TimelineTurn] = []
    transcripts: dict[str, str] = {}  # voice message id → what the bot heard (newer: seen first)
    summary: str | None = None
    summary_upto: str | None = None
    continued_by_newer: str | None = None  # the message the last turn read says it continues
    for event in events_newest_first:
        if not _well_formed(event):
            continue
        if ends_conversation(event, bot_id, platform_chat_id):
            break
        content = _content(event)
        sender = str(event.get("sender", ""))
        ts = event_ts(event)
        if note_owner_edit(edited, event, owner, is_command):
            continue
        if sender == bot_id and event.get("type") == "m.room.message":
            if note_edit(latest, event, bot_id):
                continue
            heard = layout.parse_transcript(content)
            if heard is not None:
                transcripts.setdefault(heard.of, heard.text)
                continue
            tools = layout.parse_tools_marker(latest.get(event["event_id"], content))
            if tools is not None:
                if (
                    tools.done
                    and tools.platform_chat_id == platform_chat_id
                    and tools.answers not in retracted
                ):
                    record = json.dumps(tools.steps)
                    turns.append(TimelineTurn("tools", record, event["event_id"], sender, ts))
                continue  # a run a crash cut off is not history: catch-up tells the room
            marker = layout.parse_summary_marker(content)
            if marker is not None and marker.platform_chat_id == platform_chat_id:
                if summary is None:
                    summary = summary_text(str(content.get("body", "")))
                    summary_upto = marker.upto_event_id
                continue
            if is_bot_answer(event, bot_id):
                first = layout.parse_turn_marker(content)
                if first is not None and first.answers in retracted:
                    continue  # as when the redaction arrived live (History.forget_user_turn)
                final = latest.get(event["event_id"], content)
                text = str(final.get("body", ""))
                if event["event_id"] == continued_by_newer and turns:
                    # The earlier part of an answer too long for one message: one turn, whose
                    # id is the first message's, as the live path stores it.
                    text += turns.pop().content
                turns.append(TimelineTurn("assistant", text, event["event_id"], sender, ts))
                marker = layout.parse_turn_marker(content)
                continued_by_newer = marker.continues if marker is not None else None
            continue
        turn = user_turn(event) if sender == owner else None
        if turn is not None and (turn[1] is not None or not is_command(turn[0])):
            text, attachment = turn
            if attachment is None:  # the owner's latest edit of a text message
                text = edit_text(edited.get(event["event_id"]), is_command) or text
            text = transcripts.get(event["event_id"], text)  # a voice message: what was heard
            turns.append(TimelineTurn("user", text, event["event_id"], sender, ts, attachment))
            continued_by_newer = None
    turns.reverse()
    return TimelineHistory(turns=turns, summary=summary, summary_upto_event_id=summary_upto)


SUMMARY_TITLE = "**Summary of the earlier conversation**"


def summary_notice_text(summary: str, summarised: int) -> str:
    """The visible summary notice; `summary_text` reads the summary back out of it."""
    return f"{SUMMARY_TITLE} ({summarised} messages)\n\n{summary}"


def summary_text(notice_body: str) -> str:
    return notice_body.partition("\n\n")[2].strip()


@dataclass(frozen=True)
class Interrupted:
    """A streamed answer cut off by a crash: its latest version still says `partial`."""

    event_id: str
    text: str
    marker: layout.TurnMarker


@dataclass(frozen=True)
class UnfinishedToolRun:
    """A turn's tool notice a crash left running (`done` never set): its latest content."""

    event_id: str
    content: dict[str, Any]
    marker: layout.ToolsMarker


@dataclass(frozen=True)
class Scan:
    missed: list[Event]  # oldest first
    interrupted: Interrupted | None = None
    answered: str | None = None  # the user message the bot's newest answer answers
    unfinished_compactions: tuple[str, ...] = ()  # "Compacting…" notices no edit ever ended
    undecryptable: tuple[Event, ...] = ()  # owner messages the bot has no key for, oldest first
    noticed_sessions: frozenset[str] = frozenset()  # sessions the bot already said it cannot read
    unfinished_tool_runs: tuple[UnfinishedToolRun, ...] = ()
    commands: tuple[Event, ...] = ()  # `!ai` commands (anyone's) nothing was sent for, oldest first
    # The owner's newest edit of the answered message that no version of its answer was made
    # for (an edit sent while the bot was down): that message is answered again, once.
    edit: Event | None = None
    transcripts: dict[str, str] = field(default_factory=dict)  # voice message id → shown transcript


def scan_timeline(
    events_newest_first: list[Event],
    owner: str,
    bot_id: str,
    after_ts: int,
    is_command: Callable[[str], bool] = lambda body: False,
) -> Scan:
    """What catch-up must do, from the room's newest events back (pure, never raises).

    Owner messages after the one the bot's newest answer answers (or after that answer, when
    it does not say) and newer than `after_ts` are missed; commands are not turns. When that
    answer's latest version is still partial, the bot died while streaming it. Commands in the
    same stretch, from anyone but the bot, are left for catch-up unless something the bot sent
    (or edited) names them as handled (`layout.parse_command_marker`). The owner's edits are
    followed: a missed message says its latest text, and an edit of the answered message newer
    than its answer that the answer's latest version was not regenerated for (its marker's
    `revision`) is `edit`.
    """
    missed: list[Event] = []
    latest: dict[str, dict[str, Any]] = {}  # answer id → its latest edit's content
    interrupted: Interrupted | None = None
    answered: str | None = None
    unfinished: list[str] = []
    undecryptable: list[Event] = []
    noticed: set[str] = set()
    tool_runs: list[UnfinishedToolRun] = []
    commands: list[Event] = []
    handled: set[str] = set()  # commands something the bot sent names
    owner_edits: dict[str, Event] = {}  # owner message id → its newest edit event
    revised_for: str | None = None  # the edit the newest answer's latest version was made for
    # The owner's edits newer than the newest answer; older ones were there when it was made.
    edits_after_answer: dict[str, Event] = {}
    transcripts: dict[str, str] = {}
    for event in events_newest_first:
        if not isinstance(event, dict):
            continue
        if answered is not None and event.get("event_id") == answered:
            break
        ts = event.get("origin_server_ts")
        if isinstance(ts, int) and ts <= after_ts:
            break
        if event.get("sender") == bot_id:
            command = layout.parse_command_marker(event.get("content"))
            if command is not None:
                handled.add(command)
            heard = layout.parse_transcript(event.get("content"))
            if heard is not None:
                transcripts.setdefault(heard.of, heard.text)
                continue
        if note_edit(latest, event, bot_id):
            continue
        if _well_formed(event) and note_owner_edit(owner_edits, event, owner, is_command):
            continue
        if (
            event.get("sender") == bot_id
            and layout.is_compacting_notice(event.get("content"))
            and str(event.get("event_id")) not in latest
        ):
            unfinished.append(str(event.get("event_id")))
            continue
        if event.get("sender") == bot_id and _well_formed(event):
            current = latest.get(event["event_id"], _content(event))
            tools = layout.parse_tools_marker(current)
            if tools is not None:
                if not tools.done:
                    tool_runs.append(UnfinishedToolRun(event["event_id"], current, tools))
                continue
        if answered is None and is_bot_answer(event, bot_id):
            current = latest.get(str(event.get("event_id")), event.get("content"))
            marker = layout.parse_turn_marker(current)
            revised_for = marker.revision if marker is not None else None
            edits_after_answer = dict(owner_edits)
            if marker is not None and marker.partial:
                body = current.get("body") if isinstance(current, dict) else None
                interrupted = Interrupted(
                    str(event.get("event_id")), body if isinstance(body, str) else "", marker
                )
            first = layout.parse_turn_marker(event.get("content"))
            if first is None or first.answers is None:
                break  # an older answer that does not say what it answers: stop here
            answered = first.answers
            continue
        session = e2ee.noticed_session(event, bot_id)
        if session is not None:
            noticed.add(session)
            continue
        if e2ee.is_undecryptable(event) and event.get("sender") == owner and _well_formed(event):
            undecryptable.append(event)
            continue
        if event.get("sender") == owner and attachment_of(event) is not None:
            missed.append(event)  # an image or file: never a command
            continue
        if not is_text(event) or event.get("sender") == bot_id:
            continue
        if is_command(event["content"]["body"]):
            if event["event_id"] not in handled:  # its reply would be newer: seen already
                commands.append(event)
        elif event.get("sender") == owner:
            missed.append(event)
    missed.reverse()
    undecryptable.reverse()
    commands.reverse()
    missed = [_as_edited(e, owner_edits.get(e["event_id"]), is_command) for e in missed]
    edit = edits_after_answer.get(answered) if answered is not None else None
    if edit is not None and edit["event_id"] == revised_for:
        edit = None
    return Scan(
        edit=edit,
        missed=missed,
        interrupted=interrupted,
        answered=answered,
        unfinished_compactions=tuple(unfinished),
        undecryptable=tuple(undecryptable),
        noticed_sessions=frozenset(noticed),
        unfinished_tool_runs=tuple(tool_runs),
        commands=tuple(commands),
        transcripts=transcripts,
    )


def _as_edited(event: Event, edit: Event | None, is_command: Callable[[str], bool]) -> Event:
    """A missed message as its latest edit says it (answered once, with the newest text)."""
    text = edit_text(edit, is_command)
    return event if text is None else {**event, "content": {**_content(event), "body": text}}
