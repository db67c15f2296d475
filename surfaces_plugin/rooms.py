"""The room directory: which working rooms are routed, to whom they belong, what they say.

A working room is its binding (what Matrix says, `layout.Binding`) plus what only the cache
knows (its place in the Space, its last activity). The map lives in memory, rebuilt by
reconciliation and saved in the cache, so routing a message needs no database or homeserver call.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from . import layout
from .clock import now_ms, utc_text
from .matrix import MatrixIO
from .store.rooms import Room, RoomStore


@dataclass(frozen=True)
class WorkingRoom:
    room_id: str
    binding: layout.Binding
    order_key: str = ""
    last_activity_ms: int | None = None

    # read-through to the binding: code reads `room.owner`, the binding is the one source
    @property
    def owner(self) -> str:
        return self.binding.owner

    @property
    def space_id(self) -> str:
        return self.binding.space_id

    @property
    def agent(self) -> str:
        return self.binding.agent

    @property
    def title(self) -> str:
        return self.binding.title

    @property
    def platform_chat_id(self) -> str:
        return self.binding.platform_chat_id or ""

    @property
    def system_prompt(self) -> str | None:
        return self.binding.system_prompt

    @property
    def archived(self) -> bool:
        return self.binding.archived

    @property
    def voice(self) -> bool:
        """Answers are also sent as voice messages (`!ai voice on`)."""
        return self.binding.voice is True

    def streams(self, default: bool) -> bool:
        """Whether answers here stream: the room's `!ai stream` choice, else the config's."""
        return default if self.binding.stream is None else self.binding.stream

    def with_binding(self, **changes: Any) -> WorkingRoom:
        return dataclasses.replace(self, binding=dataclasses.replace(self.binding, **changes))

    def last_activity_text(self) -> str:
        return utc_text(self.last_activity_ms)

    def to_row(self) -> Room:
        return Room(
            room_id=self.room_id,
            kind="working",
            owner=self.owner,
            binding=self.binding,
            order_key=self.order_key,
            last_activity_ms=self.last_activity_ms,
        )

    @classmethod
    def from_row(cls, row: Room) -> WorkingRoom | None:
        """The routed shape of a cached row; None for a Space or a room without a chat id."""
        if row.binding is None or not row.binding.platform_chat_id:
            return None
        return cls(row.room_id, row.binding, row.order_key or "", row.last_activity_ms)


class RoomDirectory:
    def __init__(self, io: MatrixIO, rooms: RoomStore, log: logging.Logger) -> None:
        self.io = io
        self.store = rooms
        self.log = log
        self._rooms: dict[str, WorkingRoom] = {}

    def load(self, rooms: list[WorkingRoom]) -> None:
        self._rooms = {room.room_id: room for room in rooms}

    async def load_from_cache(self) -> None:
        rows = await self.store.list_all(kind="working")
        self.load([room for row in rows if (room := WorkingRoom.from_row(row)) is not None])

    def room(self, room_id: str) -> WorkingRoom | None:
        """A routed (not archived) working room."""
        room = self._rooms.get(room_id)
        return room if room is not None and not room.archived else None

    def current(self, room: WorkingRoom) -> WorkingRoom:
        """The room as it is now: a conversation renewed meanwhile has a new platform_chat_id."""
        return self._rooms.get(room.room_id, room)

    def all_rooms(self) -> list[WorkingRoom]:
        return list(self._rooms.values())

    def rooms_of(self, owner: str) -> list[WorkingRoom]:
        """The owner's routed rooms in Space order."""
        rooms = [r for r in self._rooms.values() if r.owner == owner and not r.archived]
        return sorted(rooms, key=lambda r: (r.order_key, r.room_id))

    def has_any(self, owner: str) -> bool:
        """Any working room, archived ones included."""
        return any(room.owner == owner for room in self._rooms.values())

    async def lose(self, room_id: str) -> None:
        """The bot was removed from a room: stop routing it; reconciliation records it as lost."""
        room = self._rooms.pop(room_id, None)
        if room is not None:
            self.log.warning("Removed from working room %s of %s", room_id, room.owner)
            row = await self.store.get(room_id)
            if row is not None:
                await self.store.upsert(dataclasses.replace(row, bot_membership="lost"))

    async def remember(self, room: WorkingRoom) -> None:
        """Put a (new or changed) room in the map and the cache."""
        self._rooms[room.room_id] = room
        await self.store.upsert(room.to_row())

    async def update_binding(self, room: WorkingRoom, **changes: Any) -> WorkingRoom:
        """Change the binding in Matrix first (Matrix is the truth), then here."""
        updated = room.with_binding(**changes)
        await self.io.send_state(
            "update the room's binding", room.room_id, layout.BINDING, updated.binding.to_content()
        )
        await self.remember(updated)
        return updated

    async def touch(self, room: WorkingRoom, ts: int | None = None) -> None:
        """Record activity for `!ai rooms` (cache only); an older `ts` changes nothing."""
        current = self._rooms.get(room.room_id, room)
        ts = now_ms() if ts is None else ts
        if current.last_activity_ms is None or ts > current.last_activity_ms:
            await self.remember(dataclasses.replace(current, last_activity_ms=ts))
