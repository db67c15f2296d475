"""`chats`: conversations (platform_chat_id) and which room they belong to."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from mautrix.util.async_db import Connection

from .base import Repository, storable


@dataclass(frozen=True)
class Chat:
    platform_chat_id: str
    room_id: str
    agent: str | None
    created_ms: int
    archived: bool = False  # an older chat of the room, after `!ai reset`
    summary: str | None = None
    summary_upto_seq: int | None = None  # the summary replaces messages with seq <= this
    missing: bool = False
    # What the provider last reported the prompt cost (a conversation it holds grows there).
    prompt_tokens: int | None = None

    @classmethod
    def from_row(cls, row: Any) -> Chat:
        return cls(
            platform_chat_id=row["platform_chat_id"],
            room_id=row["room_id"],
            agent=row["agent"],
            created_ms=row["created_ms"],
            archived=bool(row["archived"]),
            summary=row["summary"],
            summary_upto_seq=row["summary_upto_seq"],
            missing=bool(row["missing"]),
            prompt_tokens=row["prompt_tokens"],
        )

    def values(self) -> tuple[Any, ...]:
        return (
            self.platform_chat_id,
            self.room_id,
            self.agent,
            int(self.created_ms),
            bool(self.archived),
            storable(self.summary),
            self.summary_upto_seq,
            bool(self.missing),
            None if self.prompt_tokens is None else int(self.prompt_tokens),
        )


_COLUMNS = (
    "platform_chat_id, room_id, agent, created_ms, archived, summary, summary_upto_seq, missing, "
    "prompt_tokens"
)


class ChatStore(Repository):
    # The summary lives only here: a rebuilt row (summary None) must not erase it.
    _upsert = f"""
        INSERT INTO chats ({_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
        ON CONFLICT (platform_chat_id) DO UPDATE SET
            room_id=excluded.room_id, agent=excluded.agent,
            -- a rebuild from Matrix does not know when the chat began: 0 keeps the stored time
            created_ms=CASE WHEN excluded.created_ms > 0 THEN excluded.created_ms
                ELSE chats.created_ms END,
            archived=excluded.archived,
            summary=COALESCE(excluded.summary, chats.summary),
            summary_upto_seq=CASE WHEN excluded.summary IS NULL
                THEN chats.summary_upto_seq ELSE excluded.summary_upto_seq END,
            missing=excluded.missing,
            prompt_tokens=COALESCE(excluded.prompt_tokens, chats.prompt_tokens)
    """

    async def get(self, platform_chat_id: str, *, conn: Connection | None = None) -> Chat | None:
        async with self._acquire(conn) as c:
            row = await c.fetchrow(
                f"SELECT {_COLUMNS} FROM chats WHERE platform_chat_id=$1", platform_chat_id
            )
        return Chat.from_row(row) if row else None

    async def upsert(self, chat: Chat, *, conn: Connection | None = None) -> None:
        """Write every column; a None summary keeps the stored one (see `set_summary`)."""
        async with self._acquire(conn) as c:
            await c.execute(self._upsert, *chat.values())

    async def upsert_many(self, chats: Iterable[Chat], *, conn: Connection | None = None) -> None:
        records = [ch.values() for ch in chats]
        if records:
            async with self._acquire(conn) as c:
                await c.executemany(self._upsert, records)

    async def list_all(
        self, *, include_missing: bool = False, conn: Connection | None = None
    ) -> list[Chat]:
        query = f"SELECT {_COLUMNS} FROM chats"
        if not include_missing:
            query += " WHERE missing=false"
        async with self._acquire(conn) as c:
            rows = await c.fetch(query + " ORDER BY created_ms, platform_chat_id")
        return [Chat.from_row(r) for r in rows]

    async def set_archived(
        self, platform_chat_id: str, archived: bool = True, *, conn: Connection | None = None
    ) -> None:
        async with self._acquire(conn) as c:
            await c.execute(
                "UPDATE chats SET archived=$2 WHERE platform_chat_id=$1",
                platform_chat_id,
                bool(archived),
            )

    async def set_summary(
        self,
        platform_chat_id: str,
        summary: str | None,
        upto_seq: int | None,
        *,
        conn: Connection | None = None,
    ) -> None:
        """Set the summary that replaces messages up to `upto_seq`; None clears both."""
        if (summary is None) != (upto_seq is None):
            raise ValueError("summary and upto_seq must be given together")
        async with self._acquire(conn) as c:
            await c.execute(
                "UPDATE chats SET summary=$2, summary_upto_seq=$3 WHERE platform_chat_id=$1",
                platform_chat_id,
                storable(summary),
                None if upto_seq is None else int(upto_seq),
            )

    async def set_prompt_tokens(
        self, platform_chat_id: str, tokens: int, *, conn: Connection | None = None
    ) -> None:
        async with self._acquire(conn) as c:
            await c.execute(
                "UPDATE chats SET prompt_tokens=$2 WHERE platform_chat_id=$1",
                platform_chat_id,
                int(tokens),
            )

    async def rekey(self, old: str, new: str, *, conn: Connection | None = None) -> None:
        """The conversation `old` goes on as `new` (same room, summary and start time); the
        provider's last prompt count belonged to the old conversation and is dropped."""
        async with self._acquire(conn) as c:
            await c.execute(
                "UPDATE chats SET platform_chat_id=$2, prompt_tokens=NULL WHERE platform_chat_id=$1",
                old,
                new,
            )

    async def mark_missing_except(
        self, seen: Iterable[str], *, conn: Connection | None = None
    ) -> None:
        await self._flag_missing_except("chats", "platform_chat_id", seen, conn)
