"""`rooms`: the Spaces and working rooms the bot manages, as last seen in Matrix."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from mautrix.util.async_db import Connection

from ..layout import Binding
from .base import Repository, storable

RoomKind = Literal["space", "working"]
BotMembership = Literal["join", "lost"]


@dataclass(frozen=True)
class Room:
    """A cached room. A working room's binding is the one in Matrix; the rest only the cache knows."""

    room_id: str
    kind: RoomKind
    owner: str
    binding: Binding | None = None  # working rooms; None for a Space
    order_key: str | None = None
    bot_membership: BotMembership | None = "join"
    owner_membership: str | None = None
    last_activity_ms: int | None = None
    missing: bool = False
    created_ms: int | None = None

    # The one mapping between the binding and its columns.
    @classmethod
    def from_row(cls, row: Any) -> Room:
        binding = None
        if row["kind"] == "working" and row["space_id"] and row["agent"]:
            binding = Binding(
                owner=row["owner"],
                space_id=row["space_id"],
                agent=row["agent"],
                title=row["title"] or "",
                platform_chat_id=row["platform_chat_id"] or None,
                system_prompt=row["system_prompt"],
                archived=bool(row["archived"]),
                voice=None if row["voice"] is None else bool(row["voice"]),
                stream=None if row["stream"] is None else bool(row["stream"]),
            )
        return cls(
            room_id=row["room_id"],
            kind=row["kind"],
            owner=row["owner"],
            binding=binding,
            order_key=row["order_key"],
            bot_membership=row["bot_membership"],
            owner_membership=row["owner_membership"],
            last_activity_ms=row["last_activity_ms"],
            missing=bool(row["missing"]),
            created_ms=row["created_ms"],
        )

    def values(self) -> tuple[Any, ...]:
        b = self.binding
        return (
            self.room_id,
            self.kind,
            self.owner,
            b.space_id if b else None,
            b.agent if b else None,
            storable(b.title) if b else None,
            b.platform_chat_id if b else None,
            storable(b.system_prompt) if b else None,
            bool(b and b.archived),
            self.order_key,
            self.bot_membership,
            self.owner_membership,
            self.last_activity_ms,
            bool(self.missing),
            self.created_ms,
            b.voice if b else None,
            b.stream if b else None,
        )


_COLUMNS = (
    "room_id, kind, owner, space_id, agent, title, platform_chat_id, system_prompt, archived,"
    " order_key, bot_membership, owner_membership, last_activity_ms, missing, created_ms, voice,"
    " stream"
)
# Keeps the newest of the stored and the given value; NULL never erases a known one.
_NEWEST_ACTIVITY = """CASE WHEN rooms.last_activity_ms IS NULL
        OR excluded.last_activity_ms > rooms.last_activity_ms
    THEN excluded.last_activity_ms ELSE rooms.last_activity_ms END"""


class RoomStore(Repository):
    _upsert = f"""
        INSERT INTO rooms ({_COLUMNS})
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)
        ON CONFLICT (room_id) DO UPDATE SET
            kind=excluded.kind, owner=excluded.owner, space_id=excluded.space_id,
            agent=excluded.agent, title=excluded.title,
            platform_chat_id=excluded.platform_chat_id, system_prompt=excluded.system_prompt,
            archived=excluded.archived, order_key=excluded.order_key,
            bot_membership=excluded.bot_membership, owner_membership=excluded.owner_membership,
            last_activity_ms={_NEWEST_ACTIVITY},
            missing=excluded.missing,
            created_ms=COALESCE(excluded.created_ms, rooms.created_ms),
            voice=excluded.voice,
            stream=excluded.stream
    """

    async def get(self, room_id: str, *, conn: Connection | None = None) -> Room | None:
        async with self._acquire(conn) as c:
            row = await c.fetchrow(f"SELECT {_COLUMNS} FROM rooms WHERE room_id=$1", room_id)
        return Room.from_row(row) if row else None

    async def upsert(self, room: Room, *, conn: Connection | None = None) -> None:
        """Write every column, except that `last_activity_ms` only moves forward and a None
        `last_activity_ms`/`created_ms` keeps the stored value (Matrix state does not hold them)."""
        async with self._acquire(conn) as c:
            await c.execute(self._upsert, *room.values())

    async def upsert_many(self, rooms: Iterable[Room], *, conn: Connection | None = None) -> None:
        records = [r.values() for r in rooms]
        if records:
            async with self._acquire(conn) as c:
                await c.executemany(self._upsert, records)

    async def list_all(
        self,
        *,
        kind: RoomKind | None = None,
        include_missing: bool = False,
        conn: Connection | None = None,
    ) -> list[Room]:
        """Rooms in Space order (order_key, then creation, then id)."""
        where: list[str] = []
        args: list[Any] = []
        if kind is not None:
            args.append(kind)
            where.append("kind=$1")
        if not include_missing:
            where.append("missing=false")
        query = f"SELECT {_COLUMNS} FROM rooms"
        if where:
            query += " WHERE " + " AND ".join(where)
        # NULL order keys sort last on both engines only when spelled out.
        query += (
            " ORDER BY CASE WHEN order_key IS NULL THEN 1 ELSE 0 END, order_key,"
            " CASE WHEN created_ms IS NULL THEN 1 ELSE 0 END, created_ms, room_id"
        )
        async with self._acquire(conn) as c:
            rows = await c.fetch(query, *args)
        return [Room.from_row(r) for r in rows]

    async def mark_missing_except(
        self, seen: Iterable[str], *, conn: Connection | None = None
    ) -> None:
        await self._flag_missing_except("rooms", "room_id", seen, conn)
