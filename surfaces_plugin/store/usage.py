"""`usage_entries`: the token ledger, one row per answer or summary; `usage_notices`: the
(room, day) pairs whose over-quota notice was sent."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mautrix.util.async_db import Connection

from .base import Repository

# The row written once a ledger is complete (rebuilt, or started empty): its absence at start
# means the database was lost (or is new) and the ledger is rebuilt from the timelines.
OPENED_ENTRY = "ledger opened"


@dataclass(frozen=True)
class UsageEntry:
    entry_id: str  # the Matrix event that carries the usage (an answer's last message, a summary)
    user_id: str
    agent: str
    day: str  # UTC, YYYY-MM-DD
    prompt_tokens: int
    completion_tokens: int
    estimated: bool
    ts: int


@dataclass(frozen=True)
class UsageSum:
    """Tokens of one user and agent on one day; `estimated_tokens` of them were estimated."""

    user_id: str
    agent: str
    day: str
    prompt_tokens: int
    completion_tokens: int
    estimated_tokens: int

    @classmethod
    def from_row(cls, row: Any) -> UsageSum:
        return cls(
            user_id=row["user_id"],
            agent=row["agent"],
            day=row["day"],
            prompt_tokens=int(row["prompt"]),
            completion_tokens=int(row["completion"]),
            estimated_tokens=int(row["estimated"]),
        )


class UsageStore(Repository):
    async def add(self, entry: UsageEntry, *, conn: Connection | None = None) -> bool:
        """Store `entry` unless one with its id is there already; True when it was new."""
        async with self._acquire(conn) as c:
            if await c.fetchval("SELECT 1 FROM usage_entries WHERE entry_id=$1", entry.entry_id):
                return False
            await c.execute(
                """INSERT INTO usage_entries (entry_id, user_id, agent, day, prompt_tokens,
                completion_tokens, estimated, ts) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                ON CONFLICT (entry_id) DO NOTHING""",
                entry.entry_id,
                entry.user_id,
                entry.agent,
                entry.day,
                entry.prompt_tokens,
                entry.completion_tokens,
                entry.estimated,
                entry.ts,
            )
        return True

    async def sums(
        self, since_day: str, user_id: str | None = None, *, conn: Connection | None = None
    ) -> list[UsageSum]:
        """Per user, agent and day from `since_day` on (one user's, or everyone's)."""
        query = """SELECT user_id, agent, day, SUM(prompt_tokens) AS prompt,
            SUM(completion_tokens) AS completion,
            SUM(CASE WHEN estimated THEN prompt_tokens + completion_tokens ELSE 0 END) AS estimated
            FROM usage_entries WHERE day >= $1 AND user_id <> ''"""
        args: list[Any] = [since_day]
        if user_id is not None:
            query += " AND user_id = $2"
            args.append(user_id)
        query += " GROUP BY user_id, agent, day ORDER BY user_id, agent, day"
        async with self._acquire(conn) as c:
            rows = await c.fetch(query, *args)
        return [UsageSum.from_row(r) for r in rows]

    async def is_open(self, *, conn: Connection | None = None) -> bool:
        async with self._acquire(conn) as c:
            return bool(
                await c.fetchval("SELECT 1 FROM usage_entries WHERE entry_id=$1", OPENED_ENTRY)
            )

    async def mark_open(self, day: str, ts: int, *, conn: Connection | None = None) -> None:
        await self.add(UsageEntry(OPENED_ENTRY, "", "", day, 0, 0, False, ts), conn=conn)

    async def first_notice(self, room_id: str, day: str, *, conn: Connection | None = None) -> bool:
        """Note that `room_id` was told it is over quota on `day`; False when it already was."""
        async with self._acquire(conn) as c:
            if await c.fetchval(
                "SELECT 1 FROM usage_notices WHERE room_id=$1 AND day=$2", room_id, day
            ):
                return False
            await c.execute(
                "INSERT INTO usage_notices (room_id, day) VALUES ($1, $2) "
                "ON CONFLICT (room_id, day) DO NOTHING",
                room_id,
                day,
            )
        return True
