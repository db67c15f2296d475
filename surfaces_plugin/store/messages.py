"""`messages`: the conversation history of each chat, numbered 1, 2, 3… per chat.

History lives only here (the room timeline is the fallback), so the message path never
re-reads the homeserver.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from mautrix.util.async_db import Connection, Scheme

from ..clock import now_ms
from ..layout import Attachment, attachment_from_json
from .base import Repository, storable

# "tools": a turn's tool calls and their results (JSON, see tool_runs.ToolRun), before its answer.
MessageRole = Literal["user", "assistant", "tools"]
ROLES: tuple[str, ...] = ("user", "assistant", "tools")


class DuplicateEventError(Exception):
    """A message with this Matrix event id is already stored."""

    def __init__(self, event_id: str) -> None:
        super().__init__(f"event {event_id} is already stored")
        self.event_id = event_id


@dataclass(frozen=True)
class Message:
    platform_chat_id: str
    seq: int
    role: MessageRole
    content: str
    event_id: str | None
    sender: str | None
    ts: int
    tokens: int | None
    attachment: Attachment | None = None  # a user turn's media (a reference, never the bytes)

    @classmethod
    def from_row(cls, row: Any) -> Message:
        return cls(
            platform_chat_id=row["platform_chat_id"],
            seq=row["seq"],
            role=row["role"],
            content=row["content"],
            event_id=row["event_id"],
            sender=row["sender"],
            ts=row["ts"],
            tokens=row["tokens"],
            attachment=attachment_from_json(row["attachment"]),
        )


@dataclass(frozen=True)
class Revision:
    """The last user message, revised: where it is, and the answer it had (its first message)."""

    seq: int
    ts: int
    answer_event_id: str | None


_COLUMNS = "platform_chat_id, seq, role, content, event_id, sender, ts, tokens, attachment"
_NO_SEQ_AFTER = 2**31 - 1  # above every seq (an INTEGER column): "up to the end of the chat"


class MessageStore(Repository):
    async def append(
        self,
        platform_chat_id: str,
        role: MessageRole,
        content: str,
        *,
        event_id: str | None = None,
        sender: str | None = None,
        ts: int | None = None,
        tokens: int | None = None,
        attachment: Attachment | None = None,
        conn: Connection | None = None,
    ) -> int:
        """Store a message as the chat's next one and return its seq.

        Raises DuplicateEventError (and stores nothing) when `event_id` is already stored.
        """
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        async with self._acquire(conn) as c, c.transaction():
            if c.scheme == Scheme.POSTGRES:
                # Serialises appends to one chat so max+1 is never taken twice. SQLite needs
                # no lock: maubot gives it one connection, so transactions never overlap.
                await c.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", platform_chat_id
                )
            seq = await c.fetchval(
                "SELECT COALESCE(MAX(seq), 0) + 1 FROM messages WHERE platform_chat_id=$1",
                platform_chat_id,
            )
            stored = await c.fetchval(
                f"""INSERT INTO messages ({_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                ON CONFLICT (event_id) DO NOTHING RETURNING seq""",
                platform_chat_id,
                int(seq),
                role,
                storable(content),  # a NUL in a Matrix message must not lose the turn on Postgres
                event_id,
                sender,
                int(ts) if ts is not None else now_ms(),
                None if tokens is None else int(tokens),
                attachment.to_json() if attachment is not None else None,
            )
            if stored is None:
                raise DuplicateEventError(event_id or "")
        return int(stored)

    async def history(
        self,
        platform_chat_id: str,
        *,
        after_seq: int | None = None,
        limit: int | None = None,
        conn: Connection | None = None,
    ) -> list[Message]:
        """Messages with seq > `after_seq`, oldest first; `limit` keeps the newest ones."""
        query = f"SELECT {_COLUMNS} FROM messages WHERE platform_chat_id=$1 AND seq > $2"
        args: list[Any] = [platform_chat_id, int(after_seq or 0)]
        if limit is not None:
            query += " ORDER BY seq DESC LIMIT $3"
            args.append(int(limit))
        else:
            query += " ORDER BY seq"
        async with self._acquire(conn) as c:
            rows = await c.fetch(query, *args)
        messages = [Message.from_row(r) for r in rows]
        if limit is not None:
            messages.reverse()
        return messages

    async def count(
        self, platform_chat_id: str, *, after_seq: int | None = None, conn: Connection | None = None
    ) -> int:
        async with self._acquire(conn) as c:
            n = await c.fetchval(
                "SELECT COUNT(*) FROM messages WHERE platform_chat_id=$1 AND seq > $2",
                platform_chat_id,
                int(after_seq or 0),
            )
        return int(n)

    async def last_user_message(
        self, platform_chat_id: str, *, conn: Connection | None = None
    ) -> Message | None:
        async with self._acquire(conn) as c:
            row = await c.fetchrow(
                f"""SELECT {_COLUMNS} FROM messages WHERE platform_chat_id=$1 AND role='user'
                ORDER BY seq DESC LIMIT 1""",
                platform_chat_id,
            )
        return Message.from_row(row) if row else None

    async def rekey(self, old: str, new: str, *, conn: Connection | None = None) -> None:
        """Move every message of chat `old` to chat `new` (which has none), seqs unchanged."""
        async with self._acquire(conn) as c:
            await c.execute(
                "UPDATE messages SET platform_chat_id=$2 WHERE platform_chat_id=$1", old, new
            )

    async def delete_user_turn(
        self, platform_chat_id: str, event_id: str, *, conn: Connection | None = None
    ) -> int:
        """Delete the user message `event_id` and its answers; returns how many rows went.

        Its answers are the assistant (and tool) messages after it up to the chat's next user message
        (retries included): a room stores a message, then its answer, one message at a time.
        """
        async with self._acquire(conn) as c, c.transaction():
            seq = await c.fetchval(
                "SELECT seq FROM messages WHERE platform_chat_id=$1 AND event_id=$2 AND role='user'",
                platform_chat_id,
                event_id,
            )
            if seq is None:
                return 0
            next_user = await c.fetchval(
                "SELECT MIN(seq) FROM messages WHERE platform_chat_id=$1 AND role='user' AND seq > $2",
                platform_chat_id,
                int(seq),
            )
            rows = await c.fetch(
                """DELETE FROM messages WHERE platform_chat_id=$1 AND seq >= $2 AND seq < $3
                AND (seq = $2 OR role IN ('assistant', 'tools')) RETURNING seq""",
                platform_chat_id,
                int(seq),
                int(next_user) if next_user is not None else _NO_SEQ_AFTER,
            )
        return len(rows)

    async def revise_last_user_turn(
        self, platform_chat_id: str, event_id: str, content: str, *, conn: Connection | None = None
    ) -> Revision | None:
        """When `event_id` is the chat's last user message, it now says `content` and its answers
        (the assistant and tool rows after it) are gone; None, and nothing changed, otherwise."""
        async with self._acquire(conn) as c, c.transaction():
            last = await c.fetchrow(
                """SELECT seq, ts, event_id FROM messages WHERE platform_chat_id=$1 AND role='user'
                ORDER BY seq DESC LIMIT 1""",
                platform_chat_id,
            )
            if last is None or last["event_id"] != event_id:
                return None
            seq = int(last["seq"])
            answer = await c.fetchval(
                """SELECT event_id FROM messages WHERE platform_chat_id=$1 AND seq > $2
                AND role='assistant' ORDER BY seq DESC LIMIT 1""",
                platform_chat_id,
                seq,
            )
            await c.execute(
                "DELETE FROM messages WHERE platform_chat_id=$1 AND seq > $2",
                platform_chat_id,
                seq,
            )
            await c.execute(
                "UPDATE messages SET content=$3 WHERE platform_chat_id=$1 AND seq=$2",
                platform_chat_id,
                seq,
                storable(content),
            )
        return Revision(seq, int(last["ts"]), answer)

    async def user_turn_answered_by(
        self, platform_chat_id: str, answer_event_id: str, *, conn: Connection | None = None
    ) -> Message | None:
        """The user message the stored answer `answer_event_id` answers (the one before it)."""
        async with self._acquire(conn) as c:
            row = await c.fetchrow(
                f"""SELECT {_COLUMNS} FROM messages WHERE platform_chat_id=$1 AND role='user'
                AND seq < (SELECT seq FROM messages WHERE platform_chat_id=$1 AND event_id=$2
                           AND role='assistant')
                ORDER BY seq DESC LIMIT 1""",
                platform_chat_id,
                answer_event_id,
            )
        return Message.from_row(row) if row else None
