"""`users`: one row per person the bot knows (access decision, Space, DM)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from mautrix.util.async_db import Connection

from ..clock import now_ms
from .base import Repository

AccessState = Literal["approved", "blocked", "pending"]
ACCESS_STATES: tuple[str, ...] = ("approved", "blocked", "pending")


@dataclass(frozen=True)
class User:
    user_id: str
    space_id: str | None = None
    access_state: AccessState | None = None
    access_by: str | None = None
    access_ts: int | None = None
    dm_room_id: str | None = None
    missing: bool = False
    updated_at: int | None = None  # set by the store when None

    @classmethod
    def from_row(cls, row: Any) -> User:
        return cls(
            user_id=row["user_id"],
            space_id=row["space_id"],
            access_state=row["access_state"],
            access_by=row["access_by"],
            access_ts=row["access_ts"],
            dm_room_id=row["dm_room_id"],
            missing=bool(row["missing"]),
            updated_at=row["updated_at"],
        )

    def values(self) -> tuple[Any, ...]:
        return (
            self.user_id,
            self.space_id,
            self.access_state,
            self.access_by,
            self.access_ts,
            self.dm_room_id,
            bool(self.missing),
            self.updated_at if self.updated_at is not None else now_ms(),
        )


_COLUMNS = "user_id, space_id, access_state, access_by, access_ts, dm_room_id, missing, updated_at"


class UserStore(Repository):
    _upsert = f"""
        INSERT INTO users ({_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
        ON CONFLICT (user_id) DO UPDATE SET
            space_id=excluded.space_id, access_state=excluded.access_state,
            access_by=excluded.access_by, access_ts=excluded.access_ts,
            dm_room_id=COALESCE(excluded.dm_room_id, users.dm_room_id),
            missing=excluded.missing, updated_at=excluded.updated_at
    """

    async def get(self, user_id: str, *, conn: Connection | None = None) -> User | None:
        async with self._acquire(conn) as c:
            row = await c.fetchrow(f"SELECT {_COLUMNS} FROM users WHERE user_id=$1", user_id)
        return User.from_row(row) if row else None

    async def upsert_many(self, users: Iterable[User], *, conn: Connection | None = None) -> None:
        records = [u.values() for u in users]
        if records:
            async with self._acquire(conn) as c:
                await c.executemany(self._upsert, records)

    async def list_all(
        self, *, include_missing: bool = False, conn: Connection | None = None
    ) -> list[User]:
        query = f"SELECT {_COLUMNS} FROM users"
        if not include_missing:
            query += " WHERE missing=false"
        async with self._acquire(conn) as c:
            rows = await c.fetch(query + " ORDER BY user_id")
        return [User.from_row(r) for r in rows]

    async def set_access(
        self,
        user_id: str,
        state: AccessState | None,
        *,
        by: str | None = None,
        ts: int | None = None,
        conn: Connection | None = None,
    ) -> None:
        """Record an access decision, creating the user row when needed."""
        if state is not None and state not in ACCESS_STATES:
            raise ValueError(f"unknown access state {state!r}")
        now = now_ms()
        async with self._acquire(conn) as c:
            await c.execute(
                """INSERT INTO users (user_id, access_state, access_by, access_ts, updated_at)
                VALUES ($1, $2, $3, $4, $5)
                ON CONFLICT (user_id) DO UPDATE SET access_state=excluded.access_state,
                    access_by=excluded.access_by, access_ts=excluded.access_ts,
                    updated_at=excluded.updated_at""",
                user_id,
                state,
                by,
                ts if ts is not None else now,
                now,
            )

    async def set_space(
        self, user_id: str, space_id: str | None, *, conn: Connection | None = None
    ) -> None:
        """Record the user's canonical Space, creating the user row when needed."""
        await self._set_column("space_id", user_id, space_id, conn)

    async def set_dm_room(
        self, user_id: str, dm_room_id: str | None, *, conn: Connection | None = None
    ) -> None:
        """Record (or with None, forget) the user's DM with the bot, creating the row when needed."""
        await self._set_column("dm_room_id", user_id, dm_room_id, conn)

    async def _set_column(
        self, column: str, user_id: str, value: str | None, conn: Connection | None
    ) -> None:
        assert column in ("space_id", "dm_room_id")  # a fixed name, never user input
        async with self._acquire(conn) as c:
            await c.execute(
                f"""INSERT INTO users (user_id, {column}, updated_at) VALUES ($1, $2, $3)
                ON CONFLICT (user_id) DO UPDATE SET {column}=excluded.{column},
                    updated_at=excluded.updated_at""",
                user_id,
                value,
                now_ms(),
            )

    async def mark_missing_except(
        self, seen: Iterable[str], *, conn: Connection | None = None
    ) -> None:
        await self._flag_missing_except("users", "user_id", seen, conn)
