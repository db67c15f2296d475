"""Chat bindings: which working room talks to which conversation (`platform_chat_id`) and agent.

The room → chat map lives in memory (rebuilt by reconciliation, saved in the cache) so the
message path needs no database or homeserver lookup to route a message.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mautrix.types import RoomID

from . import layout
from .backends import ChatMessage, GenerationRequest, Usage
from .config import AgentSpec
from .context_window import assemble
from .store.chats import Chat
from .store.messages import DuplicateEventError, Message
from .store.rooms import Room as RoomRow

if TYPE_CHECKING:
    from .app import Surfaces
    from .dispatch import Job


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class WorkingRoom:
    room_id: str
    owner: str
    space_id: str
    agent: str
    title: str
    platform_chat_id: str
    system_prompt: str | None = None
    archived: bool = False
    order_key: str = ""
    last_activity_ms: int | None = None

    def binding(self) -> layout.Binding:
        return layout.Binding(
            owner=self.owner,
            space_id=self.space_id,
            agent=self.agent,
            platform_chat_id=self.platform_chat_id,
            title=self.title,
            system_prompt=self.system_prompt,
            archived=self.archived,
        )

    def last_activity_text(self) -> str:
        if not self.last_activity_ms:
            return "never"
        return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self.last_activity_ms / 1000))

    def to_row(self) -> RoomRow:
        return RoomRow(
            room_id=self.room_id,
            kind="working",
            owner=self.owner,
            space_id=self.space_id,
            agent=self.agent,
            title=self.title,
            platform_chat_id=self.platform_chat_id,
            system_prompt=self.system_prompt,
            archived=self.archived,
            order_key=self.order_key,
            last_activity_ms=self.last_activity_ms,
        )

    @classmethod
    def from_row(cls, row: RoomRow) -> WorkingRoom:
        return cls(
            room_id=row.room_id,
            owner=row.owner,
            space_id=row.space_id or "",
            agent=row.agent or "",
            title=row.title or "",
            platform_chat_id=row.platform_chat_id or "",
            system_prompt=row.system_prompt,
            archived=row.archived,
            order_key=row.order_key or "",
            last_activity_ms=row.last_activity_ms,
        )


class ChatManager:
    def __init__(self, app: Surfaces) -> None:
        self.app = app
        self._rooms: dict[str, WorkingRoom] = {}

    # the in-memory map

    def load(self, rooms: list[WorkingRoom]) -> None:
        self._rooms = {room.room_id: room for room in rooms}

    async def load_from_cache(self) -> None:
        rows = await self.app.stores.rooms.list_all()
        self.load(
            [WorkingRoom.from_row(r) for r in rows if r.kind == "working" and not r.missing]
        )

    def room(self, room_id: RoomID | str) -> WorkingRoom | None:
        """A routed (not archived) working room."""
        room = self._rooms.get(room_id)
        return room if room is not None and not room.archived else None

    def all_rooms(self) -> list[WorkingRoom]:
        return list(self._rooms.values())

    async def rooms_of(self, owner: str) -> list[WorkingRoom]:
        rooms = [r for r in self._rooms.values() if r.owner == owner and not r.archived]
        return sorted(rooms, key=lambda r: (r.order_key, r.room_id))

    async def remember(self, room: WorkingRoom) -> None:
        """Put a (new or changed) room in the map and the cache."""
        self._rooms[room.room_id] = room
        await self.app.stores.rooms.upsert(room.to_row())

    # the binding, written to Matrix first: Matrix is the truth

    async def update_binding(self, room: WorkingRoom, **changes: Any) -> WorkingRoom:
        updated = dataclasses.replace(room, **changes)
        await self.write_binding(updated)
        await self.remember(updated)
        return updated

    async def write_binding(self, room: WorkingRoom) -> None:
        content = room.binding().to_content()
        await self.app.gateway.write(
            "update the room's binding",
            lambda: self.app.client.send_state_event(
                RoomID(room.room_id), layout.BINDING, content, state_key=""
            ),
        )

    async def touch(self, room: WorkingRoom) -> None:
        """Record activity for `!ai rooms` (cache only)."""
        current = self._rooms.get(room.room_id, room)
        await self.remember(dataclasses.replace(current, last_activity_ms=now_ms()))

    # conversations

    async def start_chat(self, room: WorkingRoom) -> None:
        await self.app.stores.chats.upsert(
            Chat(
                platform_chat_id=room.platform_chat_id,
                room_id=room.room_id,
                agent=room.agent,
                created_ms=now_ms(),
            )
        )

    async def is_answered(self, room: WorkingRoom, event_id: str, ts: int) -> bool:
        """Answered already: at or before the room's processed mark (answers go in order)."""
        mark = await self.app.stores.processed.get(room.room_id)
        return mark is not None and (mark.event_id == event_id or mark.ts > ts)

    async def mark_processed(self, room: WorkingRoom, event_id: str, ts: int) -> None:
        await self.app.stores.processed.mark(room.room_id, event_id, ts)

    async def add_user_turn(
        self, room: WorkingRoom, event_id: str, sender: str, body: str, ts: int
    ) -> None:
        try:
            await self.app.stores.messages.append(
                room.platform_chat_id, "user", body, event_id=event_id, sender=sender, ts=ts
            )
        except DuplicateEventError:
            pass  # stored before a crash; answer it without storing it twice
        await self.touch(room)

    async def add_answer(
        self, room: WorkingRoom, text: str, event_id: str, usage: Usage | None
    ) -> None:
        tokens = usage.completion_tokens if usage is not None else None
        try:
            await self.app.stores.messages.append(
                room.platform_chat_id,
                "assistant",
                text,
                event_id=event_id,
                sender=self.app.bot_id,
                tokens=tokens,
            )
        except DuplicateEventError:
            pass

    async def last_user_turn(self, room: WorkingRoom) -> Message | None:
        return await self.app.stores.messages.last_user_message(room.platform_chat_id)

    async def build_request(
        self, room: WorkingRoom, agent: AgentSpec, upto_seq: int | None = None
    ) -> GenerationRequest:
        history = await self.app.stores.messages.history(room.platform_chat_id)
        turns = [
            ChatMessage(role=m.role, content=m.content)  # type: ignore[arg-type]
            for m in history
            if m.role in ("user", "assistant") and (upto_seq is None or m.seq <= upto_seq)
        ]
        window = assemble(
            system_prompt=room.system_prompt or agent.system_prompt,
            memory=(),
            summary=None,
            turns=turns,
            budget=agent.context_tokens,
        )
        return GenerationRequest(
            model=agent.model, messages=window.messages, temperature=agent.temperature
        )

    async def missed_messages(self) -> list[Job]:
        """Owner messages sent while the bot was down, oldest first (read from the timeline)."""
        from .catchup import find_missed

        return await find_missed(self.app, [r for r in self._rooms.values() if not r.archived])
