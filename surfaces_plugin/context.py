"""One incoming command: who sent it, where, and how to answer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mautrix.types import EventID, MessageEvent, RoomID, UserID

if TYPE_CHECKING:
    from .app import Surfaces
    from .chats import WorkingRoom
    from .config import Settings


@dataclass
class Request:
    app: Surfaces
    event: MessageEvent

    @property
    def sender(self) -> UserID:
        return self.event.sender

    @property
    def room_id(self) -> RoomID:
        return self.event.room_id

    @property
    def settings(self) -> Settings:
        return self.app.settings

    @property
    def is_admin(self) -> bool:
        return self.settings.access.is_admin(self.sender)

    async def reply(self, text: str) -> EventID:
        return await self.app.send_notice(self.room_id, text)

    async def working_room(self) -> WorkingRoom | None:
        """The working room this command was sent in, when the sender owns it."""
        room = self.app.chats.room(self.room_id)
        if room is None or room.owner != self.sender:
            return None
        return room
