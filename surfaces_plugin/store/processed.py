"""`processed`: per room, the newest user message whose answer has been stored; catch-up
after a restart starts after it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mautrix.util.async_db import Connection

from .base import Repository


@dataclass(frozen=True)
class Processed:
    room_id: str
    event_id: str
    ts: int

    @classmethod
    def from_row(cls, row: Any) -> Processed:
        return cls(room_id=row["room_id"], event_id=row["event_id"], ts=row["ts"])


class ProcessedStore(Repository):
    async def mark(
        self, room_id: str, event_id: str, ts: int, *, conn: Connection | None = None
    ) -> None:
        """Record `event_id` as processed unless a newer message (by ts) already is."""
        async with self._acquire(conn) as c:
            await c.execute(
                """INSERT INTO processed (room_id, event_id, ts) VALUES ($1, $2, $3)
                ON CONFLICT (room_id) DO UPDATE SET event_id=excluded.event_id, ts=excluded.ts
                WHERE processed.ts <= excluded.ts""",
                room_id,
                event_id,
                int(ts),
            )

    async def get(self, room_id: str, *, conn: Connection | None = None) -> Processed | None:
        async with self._acquire(conn) as c:
            row = await c.fetchrow(
                "SELECT room_id, event_id, ts FROM processed WHERE room_id=$1", room_id
            )
        return Processed.from_row(row) if row else None
