"""`memory`: cache of each user's shared notes (the Space's `org.surfaces.memory`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mautrix.util.async_db import Connection

from .base import Repository, storable


@dataclass(frozen=True)
class CachedNotes:
    user_id: str
    notes: tuple[str, ...]

    @classmethod
    def from_row(cls, row: Any) -> CachedNotes:
        try:
            notes = json.loads(row["notes"])
        except ValueError:
            notes = []
        if not isinstance(notes, list):
            notes = []
        return cls(user_id=row["user_id"], notes=tuple(str(n) for n in notes))


class MemoryStore(Repository):
    async def get(self, user_id: str, *, conn: Connection | None = None) -> CachedNotes | None:
        async with self._acquire(conn) as c:
            row = await c.fetchrow("SELECT user_id, notes FROM memory WHERE user_id=$1", user_id)
        return CachedNotes.from_row(row) if row else None

    async def set(
        self, user_id: str, notes: Sequence[str], *, conn: Connection | None = None
    ) -> None:
        async with self._acquire(conn) as c:
            await c.execute(
                """INSERT INTO memory (user_id, notes) VALUES ($1, $2)
                ON CONFLICT (user_id) DO UPDATE SET notes=excluded.notes""",
                user_id,
                storable(json.dumps([str(n) for n in notes], ensure_ascii=False)),
            )
