"""`onboarding_journal`: written before each createRoom of onboarding, so that after a
crash a half-done onboarding can be told apart from one that never started."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from mautrix.util.async_db import Connection

from .base import Repository, now_ms

Step = Literal["space", "room"]
Status = Literal["pending", "done"]
STEPS: tuple[str, ...] = ("space", "room")


@dataclass(frozen=True)
class JournalEntry:
    user_id: str
    step: Step
    status: Status
    room_id: str | None
    created_ms: int

    @classmethod
    def from_row(cls, row: Any) -> JournalEntry:
        return cls(
            user_id=row["user_id"],
            step=row["step"],
            status=row["status"],
            room_id=row["room_id"],
            created_ms=row["created_ms"],
        )


_COLUMNS = "user_id, step, status, room_id, created_ms"


class JournalStore(Repository):
    async def begin(
        self, user_id: str, step: Step, *, ts: int | None = None, conn: Connection | None = None
    ) -> None:
        """Record that `step` is about to create a room (status pending, no room yet)."""
        if step not in STEPS:
            raise ValueError(f"unknown onboarding step {step!r}")
        async with self._acquire(conn) as c:
            await c.execute(
                f"""INSERT INTO onboarding_journal ({_COLUMNS}) VALUES ($1, $2, 'pending', NULL, $3)
                ON CONFLICT (user_id, step) DO UPDATE SET status='pending', room_id=NULL,
                    created_ms=excluded.created_ms""",
                user_id,
                step,
                int(ts) if ts is not None else now_ms(),
            )

    async def complete(
        self, user_id: str, step: Step, room_id: str, *, conn: Connection | None = None
    ) -> None:
        """Record the room that `step` created (status done); creates the row if needed."""
        if step not in STEPS:
            raise ValueError(f"unknown onboarding step {step!r}")
        async with self._acquire(conn) as c:
            await c.execute(
                f"""INSERT INTO onboarding_journal ({_COLUMNS}) VALUES ($1, $2, 'done', $3, $4)
                ON CONFLICT (user_id, step) DO UPDATE SET status='done', room_id=excluded.room_id""",
                user_id,
                step,
                room_id,
                now_ms(),
            )

    async def get(
        self, user_id: str, step: Step, *, conn: Connection | None = None
    ) -> JournalEntry | None:
        async with self._acquire(conn) as c:
            row = await c.fetchrow(
                f"SELECT {_COLUMNS} FROM onboarding_journal WHERE user_id=$1 AND step=$2",
                user_id,
                step,
            )
        return JournalEntry.from_row(row) if row else None

    async def list_by_user(
        self, user_id: str, *, conn: Connection | None = None
    ) -> list[JournalEntry]:
        async with self._acquire(conn) as c:
            rows = await c.fetch(
                f"SELECT {_COLUMNS} FROM onboarding_journal WHERE user_id=$1 ORDER BY step DESC",
                user_id,
            )
        return [JournalEntry.from_row(r) for r in rows]

    async def list_pending(self, *, conn: Connection | None = None) -> list[JournalEntry]:
        async with self._acquire(conn) as c:
            rows = await c.fetch(
                f"""SELECT {_COLUMNS} FROM onboarding_journal WHERE status='pending'
                ORDER BY created_ms, user_id, step DESC"""
            )
        return [JournalEntry.from_row(r) for r in rows]

    async def delete(
        self, user_id: str, step: Step | None = None, *, conn: Connection | None = None
    ) -> None:
        """Forget one step, or with no step every entry of the user."""
        async with self._acquire(conn) as c:
            if step is None:
                await c.execute("DELETE FROM onboarding_journal WHERE user_id=$1", user_id)
            else:
                await c.execute(
                    "DELETE FROM onboarding_journal WHERE user_id=$1 AND step=$2", user_id, step
                )
