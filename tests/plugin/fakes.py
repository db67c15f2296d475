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

from mautrix.errors import MForbidden, MLimitExceeded, MNotFound, MTooLarge
from mautrix.types import (
    EventID,
    MessageEvent,
    RedactionEvent,
    RoomID,
    UserID,
)


@dataclass
class FakeRoom:
    room_id: str
    creator: str
    create_content: dict[str, Any]
    name: str | None = None
    state: dict[tuple[str, str], tuple[str, dict[str, Any]]] = field(default_factory=dict)
    members: dict[str, str] = field(default_factory=dict)  # user → membership
    timeline: list[dict[str, Any]] = field(default_factory=list)


def _type_str(event_type: Any) -> str:
    return event_type.t if hasattr(event_type, "t") else str(event_type)


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
            room_id = path.split("/rooms/")[1].split("/")[0]
            from urllib.parse import unquote

            room = self.client.rooms[unquote(room_id)]
            events = list(reversed(room.timeline))
            query = query_params or {}
            limit = self.client.page_limit or int(query.get("limit", len(events) or 1))
            start = int(query.get("from") or 0)
            self.client.pages_read += 1
            end = start + limit
            return {"chunk": events[start:end], "end": str(end) if end < len(events) else None}
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
                 "event_id": f"$state-{t}-{k}", "origin_server_ts": 0}
                for (t, k), (sender, content) in room.state.items()
            ] + [
                {"type": "m.room.member", "state_key": user, "sender": user,
                 "content": {"membership": membership}, "event_id": f"$m-{user}"}
                for user, membership in room.members.items()
            ]
        event_type, _, state_key = rest.strip("/").partition("/")
        try:
            return room.state[(unquote(event_type), unquote(state_key))][1]
        except KeyError:
            raise MNotFound(404, "no such state") from None


class FakeClient:
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
        self.page_limit: int | None = None  # force small /messages pages to exercise paging
        self.pages_read = 0
        self.txns: dict[tuple[str, str], EventID] = {}  # (room, txn id) → the event it sent

    # helpers for tests

    def _maybe_fail(self, name: str) -> None:
        self.calls.append((name, None))
        if self.fail_next[name]:
            raise self.fail_next[name].pop(0)

    def _event_id(self) -> EventID:
        return EventID(f"$ev{next(self._ids)}")

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
        room_id = f"!room{next(self._ids)}"
        self.rooms[room_id] = FakeRoom(room_id, creator, {}, members=dict(members or {}))
        return room_id

    def user_message(self, room_id: str, sender: str, body: str,
                     msgtype: str = "m.text") -> MessageEvent:
        """Put a user's message in the timeline and return it as the sync would deliver it."""
        raw = {"type": "m.room.message", "event_id": self._event_id(), "sender": sender,
               "origin_server_ts": int(time.time() * 1000),
               "content": {"msgtype": msgtype, "body": body}, "room_id": room_id}
        self.rooms[room_id].timeline.append(raw)
        return MessageEvent.deserialize(raw)

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
        if version not in ("12",):
            create["creator"] = str(self.mxid)  # pre-v11 rooms name their creator
        room = FakeRoom(room_id, self.mxid, create, name=kwargs.get("name"))
        room.members[self.mxid] = "join"
        room.state[("m.room.create", "")] = (self.mxid, room.create_content)
        room.state[("m.room.power_levels", "")] = (self.mxid, kwargs.get("power_level_override") or {})
        for item in kwargs.get("initial_state") or []:
            room.state[(item["type"], item.get("state_key", ""))] = (self.mxid, item["content"])
        self.rooms[room_id] = room
        await asyncio.sleep(0)
        return RoomID(room_id)

    async def send_state_event(self, room_id: RoomID, event_type: Any, content: Any,
                               state_key: str = "", **_: Any) -> EventID:
        self._maybe_fail("send_state_event")
        if room_id not in self.rooms:
            raise MNotFound(404, "no such room")
        self.rooms[room_id].state[(_type_str(event_type), state_key)] = (self.mxid, dict(content))
        return self._event_id()

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
        body = content.serialize() if hasattr(content, "serialize") else dict(content)
        # Synapse refuses events over 64 KiB (its envelope adds about 1 KB to the content).
        if len(json.dumps(body, ensure_ascii=False).encode()) + 1024 > 65_536:
            raise MTooLarge(413, "event too large")
        event_id = self._event_id()
        if txn_id is not None:
            self.txns[(room_id, txn_id)] = event_id
        self.rooms[room_id].timeline.append(
            {"type": _type_str(event_type), "event_id": event_id, "sender": self.mxid,
             "origin_server_ts": int(time.time() * 1000), "content": body, "room_id": room_id}
        )
        await asyncio.sleep(0)
        return event_id

    async def invite_user(self, room_id: RoomID, user_id: UserID, **_: Any) -> None:
        self._maybe_fail("invite_user")
        room = self.rooms[room_id]
        if room.members.get(user_id) in ("join", "invite"):
            raise MForbidden(403, f"{user_id} is already in the room")
        room.members[user_id] = "invite"

    async def join_room(self, room_id: Any, **_: Any) -> RoomID:
        self._maybe_fail("join_room")
        self.rooms[room_id].members[self.mxid] = "join"
        return RoomID(room_id)

    async def leave_room(self, room_id: RoomID, reason: str | None = None, **_: Any) -> None:
        self._maybe_fail("leave_room")
        self.rooms[room_id].members[self.mxid] = "leave"

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

    def room_events(self, room_id: str) -> list[dict[str, Any]]:
        """Every message event in the room (users' and the bot's), oldest first."""
        return [e for e in self.rooms[room_id].timeline if e["type"] == "m.room.message"]

    async def set_typing(self, room_id: RoomID, timeout: int = 0) -> None:
        self.typing.append((room_id, timeout))

    def rate_limit_next(self, name: str, times: int = 1) -> None:
        self.fail_next[name] += [MLimitExceeded(429, "slow down") for _ in range(times)]
