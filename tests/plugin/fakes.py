"""A recording in-memory Matrix client for plugin tests: rooms, state, messages, account data.

It implements the few mautrix Client methods Surfaces calls, keeps what was sent so tests can
read it as a user would see it, and can be told to fail (e.g. 403 or 429) on chosen calls.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from aiohttp import ClientResponseError
from mautrix.errors import (
    MForbidden,
    MInvalidParam,
    MLimitExceeded,
    MNotFound,
    MTooLarge,
)
from mautrix.types import (
    EventID,
    MessageEvent,
    ReactionEvent,
    RedactionEvent,
    RoomID,
    UserID,
)

from surfaces_plugin.backends import (
    Backend,
    BackendError,
    ChatMessage,
    Chunk,
    ErrorKind,
    Features,
    GenerationRequest,
    Usage,
)
from surfaces_plugin.layout import creators_have_infinite_power
from surfaces_plugin.reconcile.model import RoomSnapshot, StateEntry
from surfaces_plugin.reconcile.plan import state_level, user_level


@dataclass
class FakeRoom:
    room_id: str
    creator: str
    create_content: dict[str, Any]
    name: str | None = None
    state: dict[tuple[str, str], tuple[str, dict[str, Any]]] = field(default_factory=dict)
    members: dict[str, str] = field(default_factory=dict)  # user → membership
    timeline: list[dict[str, Any]] = field(default_factory=list)
    # (type, state_key) → (the value it was given for, event id): a new value is a new event
    state_ids: dict[tuple[str, str], tuple[Any, str]] = field(default_factory=dict)

    def snapshot(self) -> RoomSnapshot:
        """The room as the planner sees it, so the fake applies the planner's power rules."""
        sender, content = self.state.get(("m.room.create", ""), (self.creator, self.create_content))
        create = StateEntry("m.room.create", "", sender, content)
        state = {key: StateEntry(key[0], key[1], s, c) for key, (s, c) in self.state.items()}
        return RoomSnapshot(self.room_id, create, state)


def _type_str(event_type: Any) -> str:
    return event_type.t if hasattr(event_type, "t") else str(event_type)


def _int(value: object, default: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lstrip("-").isdigit():  # old room versions allow "50"
        return int(value)
    return default


def _message_level(room: FakeRoom, event_type: str) -> int:
    """The level a non-state event of `event_type` needs: `events[type]`, else `events_default`."""
    pl = room.snapshot().power_levels
    if pl is None:
        return 0
    events = pl.get("events")
    if isinstance(events, dict) and event_type in events:
        return _int(events[event_type], 0)
    return _int(pl.get("events_default"), 0)


def _default_power_levels(creator: str, version: str) -> dict[str, Any]:
    """What Synapse puts in a new room's m.room.power_levels before the creator's override."""
    infinite = creators_have_infinite_power(version)
    return {
        "users": {} if infinite else {creator: 100},
        "users_default": 0,
        "events": {
            "m.room.name": 50,
            "m.room.power_levels": 100,
            "m.room.history_visibility": 100,
            "m.room.canonical_alias": 50,
            "m.room.avatar": 50,
            "m.room.tombstone": 150 if infinite else 100,
            "m.room.server_acl": 100,
            "m.room.encryption": 100,
        },
        "events_default": 0,
        "state_default": 50,
        "ban": 50,
        "kick": 50,
        "redact": 50,
        "invite": 50,
    }


class FakeApi:
    def __init__(self, client: FakeClient) -> None:
        self.client = client

    async def request(self, method: Any, path: Any, content: Any = None, query_params: Any = None,
                      **_: Any) -> Any:
        path = str(path)
        if path.endswith("/capabilities"):
            return {"capabilities": {"m.room_versions": {"default": self.client.room_version}}}
        if path.endswith("/messages"):
            await asyncio.sleep(self.client.messages_delay)
            from urllib.parse import unquote

            room_id = unquote(path.split("/rooms/")[1].split("/")[0])
            self.client.pages_read += 1
            return self.client.read_messages(room_id, dict(query_params or {}))
        if "/state" in path:
            return self._state(path)
        raise NotImplementedError(path)

    def _state(self, path: str) -> Any:
        from urllib.parse import unquote

        room_id, _, rest = path.split("/rooms/", 1)[1].partition("/state")
        room = self.client.rooms.get(unquote(room_id))
        if room is None:
            raise MNotFound(404, "no such room")
        if not rest.strip("/"):  # the whole state, as GET /rooms/{id}/state returns it
            return [
                {"type": t, "state_key": k, "sender": sender, "content": content,
                 "event_id": self.client.state_id(room, (t, k), (sender, content)),
                 "origin_server_ts": 0}
                for (t, k), (sender, content) in room.state.items()
            ] + [
                {"type": "m.room.member", "state_key": user, "sender": user,
                 "content": {"membership": membership},
                 "event_id": self.client.state_id(room, ("m.room.member", user), membership)}
                for user, membership in room.members.items()
            ]
        event_type, _, state_key = rest.strip("/").partition("/")
        try:
            return room.state[(unquote(event_type), unquote(state_key))][1]
        except KeyError:
            raise MNotFound(404, "no such state") from None


class FakeClient:
    # As on a maubot client without encryption; a test sets `crypto` to pretend it has it.
    crypto: Any = None
    state_store: Any = None

    def __init__(self, mxid: str = "@bot:localhost", room_version: str = "12") -> None:
        self.mxid = UserID(mxid)
        self.room_version = room_version
        self.rooms: dict[str, FakeRoom] = {}
        self.account_data: dict[str, dict[str, Any]] = {}
        self.displaynames: dict[str, str] = {}
        self.calls: list[tuple[str, Any]] = []
        self.fail_next: dict[str, list[Exception]] = defaultdict(list)
        self.api = FakeApi(self)
        self._ids = itertools.count(1)
        self.typing: list[tuple[str, int]] = []
        self.messages_delay = 0.0  # seconds each /messages request takes
        self.media: dict[str, tuple[bytes, str | None, str | None]] = {}  # mxc → data, type, name
        self.downloads: list[str] = []  # mxc URIs downloaded, in order
        self.page_limit: int | None = None  # force small /messages pages to exercise paging
        self.pages_read = 0
        self.txns: dict[tuple[str, str], EventID] = {}  # (room, txn id) → the event it sent
        self._issued: set[str] = set()

    # helpers for tests

    def _maybe_fail(self, name: str) -> None:
        self.calls.append((name, None))
        if self.fail_next[name]:
            raise self.fail_next[name].pop(0)

    def _event_id(self) -> EventID:
        event_id = EventID(f"$ev{next(self._ids)}")
        assert event_id not in self._issued, f"event id {event_id} issued twice"
        self._issued.add(event_id)
        return event_id

    def state_id(self, room: FakeRoom, key: tuple[str, str], value: Any) -> str:
        """The id of the state event now at `key`: the same while its value is unchanged, a new
        one when it changed (also when a test wrote `room.state` or `room.members` directly)."""
        known = room.state_ids.get(key)
        if known is None or known[0] != value:
            known = (value, self._event_id())
            room.state_ids[key] = known
        return known[1]

    def _require_joined(self, room_id: str) -> FakeRoom:
        """Synapse refuses any send by a user who is not joined (left, kicked, banned, invited)."""
        room = self.rooms.get(room_id)
        if room is None:
            raise MNotFound(404, "no such room")
        membership = room.members.get(self.mxid)
        if membership != "join":
            raise MForbidden(403, f"User {self.mxid} not in room {room_id} ({membership})")
        return room

    def _require_level(self, room: FakeRoom, needed: float, what: str) -> None:
        have = user_level(room.snapshot(), self.mxid)
        if have < needed:
            raise MForbidden(
                403, f"You don't have permission to {what}. user_level ({have}) < needed ({needed})"
            )

    def read_messages(self, room_id: str, query: dict[str, Any]) -> dict[str, Any]:
        """GET /rooms/{id}/messages as the spec says: `dir` b (newest first, from the end unless
        `from`) or f (oldest first, from the start unless `from`), `limit` (default 10), tokens
        that mark a position between events, and no `end` once there is nothing further."""
        room = self.rooms.get(room_id)
        if room is None:
            raise MNotFound(404, "no such room")
        direction = query.get("dir")
        if direction not in ("b", "f"):
            raise MInvalidParam(400, "dir must be 'b' or 'f'")
        try:
            limit = int(query.get("limit", 10))
        except ValueError:
            raise MInvalidParam(400, "limit must be an integer") from None
        limit = max(0, min(limit, 1000))  # Synapse caps a page at 1000
        if self.page_limit is not None:
            limit = min(limit, self.page_limit)  # a server may return fewer than asked
        size = len(room.timeline)
        token = query.get("from")
        if token is None:
            position = size if direction == "b" else 0
        else:
            if not (isinstance(token, str) and token.startswith("t") and token[1:].isdigit()):
                raise MInvalidParam(400, f"unknown token {token!r}")
            position = min(int(token[1:]), size)
        if direction == "b":
            low = max(0, position - limit)
            chunk = list(reversed(room.timeline[low:position]))
            end, more = low, low > 0
        else:
            high = min(size, position + limit)
            chunk = room.timeline[position:high]
            end, more = high, high < size
        page: dict[str, Any] = {"start": f"t{position}", "chunk": [dict(e) for e in chunk]}
        if more:
            page["end"] = f"t{end}"
        return page

    def kick(self, room_id: str, user: str, by: str) -> None:
        """`by` kicks `user` (the bot too): the membership changes as Synapse records it."""
        room = self.rooms[room_id]
        self._member(room, user, "leave", by)

    def _member(self, room: FakeRoom, user: str, membership: str, sender: str) -> None:
        room.members[user] = membership
        event_id = self._append(room, {"type": "m.room.member", "state_key": user,
                                       "sender": sender, "content": {"membership": membership}})
        room.state_ids[("m.room.member", user)] = (membership, event_id)

    def _append(self, room: FakeRoom, event: dict[str, Any]) -> EventID:
        event_id = self._event_id()
        room.timeline.append({**event, "event_id": event_id, "room_id": room.room_id,
                              "origin_server_ts": int(time.time() * 1000)})
        return event_id

    def messages(self, room_id: str) -> list[dict[str, Any]]:
        """The bot's messages in a room (edits included), oldest first."""
        return [
            e for e in self.rooms[room_id].timeline
            if e["type"] == "m.room.message" and e["sender"] == self.mxid
        ]

    def bodies(self, room_id: str) -> list[str]:
        """What a user sees of the bot: each message's latest text (edits applied), in order."""
        shown: dict[str, str] = {}
        order: list[str] = []
        for event in self.messages(room_id):
            content = event["content"]
            relates = content.get("m.relates_to") or {}
            if relates.get("rel_type") == "m.replace":
                shown[relates["event_id"]] = content["m.new_content"]["body"]
            else:
                shown[event["event_id"]] = content.get("body", "")
                order.append(event["event_id"])
        return [shown[e] for e in order]

    def add_room(self, creator: str, members: dict[str, str] | None = None) -> str:
        """A room someone else (or the bot, outside Surfaces) made, with Synapse's defaults."""
        room_id = f"!room{next(self._ids)}"
        create: dict[str, Any] = {"room_version": self.room_version}
        if self.room_version.isdigit() and int(self.room_version) < 11:
            create["creator"] = creator
        room = FakeRoom(room_id, creator, create, members=dict(members or {}))
        self.rooms[room_id] = room
        self._set_state(room, "m.room.create", "", create, sender=creator)
        self._set_state(room, "m.room.power_levels", "",
                        _default_power_levels(creator, self.room_version), sender=creator)
        return room_id

    def user_message(self, room_id: str, sender: str, body: str,
                     msgtype: str = "m.text") -> MessageEvent:
        """Put a user's message in the timeline and return it as the sync would deliver it."""
        raw = {"type": "m.room.message", "event_id": self._event_id(), "sender": sender,
               "origin_server_ts": int(time.time() * 1000),
               "content": {"msgtype": msgtype, "body": body}, "room_id": room_id}
        self.rooms[room_id].timeline.append(raw)
        return MessageEvent.deserialize(raw)

    def edit(self, room_id: str, sender: str, target: str, body: str) -> MessageEvent:
        """Put `sender`'s edit of `target` (an `m.replace` as Element sends it) in the timeline
        and return it as the sync would deliver it."""
        new = {"msgtype": "m.text", "body": body}
        raw = {"type": "m.room.message", "event_id": self._event_id(), "sender": sender,
               "origin_server_ts": int(time.time() * 1000), "room_id": room_id,
               "content": {"msgtype": "m.text", "body": f"* {body}", "m.new_content": new,
                           "m.relates_to": {"rel_type": "m.replace", "event_id": target}}}
        self.rooms[room_id].timeline.append(raw)
        return MessageEvent.deserialize(json.loads(json.dumps(raw)))  # mautrix rewrites its input

    def reaction(self, room_id: str, sender: str, target: str, key: str) -> ReactionEvent:
        """Put `sender`'s reaction `key` on `target` in the timeline; return it as the sync would."""
        raw = {"type": "m.reaction", "event_id": self._event_id(), "sender": sender,
               "origin_server_ts": int(time.time() * 1000), "room_id": room_id,
               "content": {"m.relates_to": {"rel_type": "m.annotation", "event_id": target,
                                            "key": key}}}
        self.rooms[room_id].timeline.append(raw)
        return ReactionEvent.deserialize(raw)

    def redaction(self, room_id: str, sender: str, target: str) -> RedactionEvent:
        """Redact `target` as Synapse does (its content emptied, the redaction in the timeline)
        and return the redaction as the sync would deliver it."""
        raw = {"type": "m.room.redaction", "event_id": self._event_id(), "sender": sender,
               "origin_server_ts": int(time.time() * 1000), "content": {"redacts": target},
               "redacts": target, "room_id": room_id}
        for event in self.rooms[room_id].timeline:
            if event["event_id"] == target:
                event["content"] = {}
                event["unsigned"] = {"redacted_because": dict(raw)}
        self.rooms[room_id].timeline.append(raw)
        return RedactionEvent.deserialize(raw)

    # the mautrix Client surface used by Surfaces

    async def create_room(self, **kwargs: Any) -> RoomID:
        self._maybe_fail("create_room")
        room_id = f"!r{next(self._ids)}"
        version = kwargs.get("room_version") or self.room_version
        create = {**(kwargs.get("creation_content") or {}), "room_version": version}
        if version.isdigit() and int(version) < 11:
            create["creator"] = str(self.mxid)  # rooms before v11 name their creator
        override = dict(kwargs.get("power_level_override") or {})
        users = override.get("users") or {}
        if creators_have_infinite_power(version) and self.mxid in users:
            raise MInvalidParam(400, "a creator cannot be given a power level in this room version")
        # Synapse starts from its defaults and replaces each top-level key the override gives.
        power_levels = {**_default_power_levels(self.mxid, version), **override}
        room = FakeRoom(room_id, self.mxid, create, name=kwargs.get("name"))
        self.rooms[room_id] = room
        self._set_state(room, "m.room.create", "", create)
        self._member(room, self.mxid, "join", self.mxid)
        self._set_state(room, "m.room.power_levels", "", power_levels)
        for item in kwargs.get("initial_state") or []:
            self._set_state(room, item["type"], item.get("state_key", ""), dict(item["content"]))
        if kwargs.get("name"):
            self._set_state(room, "m.room.name", "", {"name": kwargs["name"]})
        for user in kwargs.get("invitees") or []:
            self._member(room, user, "invite", self.mxid)
        await asyncio.sleep(0)
        return RoomID(room_id)

    def _set_state(self, room: FakeRoom, event_type: str, state_key: str,
                   content: dict[str, Any], sender: str | None = None) -> EventID:
        sender = sender or self.mxid
        event_id = self._append(room, {"type": event_type, "state_key": state_key,
                                       "sender": sender, "content": content})
        room.state[(event_type, state_key)] = (sender, content)
        room.state_ids[(event_type, state_key)] = ((sender, content), event_id)
        return event_id

    async def send_state_event(self, room_id: RoomID, event_type: Any, content: Any,
                               state_key: str = "", **_: Any) -> EventID:
        self._maybe_fail("send_state_event")
        room = self._require_joined(room_id)
        event_type = _type_str(event_type)
        self._require_level(room, state_level(room.snapshot(), event_type), f"send {event_type}")
        body = content.serialize() if hasattr(content, "serialize") else dict(content)
        return self._set_state(room, event_type, state_key, body)

    async def get_state_event(self, room_id: RoomID, event_type: Any, state_key: str = "") -> Any:
        try:
            return self.rooms[room_id].state[(_type_str(event_type), state_key)][1]
        except KeyError:
            raise MNotFound(404, "no such state") from None

    async def send_message_event(self, room_id: RoomID, event_type: Any, content: Any,
                                 txn_id: str | None = None, **_: Any) -> EventID:
        self._maybe_fail("send_message_event")
        # Like Synapse: a txn id already used (one user, one device here) returns its first event.
        if txn_id is not None and (room_id, txn_id) in self.txns:
            return self.txns[(room_id, txn_id)]
        room = self._require_joined(room_id)
        event_type = _type_str(event_type)
        self._require_level(room, _message_level(room, event_type), f"send {event_type}")
        body = content.serialize() if hasattr(content, "serialize") else dict(content)
        # Synapse refuses events over 64 KiB (its envelope adds about 1 KB to the content).
        if len(json.dumps(body, ensure_ascii=False).encode()) + 1024 > 65_536:
            raise MTooLarge(413, "event too large")
        event_id = self._append(room, {"type": event_type, "sender": self.mxid, "content": body})
        if txn_id is not None:
            self.txns[(room_id, txn_id)] = event_id
        await asyncio.sleep(0)
        return event_id

    async def invite_user(self, room_id: RoomID, user_id: UserID, **_: Any) -> None:
        self._maybe_fail("invite_user")
        room = self._require_joined(room_id)
        pl = room.snapshot().power_levels
        self._require_level(room, 0 if pl is None else _int(pl.get("invite"), 0), "invite")
        if room.members.get(user_id) in ("join", "invite"):
            raise MForbidden(403, f"{user_id} is already in the room")
        if room.members.get(user_id) == "ban":
            raise MForbidden(403, f"{user_id} is banned from the room")
        self._member(room, user_id, "invite", self.mxid)

    async def join_room(self, room_id: Any, **_: Any) -> RoomID:
        self._maybe_fail("join_room")
        room = self.rooms.get(room_id)
        if room is None:
            raise MNotFound(404, "no such room")
        # Our rooms and DMs are invite-only: joining needs an invite (or being in already).
        if room.members.get(self.mxid) not in ("invite", "join"):
            raise MForbidden(403, f"You are not invited to {room_id}")
        self._member(room, self.mxid, "join", self.mxid)
        return RoomID(room_id)

    async def leave_room(self, room_id: RoomID, reason: str | None = None, **_: Any) -> None:
        self._maybe_fail("leave_room")
        room = self.rooms.get(room_id)
        if room is None:
            raise MNotFound(404, "no such room")
        if room.members.get(self.mxid) not in ("invite", "join", "knock"):
            raise MForbidden(403, f"User {self.mxid} is not in room {room_id}")
        self._member(room, self.mxid, "leave", self.mxid)

    async def get_joined_rooms(self) -> list[RoomID]:
        return [RoomID(r) for r, room in self.rooms.items() if room.members.get(self.mxid) == "join"]

    async def get_joined_members(self, room_id: RoomID) -> dict[UserID, Any]:
        room = self.rooms[room_id]
        return {UserID(u): {} for u, m in room.members.items() if m == "join"}

    async def get_displayname(self, user_id: UserID) -> str | None:
        return self.displaynames.get(user_id)

    async def get_account_data(self, event_type: Any, room_id: Any = None) -> dict[str, Any]:
        data = self.account_data.get(_type_str(event_type))
        if data is None:
            raise MNotFound(404, "no account data")
        return data

    async def set_account_data(self, event_type: Any, content: Any, room_id: Any = None) -> None:
        self._maybe_fail("set_account_data")
        self.account_data[_type_str(event_type)] = dict(content)

    async def upload_media(self, data: bytes, mime_type: str | None = None,
                           filename: str | None = None, **_: Any) -> str:
        self._maybe_fail("upload_media")
        uri = f"mxc://localhost/media{next(self._ids)}"
        self.media[uri] = (bytes(data), mime_type, filename)
        return uri

    async def download_media(self, url: str, timeout_ms: int | None = None) -> bytes:
        """The media repository's download: what was uploaded, or the 404 aiohttp raises."""
        self._maybe_fail("download_media")
        self.downloads.append(str(url))
        stored = self.media.get(str(url))
        if stored is None:
            raise ClientResponseError(None, (), status=404, message="Not Found")  # type: ignore[arg-type]
        return stored[0]

    def media_message(self, room_id: str, sender: str, content: dict[str, Any]) -> MessageEvent:
        """Put a user's media message (any content) in the timeline, as the sync delivers it."""
        raw = {"type": "m.room.message", "event_id": self._event_id(), "sender": sender,
               "origin_server_ts": int(time.time() * 1000), "content": content,
               "room_id": room_id}
        self.rooms[room_id].timeline.append(raw)
        return MessageEvent.deserialize(raw)

    def room_events(self, room_id: str) -> list[dict[str, Any]]:
        """Every message event in the room (users' and the bot's), oldest first."""
        return [e for e in self.rooms[room_id].timeline if e["type"] == "m.room.message"]

    async def set_typing(self, room_id: RoomID, timeout: int = 0) -> None:
        self.typing.append((room_id, timeout))

    def rate_limit_next(self, name: str, times: int = 1) -> None:
        self.fail_next[name] += [MLimitExceeded(429, "slow down") for _ in range(times)]


class ConversationsBackend(Backend):
    """A provider that keeps conversations itself, as the Conversations API does.

    `create_chat(seed)` opens `conv_1`, `conv_2`… holding the seed (recorded in `seeds`). A
    request names its conversation (`chat_id`): the messages after its last answer are added
    there, and the answer says what the conversation holds, e.g. `conv_1 holds 3 messages (1
    new)`; the answer is kept too, and the usage reports one prompt token per word held. A
    request without a conversation (a summary) gets `summary of <n> messages`. Tests make it
    fail: `refuse_creates` refusals of `create_chat`, and conversations in `lost` are gone.
    """

    features = Features(streaming=True, server_state=True)

    def __init__(self, spec) -> None:
        super().__init__(spec)
        self.conversations: dict[str, list[ChatMessage]] = {}
        self.seeds: list[list[ChatMessage]] = []
        self.refuse_creates = 0
        self.lost: set[str] = set()
        self.lose_new_ones = False  # every conversation is gone as soon as it was created

    async def create_chat(self, seed=()) -> str:
        if self.refuse_creates:
            self.refuse_creates -= 1
            raise BackendError(ErrorKind.SERVER, "conversation store unavailable", status=503)
        chat_id = f"conv_{len(self.seeds) + 1}"
        self.seeds.append(list(seed))
        self.conversations[chat_id] = list(seed)
        if self.lose_new_ones:
            self.lost.add(chat_id)
        return chat_id

    async def stream(self, request: GenerationRequest):
        if not request.chat_id:
            yield Chunk(f"summary of {len(request.messages)} messages")
            return
        held = self.conversations.get(request.chat_id)
        if held is None or request.chat_id in self.lost:
            raise BackendError(ErrorKind.CHAT_GONE, f"conversation {request.chat_id} not found", status=404)
        answered = max((i for i, m in enumerate(request.messages) if m.role == "assistant"), default=-1)
        new = request.messages[answered + 1 :]
        held.extend(new)
        answer = f"{request.chat_id} holds {len(held) + 1} messages ({len(new)} new)"
        yield Chunk(answer)
        held.append(ChatMessage("assistant", answer))
        words = sum(len(m.content.split()) for m in held)
        yield Chunk(usage=Usage(prompt_tokens=words, completion_tokens=len(answer.split())))
