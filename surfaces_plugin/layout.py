"""The Matrix layout (docs/layout.md) in one place: event types, parsing, createRoom payloads.

Every parser takes untrusted JSON and returns a frozen value or `None`; none of them raises.
Every `to_content`/builder returns plain JSON-ready dicts, so callers never hand-write keys.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Any, Literal, TypeVar
from urllib.parse import quote

from mautrix.types import EventType, RoomCreatePreset

NAMESPACE = "org.surfaces"
LAYOUT_VERSION = 1

# Keys inside m.room.create content (the immutable identity markers).
KIND_KEY = f"{NAMESPACE}.kind"
OWNER_KEY = f"{NAMESPACE}.owner"
VERSION_KEY = f"{NAMESPACE}.v"

# Custom event types and content keys.
BINDING_TYPE = f"{NAMESPACE}.binding"
MEMORY_TYPE = f"{NAMESPACE}.memory"
ACCESS_TYPE = f"{NAMESPACE}.access"
TURN_KEY = f"{NAMESPACE}.turn"
RESET_KEY = f"{NAMESPACE}.reset"
SUMMARY_KEY = f"{NAMESPACE}.summary"
COMPACTING_KEY = f"{NAMESPACE}.compacting"
TOOLS_KEY = f"{NAMESPACE}.tools"
COMMAND_KEY = f"{NAMESPACE}.command"
TRANSCRIPT_KEY = f"{NAMESPACE}.transcript"
VOICE_FLAG_KEY = "org.matrix.msc3245.voice"  # marks an m.audio as a voice message (MSC3245)
# MSC4357 (live messages): on a streamed answer's first post and intermediate edits, not its last.
LIVE_KEY = "org.matrix.msc4357.live"

BINDING = EventType.find(BINDING_TYPE, EventType.Class.STATE)
MEMORY = EventType.find(MEMORY_TYPE, EventType.Class.STATE)
ACCESS = EventType.find(ACCESS_TYPE, EventType.Class.ACCOUNT_DATA)

# Standard types the layout relies on, as plain strings for the pure planner.
CREATE_TYPE = "m.room.create"
MEMBER_TYPE = "m.room.member"
POWER_LEVELS_TYPE = "m.room.power_levels"
TOMBSTONE_TYPE = "m.room.tombstone"
SPACE_CHILD_TYPE = "m.space.child"
SPACE_PARENT_TYPE = "m.space.parent"

# Types only the bot may send (docs/layout.md#power-levels); each gets PROTECTED_LEVEL.
PROTECTED_STATE_TYPES: tuple[str, ...] = (
    SPACE_CHILD_TYPE,
    SPACE_PARENT_TYPE,
    POWER_LEVELS_TYPE,
    TOMBSTONE_TYPE,
    BINDING_TYPE,
    MEMORY_TYPE,
)
PROTECTED_LEVEL = 100
# Synapse's own default on creator-power rooms: above every non-creator, so only creators upgrade.
CREATOR_ONLY_LEVEL = 150

RoomKind = Literal["space", "working"]
ROOM_KINDS: tuple[str, ...] = ("space", "working")
AccessState = Literal["approved", "blocked"]
ACCESS_STATES: tuple[str, ...] = ("approved", "blocked")

_MAX_ID_LEN = 255  # the spec's limit for user and room ids
_ORDER_RE = re.compile(r"[\x20-\x7e]{0,50}\Z")
_USER_ID_RE = re.compile(r"@[^\s:]+:\S+\Z")
_ROOM_ID_RE = re.compile(r"![^\s]+\Z")
_ORDER_WIDTH = 16  # ms timestamps are 13 digits; 16 keeps keys fixed-width for centuries


# ---------------------------------------------------------------------------
# small validators

_T = TypeVar("_T")


def fast_constructor(cls: type[_T]) -> Callable[..., _T]:
    """A constructor for a frozen dataclass that takes every field by keyword, for hot paths.

    The generated `__init__` of a frozen dataclass sets each field through `object.__setattr__`,
    about 3× slower than filling the instance dict at once; the planner builds a few such objects
    per room for tens of thousands of rooms. The result is the same object (equal, hashable,
    still frozen). Every field must be given: defaults are not applied.
    """
    assert "__slots__" not in cls.__dict__ and not hasattr(cls, "__post_init__")
    names = frozenset(f.name for f in fields(cls))  # type: ignore[arg-type]
    count, new = len(names), object.__new__

    def make(**values: Any) -> _T:
        if len(values) != count or values.keys() != names:
            raise TypeError(f"{cls.__name__}: fields {sorted(names ^ values.keys())}")
        obj = new(cls)
        obj.__dict__.update(values)
        return obj

    return make


# Memoized regex checks: the same owner and Space ids recur in every room of a user. Only strings
# within the length limit reach the cache, so it stays small (a few MB at most).
@lru_cache(maxsize=8192)
def _user_id_shape(value: str) -> bool:
    return _USER_ID_RE.match(value) is not None


@lru_cache(maxsize=8192)
def _room_id_shape(value: str) -> bool:
    return _ROOM_ID_RE.match(value) is not None


def is_user_id(value: object) -> bool:
    """`@localpart:server`, within the spec's length limit."""
    return isinstance(value, str) and len(value) <= _MAX_ID_LEN and _user_id_shape(value)


def is_room_id(value: object) -> bool:
    """`!opaque` (room v12 ids have no server part) or `!opaque:server`."""
    return isinstance(value, str) and len(value) <= _MAX_ID_LEN and _room_id_shape(value)


def _is_map(value: object) -> bool:
    return type(value) is dict or isinstance(value, Mapping)  # dict first: ABC checks are slow


def _is_int(value: object) -> bool:
    return type(value) is int  # not bool (an int subclass); JSON ints are plain ints


def _version(content: Mapping[str, Any], key: str) -> int | None:
    v = content.get(key)
    return v if _is_int(v) and v >= 1 else None


def _nonempty_str(value: object) -> bool:
    return isinstance(value, str) and value != ""


def creators_have_infinite_power(room_version: str) -> bool:
    """Room v12 (MSC4289) and later: creators outrank everyone and must not be in `users`."""
    if room_version.isdigit():
        return int(room_version) >= 12
    return room_version.startswith("org.matrix.hydra.")


# ---------------------------------------------------------------------------
# m.room.create markers


@dataclass(frozen=True)
class RoomMarkers:
    kind: RoomKind
    owner: str
    v: int


def parse_create_markers(create_content: object) -> RoomMarkers | None:
    """Our markers in m.room.create content; `None` when absent or malformed.

    `v` newer than LAYOUT_VERSION parses (the caller decides to leave such rooms alone).
    """
    if not _is_map(create_content):
        return None
    get = create_content.get  # inlined checks: this runs for every room at every start
    kind = get(KIND_KEY)
    owner = get(OWNER_KEY)
    v = get(VERSION_KEY)
    if kind not in ROOM_KINDS or type(v) is not int or v < 1 or not is_user_id(owner):
        return None
    is_space = get("type") == "m.space"
    if (kind == "space") != is_space:  # a space that isn't m.space (or vice versa) is corrupt
        return None
    return _new_markers(kind=kind, owner=owner, v=v)


_new_markers = fast_constructor(RoomMarkers)


def has_our_markers(create_content: object) -> bool:
    """Whether content claims to be ours at all (to tell malformed from foreign)."""
    return _is_map(create_content) and any(
        isinstance(k, str) and k.startswith(f"{NAMESPACE}.") for k in create_content
    )


def create_predecessor(create_content: object) -> str | None:
    """The room this one replaced (set by a room upgrade), if any."""
    if not _is_map(create_content):
        return None
    pred = create_content.get("predecessor")
    if _is_map(pred) and is_room_id(pred.get("room_id")):
        return pred["room_id"]
    return None


def create_room_version(create_content: object) -> str:
    """Room version from the create event; the spec's default is "1"."""
    if _is_map(create_content):
        v = create_content.get("room_version")
        if isinstance(v, str) and v:
            return v
    return "1"


def additional_creators(create_content: object) -> tuple[str, ...]:
    if not _is_map(create_content):
        return ()
    extra = create_content.get("additional_creators")
    if not isinstance(extra, list):
        return ()
    return tuple(u for u in extra if is_user_id(u))


# ---------------------------------------------------------------------------
# org.surfaces.binding


@dataclass(frozen=True)
class Binding:
    owner: str
    space_id: str
    agent: str
    title: str
    platform_chat_id: str | None = None  # None only in the older layout; backfilled at start
    system_prompt: str | None = None
    archived: bool = False
    voice: bool | None = None  # answers also spoken (`!ai voice on`); None: never set (off)
    stream: bool | None = None  # `!ai stream on|off`; None: the config's default
    v: int = LAYOUT_VERSION

    def to_content(self) -> dict[str, Any]:
        content: dict[str, Any] = {
            "v": self.v,
            "owner": self.owner,
            "space_id": self.space_id,
            "agent": self.agent,
            "title": self.title,
        }
        if self.platform_chat_id is not None:
            content["platform_chat_id"] = self.platform_chat_id
        if self.system_prompt is not None:
            content["system_prompt"] = self.system_prompt
        if self.archived:
            content["archived"] = True
        if self.voice is not None:
            content["voice"] = self.voice
        if self.stream is not None:
            content["stream"] = self.stream
        return content


_new_binding = fast_constructor(Binding)


def parse_binding(content: object) -> Binding | None:
    """A binding, or `None` when any known key has the wrong shape (unknown keys are ignored)."""
    if not _is_map(content):
        return None
    get = content.get  # inlined checks (same rules as _version, _opt_str, _nonempty_str)
    v = get("v")
    owner = get("owner")
    space_id = get("space_id")
    agent = get("agent")
    title = get("title", "")
    pcid = get("platform_chat_id")
    prompt = get("system_prompt")
    archived = get("archived", False)
    voice = get("voice")
    stream = get("stream")
    if (
        type(v) is not int
        or v < 1
        or not isinstance(agent, str)
        or agent == ""
        or not isinstance(title, str)
        or (pcid is not None and (not isinstance(pcid, str) or pcid == ""))
        or (prompt is not None and not isinstance(prompt, str))
        or not isinstance(archived, bool)
        or not is_user_id(owner)
        or not is_room_id(space_id)
    ):
        return None
    return _new_binding(
        owner=owner,
        space_id=space_id,
        agent=agent,
        title=title,
        platform_chat_id=pcid,
        system_prompt=prompt,
        archived=archived,
        voice=voice if isinstance(voice, bool) else None,  # tolerant: a bad flag is unset
        # A display preference of the wrong shape falls back to the default; the room stays.
        stream=stream if isinstance(stream, bool) else None,
        v=v,
    )


# ---------------------------------------------------------------------------
# m.space.child / m.space.parent


@dataclass(frozen=True)
class SpaceChild:
    via: tuple[str, ...]
    order: str | None = None
    suggested: bool = False


def _parse_via(content: Mapping[str, Any]) -> tuple[str, ...] | None:
    via = content.get("via")
    if not isinstance(via, list) or not via:
        return None
    for server in via:
        if not isinstance(server, str) or not server:
            return None
    return tuple(via)


def is_live_link(content: object) -> bool:
    """Whether a space child or parent link is live (`parse_space_child` would give one), without
    building it: not live exactly when the content is not a map or `via` is invalid."""
    return _is_map(content) and _parse_via(content) is not None


def is_valid_order(order: object) -> bool:
    return isinstance(order, str) and _ORDER_RE.match(order) is not None


def parse_space_child(content: object) -> SpaceChild | None:
    """A live child link; `None` for `{}` (removed) or an invalid `via`. A bad `order` is dropped."""
    if not _is_map(content):
        return None
    via = _parse_via(content)
    if via is None:
        return None
    order = content.get("order")
    suggested = content.get("suggested")
    return SpaceChild(
        via=via,
        order=order if is_valid_order(order) else None,
        suggested=suggested if isinstance(suggested, bool) else False,
    )


def order_key(n: int) -> str:
    """A fixed-width sortable `order` for `n` (use a creation time in ms); negatives clamp to 0."""
    return str(max(0, n)).zfill(_ORDER_WIDTH)[-50:]


def space_child_content(server_name: str, order: str | None = None) -> dict[str, Any]:
    content: dict[str, Any] = {"via": [server_name]}
    if order is not None:
        content["order"] = order
    return content


def space_parent_content(server_name: str) -> dict[str, Any]:
    return {"via": [server_name], "canonical": True}


REMOVED: dict[str, Any] = {}  # `{}` content removes a space link (never mutate)
# Our note in a removed link saying why (no `via`, so still "removed" to every client).
UNLINKED_KEY = f"{NAMESPACE}.unlinked"


def unlinked_content(because: str) -> dict[str, Any]:
    """A removed link that says why: "lost" links come back if the bot is let back in."""
    return {UNLINKED_KEY: because}


def tombstone_content(replacement_room: str, body: str) -> dict[str, Any]:
    return {"body": body, "replacement_room": replacement_room}


def parse_tombstone(content: object) -> str | None:
    """The replacement room of an m.room.tombstone, or `None`."""
    if _is_map(content) and is_room_id(content.get("replacement_room")):
        return content["replacement_room"]
    return None


# ---------------------------------------------------------------------------
# org.surfaces.memory (state in the Space)


@dataclass(frozen=True)
class Memory:
    notes: tuple[str, ...] = ()
    v: int = LAYOUT_VERSION

    def to_content(self) -> dict[str, Any]:
        return {"v": self.v, "notes": list(self.notes)}


def parse_memory(content: object) -> Memory | None:
    if not _is_map(content):
        return None
    v = _version(content, "v")
    notes = content.get("notes")
    if v is None or not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        return None
    return Memory(notes=tuple(notes), v=v)


# ---------------------------------------------------------------------------
# org.surfaces.access (bot account data)


@dataclass(frozen=True)
class AccessDecision:
    state: AccessState
    by: str
    ts: int


@dataclass(frozen=True)
class AccessDecisions:
    users: Mapping[str, AccessDecision] = field(default_factory=dict)

    def state_of(self, user_id: str) -> AccessState | None:
        decision = self.users.get(user_id)
        return decision.state if decision else None

    def to_content(self) -> dict[str, Any]:
        return {
            "users": {
                uid: {"state": d.state, "by": d.by, "ts": d.ts}
                for uid, d in sorted(self.users.items())
            }
        }


def parse_access(content: object) -> AccessDecisions | None:
    """Decisions by user; one malformed entry is skipped rather than voiding all the others."""
    if not _is_map(content):
        return None
    users = content.get("users")
    if not _is_map(users):
        return None
    parsed: dict[str, AccessDecision] = {}
    for uid, entry in users.items():
        if not is_user_id(uid) or not _is_map(entry):
            continue
        state, by, ts = entry.get("state"), entry.get("by"), entry.get("ts")
        if state in ACCESS_STATES and is_user_id(by) and _is_int(ts):
            parsed[uid] = AccessDecision(state=state, by=by, ts=ts)
    return AccessDecisions(users=parsed)


# ---------------------------------------------------------------------------
# markers on messages: org.surfaces.turn / org.surfaces.reset / org.surfaces.summary


@dataclass(frozen=True)
class TokenUsage:
    """The tokens an answer or a summary cost (`usage` in its marker): as the backend reported
    them, or estimated where it reported none."""

    prompt: int
    completion: int
    estimated: bool = False

    @property
    def total(self) -> int:
        return self.prompt + self.completion

    def to_content(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "completion": self.completion, "estimated": self.estimated}


def parse_usage(value: object) -> TokenUsage | None:
    """`usage` of a marker; None unless both counts are whole numbers ≥ 0."""
    if not _is_map(value):
        return None
    prompt, completion = value.get("prompt"), value.get("completion")
    if not (_is_int(prompt) and _is_int(completion)) or prompt < 0 or completion < 0:
        return None
    return TokenUsage(prompt, completion, value.get("estimated") is True)


@dataclass(frozen=True)
class TurnMarker:
    platform_chat_id: str
    agent: str
    answers: str | None = None  # the user message this answers (its event id)
    partial: bool = False  # a streamed answer still being written; its final edit drops this
    continues: str | None = None  # the previous message of an answer too long for one
    command: str | None = None  # the `!ai` command this answer is the effect of (retry, cancel)
    usage: TokenUsage | None = None  # on the final version of an answer's last message
    # What made this version (the owner's edit of the message, or their 🔁 on the answer).
    revision: str | None = None


@dataclass(frozen=True)
class ResetMarker:
    platform_chat_id: str


@dataclass(frozen=True)
class SummaryMarker:
    platform_chat_id: str
    upto_event_id: str | None  # the last message the summary covers
    usage: TokenUsage | None = None  # what writing the summary cost
    agent: str | None = None  # the agent that wrote it (given with `usage`)


def turn_marker(
    platform_chat_id: str,
    agent: str,
    *,
    answers: str | None = None,
    partial: bool = False,
    continues: str | None = None,
    command: str | None = None,
    usage: TokenUsage | None = None,
    revision: str | None = None,
) -> dict[str, Any]:
    """Keys to merge into a bot reply's content.

    `answers` names the user message answered, so catch-up knows what came after it; `partial`
    marks a streamed answer until its final edit, so one cut off by a crash can be told apart;
    `continues` names the previous message of an answer split over several; `command` the
    `!ai` command it carries out (as `command_marker`); `usage` the tokens the answer cost
    (on its final version only), so the usage ledger can be rebuilt from the timeline;
    `revision` the owner's edit (or 🔁 reaction) this version of the answer was regenerated for,
    so catch-up answers an edit once.
    """
    body: dict[str, Any] = {"platform_chat_id": platform_chat_id, "agent": agent}
    if answers:
        body["answers"] = answers
    if partial:
        body["partial"] = True
    if continues:
        body["continues"] = continues
    if usage is not None and not partial:
        body["usage"] = usage.to_content()
    if revision:
        body["revision"] = revision
    return {TURN_KEY: body, **(command_marker(command) if command else {})}


def live_marker() -> dict[str, Any]:
    """Keys to merge into a streamed answer while it is still being written (MSC4357)."""
    return {LIVE_KEY: {}}


def command_marker(command_event_id: str) -> dict[str, Any]:
    """Keys to merge into whatever the bot sends for an `!ai` command (a reply, a reset notice,
    an exported file, a retried answer), so catch-up knows that command was handled."""
    return {COMMAND_KEY: {"answers": command_event_id}}


def reset_marker(platform_chat_id: str) -> dict[str, Any]:
    """Keys to merge into the reset notice's content."""
    return {RESET_KEY: {"platform_chat_id": platform_chat_id}}


def summary_marker(
    platform_chat_id: str,
    upto_event_id: str | None,
    usage: TokenUsage | None = None,
    agent: str | None = None,
) -> dict[str, Any]:
    """Keys to merge into a summary notice (`!ai compact`), so a rebuild finds the summary
    (and the usage ledger what writing it cost, and for which agent)."""
    body: dict[str, Any] = {"platform_chat_id": platform_chat_id}
    if upto_event_id:
        body["upto_event_id"] = upto_event_id
    if usage is not None:
        body["usage"] = usage.to_content()
    if agent:
        body["agent"] = agent
    return {SUMMARY_KEY: body}


def compacting_marker(platform_chat_id: str) -> dict[str, Any]:
    """Keys to merge into the "Compacting…" notice: until an edit ends it, compaction is running
    (so catch-up can end one a crash cut off)."""
    return {COMPACTING_KEY: {"platform_chat_id": platform_chat_id}}


def is_compacting_notice(content: object) -> bool:
    return _is_map(content) and _is_map(content.get(COMPACTING_KEY))


def _marker_body(content: object, key: str) -> Mapping[str, Any] | None:
    """The marker at top level, else inside `m.new_content` (streamed edits repeat it there)."""
    if not _is_map(content):
        return None
    body = content.get(key)
    if body is None:
        new_content = content.get("m.new_content")
        body = new_content.get(key) if _is_map(new_content) else None
    return body if _is_map(body) else None


def parse_turn_marker(content: object) -> TurnMarker | None:
    body = _marker_body(content, TURN_KEY)
    if body is None:
        return None
    pcid, agent = body.get("platform_chat_id"), body.get("agent")
    if not _nonempty_str(pcid) or not _nonempty_str(agent):
        return None
    answers, continues = body.get("answers"), body.get("continues")
    revision = body.get("revision")
    return TurnMarker(
        platform_chat_id=pcid,
        agent=agent,
        answers=answers if _nonempty_str(answers) else None,
        partial=body.get("partial") is True,
        continues=continues if _nonempty_str(continues) else None,
        usage=parse_usage(body.get("usage")),
        revision=revision if _nonempty_str(revision) else None,
    )


@dataclass(frozen=True)
class ToolsMarker:
    """A turn's tool notice: its calls and results (`steps`, see tool_runs.ToolRun); `done` is
    false until the run ended, so a run a crash cut off is recognisable."""

    platform_chat_id: str
    agent: str
    steps: list[Any]
    answers: str | None = None
    done: bool = False


def tools_marker(
    platform_chat_id: str,
    agent: str,
    steps: list[Any],
    *,
    answers: str | None = None,
    done: bool = False,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "platform_chat_id": platform_chat_id,
        "agent": agent,
        "steps": steps,
        "done": done,
    }
    if answers:
        body["answers"] = answers
    return {TOOLS_KEY: body}


def parse_tools_marker(content: object) -> ToolsMarker | None:
    body = _marker_body(content, TOOLS_KEY)
    if body is None:
        return None
    pcid, agent, steps, answers = (
        body.get("platform_chat_id"),
        body.get("agent"),
        body.get("steps"),
        body.get("answers"),
    )
    if not _nonempty_str(pcid) or not _nonempty_str(agent) or not isinstance(steps, list):
        return None
    return ToolsMarker(
        platform_chat_id=pcid,
        agent=agent,
        steps=steps,
        answers=answers if _nonempty_str(answers) else None,
        done=body.get("done") is True,
    )


def parse_command_marker(content: object) -> str | None:
    """The event id of the `!ai` command this content was sent for, if it says."""
    body = _marker_body(content, COMMAND_KEY)
    answers = body.get("answers") if body is not None else None
    return answers if _nonempty_str(answers) else None


@dataclass(frozen=True)
class Transcript:
    """The bot's notice showing what it heard in a voice message: `of` is that message's id."""

    of: str
    text: str


TRANSCRIPT_PREFIX = "🎤 "


def transcript_notice_text(text: str) -> str:
    """The transcript quoted (`> 🎤 …`), so the user can check what was heard."""
    return "\n".join(f"> {line}".rstrip() for line in f"{TRANSCRIPT_PREFIX}{text}".splitlines())


def transcript_marker(audio_event_id: str) -> dict[str, Any]:
    """Keys to merge into a transcript notice, so catch-up and the rebuild find the transcript."""
    return {TRANSCRIPT_KEY: {"of": audio_event_id}}


def parse_transcript(content: object) -> Transcript | None:
    """The transcript a notice shows (read back from its body); None when it is not one."""
    if not _is_map(content):
        return None
    body = content.get(TRANSCRIPT_KEY)
    of = body.get("of") if _is_map(body) else None
    text = content.get("body")
    if not _nonempty_str(of) or not isinstance(text, str):
        return None
    lines = [line.removeprefix(">").removeprefix(" ") for line in text.splitlines()]
    return Transcript(of, "\n".join(lines).removeprefix(TRANSCRIPT_PREFIX).strip())


def voice_message_content(
    body: str,
    filename: str,
    media: Mapping[str, Any],
    mime: str,
    size: int,
    duration_ms: int | None,
) -> dict[str, Any]:
    """An `m.audio` voice message (MSC3245: clients show a voice player); `media` is its `url`
    or, in an encrypted room, its `file` (`E2EE.upload`)."""
    info: dict[str, Any] = {"mimetype": mime, "size": size}
    audio: dict[str, Any] = {}
    if duration_ms is not None:
        info["duration"] = audio["duration"] = duration_ms
    return {
        "msgtype": "m.audio",
        "body": body,
        "filename": filename,
        **media,
        "info": info,
        "org.matrix.msc1767.audio": audio,
        VOICE_FLAG_KEY: {},
    }


def parse_reset_marker(content: object) -> ResetMarker | None:
    body = _marker_body(content, RESET_KEY)
    if body is None or not _nonempty_str(body.get("platform_chat_id")):
        return None
    return ResetMarker(platform_chat_id=body["platform_chat_id"])


def parse_summary_marker(content: object) -> SummaryMarker | None:
    body = _marker_body(content, SUMMARY_KEY)
    if body is None or not _nonempty_str(body.get("platform_chat_id")):
        return None
    upto = body.get("upto_event_id")
    return SummaryMarker(
        platform_chat_id=body["platform_chat_id"],
        upto_event_id=upto if _nonempty_str(upto) else None,
        usage=parse_usage(body.get("usage")),
        agent=body["agent"] if _nonempty_str(body.get("agent")) else None,
    )


# ---------------------------------------------------------------------------
# createRoom payloads (kwargs for mautrix `client.create_room`)

ENCRYPTION_TYPE = "m.room.encryption"
ENCRYPTION_CONTENT = {"algorithm": "m.megolm.v1.aes-sha2"}


def power_levels(bot_id: str, room_version: str) -> dict[str, Any]:
    """Power levels for our rooms: the bot alone changes structure; users chat and invite.

    Strict on purpose: everyone but the bot is at level 0, so owners cannot rename rooms
    (the title lives in the binding) or enable encryption behind the bot's back (`!ai encrypt`
    does it when the bot can encrypt).
    Synapse replaces each top-level key given here, so `events` is complete.
    """
    infinite = creators_have_infinite_power(room_version)
    events = {t: PROTECTED_LEVEL for t in PROTECTED_STATE_TYPES}
    if infinite:
        events[TOMBSTONE_TYPE] = CREATOR_ONLY_LEVEL
    for t in (
        "m.room.name",
        "m.room.topic",
        "m.room.avatar",
        "m.room.canonical_alias",
        "m.room.history_visibility",
        "m.room.join_rules",
        "m.room.server_acl",
        "m.room.encryption",
        "m.room.pinned_events",
    ):
        events[t] = PROTECTED_LEVEL
    return {
        # v12: the creator is implicitly all-powerful and Synapse rejects listing it (400).
        "users": {} if infinite else {bot_id: PROTECTED_LEVEL},
        "users_default": 0,
        "events": events,
        "events_default": 0,
        "state_default": PROTECTED_LEVEL,
        "invite": 0,
        "kick": 50,
        "ban": 50,
        "redact": 50,
        "notifications": {"room": 50},
    }


def space_creation_content(owner: str) -> dict[str, Any]:
    return {
        "type": "m.space",
        KIND_KEY: "space",
        OWNER_KEY: owner,
        VERSION_KEY: LAYOUT_VERSION,
    }


def working_creation_content(owner: str) -> dict[str, Any]:
    return {KIND_KEY: "working", OWNER_KEY: owner, VERSION_KEY: LAYOUT_VERSION}


def space_create_request(
    owner: str, name: str, bot_id: str, server_name: str, room_version: str
) -> dict[str, Any]:
    """kwargs for `create_room`; no invitees: the bot invites after recording the room."""
    del server_name  # a space has no links at creation; kept for a symmetric signature
    return {
        "preset": RoomCreatePreset.PRIVATE,
        "name": name,
        "room_version": room_version,
        "creation_content": space_creation_content(owner),
        "initial_state": [],
        "power_level_override": power_levels(bot_id, room_version),
        "invitees": [],
    }


def working_room_create_request(
    owner: str,
    space_id: str,
    binding: Binding,
    bot_id: str,
    server_name: str,
    room_version: str,
    encrypted: bool = False,
) -> dict[str, Any]:
    """kwargs for `create_room`: the parent link and the binding arrive atomically with the room
    (and encryption, so not one message is ever sent in the clear)."""
    encryption = [{"type": ENCRYPTION_TYPE, "state_key": "", "content": ENCRYPTION_CONTENT}]
    return {
        "preset": RoomCreatePreset.PRIVATE,
        "name": binding.title or None,
        "room_version": room_version,
        "creation_content": working_creation_content(owner),
        "initial_state": [
            {
                "type": SPACE_PARENT_TYPE,
                "state_key": space_id,
                "content": space_parent_content(server_name),
            },
            {"type": BINDING_TYPE, "state_key": "", "content": binding.to_content()},
            *(encryption if encrypted else []),
        ],
        "power_level_override": power_levels(bot_id, room_version),
        "invitees": [],
    }


def matrix_to(room_id: str, via: tuple[str, ...] | list[str] = ()) -> str:
    """A matrix.to link; `via` matters on room v12, whose ids carry no server."""
    link = f"https://matrix.to/#/{quote(room_id, safe='')}"
    if via:
        link += "?" + "&".join(f"via={quote(s, safe='')}" for s in via)
    return link


# Attachments: the media of an m.image / m.file / m.audio message (docs/layout.md#attachments)

AttachmentKind = Literal["image", "file", "audio"]
ATTACHMENT_MSGTYPES: dict[str, AttachmentKind] = {
    "m.image": "image",
    "m.file": "file",
    "m.audio": "audio",
}
_MAX_NAME_CHARS = 200  # a file name long enough to recognise, short enough for a label
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f\u200b-\u200f\u202a-\u202e\u2066-\u2069]+")


def _clean_name(value: str) -> str:
    """A file name fit for a one-line label: no control or bidi characters, bounded."""
    return _CONTROL_RE.sub(" ", value).strip()[:_MAX_NAME_CHARS]


def _encrypted_file(value: object) -> dict[str, Any] | None:
    """An EncryptedFile (v2) with what decryption needs, as plain JSON; None when not one."""
    if not _is_map(value):
        return None
    key = value.get("key")
    hashes = value.get("hashes")
    ok = (
        _is_mxc(value.get("url"))
        and _is_map(key)
        and _nonempty_str(key.get("k"))
        and _nonempty_str(value.get("iv"))
        and _is_map(hashes)
        and _nonempty_str(hashes.get("sha256"))
    )
    if not ok:
        return None
    return {
        "url": value["url"],
        "key": dict(key),
        "iv": value["iv"],
        "hashes": {"sha256": hashes["sha256"]},
        "v": value.get("v", "v2"),
    }


def _is_mxc(value: object) -> bool:
    return isinstance(value, str) and value.startswith("mxc://") and len(value) > len("mxc://")


@dataclass(frozen=True)
class Attachment:
    """A reference to a user's media message: where its bytes are and what it claims to be.

    `url` is the mxc URI of a plain upload; `file` the EncryptedFile of an encrypted one (its
    own `url` inside). `caption` is the text the user wrote with it, when any."""

    kind: AttachmentKind
    name: str
    mime: str = ""
    size: int | None = None  # as the sender declared it (checked again after download)
    url: str | None = None
    file: dict[str, Any] | None = field(default=None, hash=False, compare=False)
    caption: str | None = None

    @property
    def mxc(self) -> str:
        """The media's mxc URI (of the ciphertext when encrypted)."""
        if self.file is not None:
            return str(self.file["url"])
        return self.url or ""

    @property
    def encrypted(self) -> bool:
        return self.file is not None

    @property
    def label(self) -> str:
        """`[image: name]`: how the attachment is named in text (turns, summaries, export)."""
        return f"[{self.kind}: {self.name}]"

    @property
    def turn_text(self) -> str:
        """The turn's text: the caption, else the label."""
        return self.caption or self.label

    def to_json(self) -> str:
        """The stored form (the `attachment` column); `attachment_from_json` reads it back."""
        data: dict[str, Any] = {"kind": self.kind, "name": self.name, "mime": self.mime}
        for key in ("size", "url", "file", "caption"):
            value = getattr(self, key)
            if value is not None:
                data[key] = value
        return json.dumps(data, separators=(",", ":"))


def attachment_from_json(text: object) -> Attachment | None:
    """The stored form back; None for anything else (never raises)."""
    if not isinstance(text, str) or not text:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not _is_map(data) or data.get("kind") not in ATTACHMENT_MSGTYPES.values():
        return None
    return _attachment(data["kind"], data)


def parse_attachment(content: object) -> Attachment | None:
    """The attachment of an m.image / m.file / m.audio message's content; None when it is not
    one or names no media it could be fetched from (never raises).

    The body is the caption when a `filename` is given and differs from it (Matrix 1.10 media
    captions); otherwise the body is the file name."""
    if not _is_map(content):
        return None
    msgtype = content.get("msgtype")
    kind = ATTACHMENT_MSGTYPES.get(msgtype) if isinstance(msgtype, str) else None
    if kind is None or _is_edit_content(content):
        return None
    body = content.get("body")
    body = body if isinstance(body, str) else ""
    filename = content.get("filename")
    info = content.get("info")
    info = info if _is_map(info) else {}
    caption = None
    if isinstance(filename, str) and filename.strip() and filename != body:
        name = filename
        caption = body.strip() or None
    else:
        name = body
    data = {
        "name": name,
        "caption": caption,
        "mime": info.get("mimetype"),
        "size": info.get("size"),
        "url": content.get("url"),
        "file": content.get("file"),
    }
    return _attachment(kind, data)


def _attachment(kind: AttachmentKind, data: Mapping[str, Any]) -> Attachment | None:
    file = _encrypted_file(data.get("file")) if data.get("file") is not None else None
    url = data.get("url") if _is_mxc(data.get("url")) else None
    if file is None and url is None:
        return None
    name = _clean_name(data.get("name") or "") if isinstance(data.get("name"), str) else ""
    mime = data.get("mime")
    size = data.get("size")
    caption = data.get("caption")
    return Attachment(
        kind=kind,
        name=name or f"unnamed {kind}",
        mime=mime.strip().lower() if isinstance(mime, str) else "",
        size=size if _is_int(size) and size >= 0 else None,
        url=None if file is not None else url,
        file=file,
        caption=caption.strip() or None if isinstance(caption, str) else None,
    )


def _is_edit_content(content: Mapping[str, Any]) -> bool:
    relates = content.get("m.relates_to")
    return _is_map(relates) and relates.get("rel_type") == "m.replace"
