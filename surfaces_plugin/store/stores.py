"""`Stores`: every repository over one database, and the one-transaction cache rebuild."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

from mautrix.util.async_db import Database

from .chats import Chat, ChatStore
from .memory import MemoryStore
from .messages import MessageStore
from .processed import ProcessedStore
from .rooms import Room, RoomStore
from .usage import UsageStore
from .users import User, UserStore


class Stores:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.users = UserStore(db)
        self.rooms = RoomStore(db)
        self.chats = ChatStore(db)
        self.messages = MessageStore(db)
        self.memory = MemoryStore(db)
        self.processed = ProcessedStore(db)
        self.usage = UsageStore(db)

    async def move_chat(self, old_id: str, new_id: str) -> None:
        """Chat `old_id` (its row and messages) goes on under `new_id`, in one transaction."""
        async with self.db.acquire() as conn, conn.transaction():
            await self.chats.rekey(old_id, new_id, conn=conn)
            await self.messages.rekey(old_id, new_id, conn=conn)

    async def replace_topology(
        self,
        users: Iterable[User],
        rooms: Iterable[Room],
        chats: Iterable[Chat],
        *,
        memories: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        """Replace the cached layout with rows rebuilt from Matrix, in one transaction.

        The given rows are upserted as present (missing=false); users, rooms and chats not
        given are kept but flagged missing. Columns only this DB knows survive (see each
        store's `upsert`). `memories` (user id -> notes), when given, are written too.
        Either all of it is written or, on error, none of it.
        """
        user_rows = [dataclasses.replace(u, missing=False) for u in users]
        room_rows = [dataclasses.replace(r, missing=False) for r in rooms]
        chat_rows = [dataclasses.replace(c, missing=False) for c in chats]
        async with self.db.acquire() as conn, conn.transaction():
            await self.users.upsert_many(user_rows, conn=conn)
            await self.rooms.upsert_many(room_rows, conn=conn)
            await self.chats.upsert_many(chat_rows, conn=conn)
            await self.users.mark_missing_except((u.user_id for u in user_rows), conn=conn)
            await self.rooms.mark_missing_except((r.room_id for r in room_rows), conn=conn)
            await self.chats.mark_missing_except(
                (c.platform_chat_id for c in chat_rows), conn=conn
            )
            for user_id, notes in (memories or {}).items():
                await self.memory.set(user_id, notes, conn=conn)
