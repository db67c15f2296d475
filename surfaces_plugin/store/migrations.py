"""Schema of the plugin database, for SQLite and PostgreSQL alike.

Append-only: a released version is never edited; changes go into a new registered upgrade.
Portable SQL only: BIGINT for millisecond timestamps, BOOLEAN read back through bool(), explicit
composite keys instead of AUTOINCREMENT/SERIAL.
"""

from __future__ import annotations

from mautrix.util.async_db import Connection, Scheme, UpgradeTable

upgrade_table = UpgradeTable()

# Every table of the plugin database, and mautrix's schema-version table (tests drop them all).
CACHE_TABLES = (
    "users", "rooms", "chats", "messages", "memory", "processed", "usage_entries", "usage_notices"
)
VERSION_TABLE = "version"


@upgrade_table.register(description="Initial schema")
async def upgrade_v1(conn: Connection) -> None:
    # No foreign keys between cache tables: a rebuild writes them in any order, and rows
    # that Matrix no longer shows are kept (missing=true) rather than deleted.
    await conn.execute(
        """CREATE TABLE users (
            user_id      TEXT PRIMARY KEY,
            space_id     TEXT,
            access_state TEXT CHECK (access_state IN ('approved', 'blocked', 'pending')),
            access_by    TEXT,
            access_ts    BIGINT,
            dm_room_id   TEXT,
            missing      BOOLEAN NOT NULL DEFAULT false,
            updated_at   BIGINT NOT NULL
        )"""
    )
    await conn.execute(
        """CREATE TABLE rooms (
            room_id          TEXT PRIMARY KEY,
            kind             TEXT NOT NULL CHECK (kind IN ('space', 'working')),
            owner            TEXT NOT NULL,
            space_id         TEXT,
            agent            TEXT,
            title            TEXT,
            platform_chat_id TEXT,
            system_prompt    TEXT,
            archived         BOOLEAN NOT NULL DEFAULT false,
            order_key        TEXT,
            bot_membership   TEXT CHECK (bot_membership IN ('join', 'lost')),
            owner_membership TEXT,
            last_activity_ms BIGINT,
            missing          BOOLEAN NOT NULL DEFAULT false,
            created_ms       BIGINT
        )"""
    )
    await conn.execute("CREATE INDEX rooms_owner_idx ON rooms (owner)")
    await conn.execute("CREATE INDEX rooms_space_idx ON rooms (space_id)")
    await conn.execute("CREATE INDEX rooms_chat_idx ON rooms (platform_chat_id)")
    await conn.execute(
        """CREATE TABLE chats (
            platform_chat_id TEXT PRIMARY KEY,
            room_id          TEXT NOT NULL,
            agent            TEXT,
            created_ms       BIGINT NOT NULL,
            archived         BOOLEAN NOT NULL DEFAULT false,
            summary          TEXT,
            summary_upto_seq INTEGER,
            missing          BOOLEAN NOT NULL DEFAULT false
        )"""
    )
    await conn.execute("CREATE INDEX chats_room_idx ON chats (room_id)")
    await conn.execute(
        """CREATE TABLE messages (
            platform_chat_id TEXT NOT NULL,
            seq              INTEGER NOT NULL,
            role             TEXT NOT NULL CHECK (role IN ('user', 'assistant', 'summary')),
            content          TEXT NOT NULL,
            event_id         TEXT UNIQUE,
            sender           TEXT,
            ts               BIGINT NOT NULL,
            tokens           INTEGER,
            PRIMARY KEY (platform_chat_id, seq)
        )"""
    )
    await conn.execute(
        """CREATE TABLE memory (
            user_id TEXT PRIMARY KEY,
            notes   TEXT NOT NULL
        )"""
    )
    await conn.execute(
        """CREATE TABLE onboarding_journal (
            user_id    TEXT NOT NULL,
            step       TEXT NOT NULL CHECK (step IN ('space', 'room')),
            status     TEXT NOT NULL CHECK (status IN ('pending', 'done')),
            room_id    TEXT,
            created_ms BIGINT NOT NULL,
            PRIMARY KEY (user_id, step)
        )"""
    )
    await conn.execute(
        """CREATE TABLE processed (
            room_id  TEXT PRIMARY KEY,
            event_id TEXT NOT NULL,
            ts       BIGINT NOT NULL
        )"""
    )
    await conn.execute(
        """CREATE TABLE state_kv (
            key   TEXT PRIMARY KEY,
            value TEXT NOT NULL
        )"""
    )


@upgrade_table.register(description="Drop tables nothing read: onboarding_journal, state_kv")
async def upgrade_v2(conn: Connection) -> None:
    # Reconciliation finishes a crashed onboarding from Matrix alone, and the last report is
    # kept in memory; neither table was ever read.
    await conn.execute("DROP TABLE IF EXISTS onboarding_journal")
    await conn.execute("DROP TABLE IF EXISTS state_kv")


@upgrade_table.register(description="chats.prompt_tokens: the provider's last reported prompt")
async def upgrade_v3(conn: Connection) -> None:
    # A conversation the provider holds is measured there; `!ai context` shows its last count.
    await conn.execute("ALTER TABLE chats ADD COLUMN prompt_tokens INTEGER")


@upgrade_table.register(description="messages: a 'tools' row holds a turn's tool calls and results")
async def upgrade_v4(conn: Connection) -> None:
    if conn.scheme == Scheme.POSTGRES:
        await conn.execute("ALTER TABLE messages DROP CONSTRAINT IF EXISTS messages_role_check")
        await conn.execute(
            "ALTER TABLE messages ADD CONSTRAINT messages_role_check "
            "CHECK (role IN ('user', 'assistant', 'summary', 'tools'))"
        )
        return
    # SQLite cannot change a CHECK constraint: copy the rows into a table that has the new one.
    await conn.execute(
        """CREATE TABLE messages_v4 (
            platform_chat_id TEXT NOT NULL,
            seq              INTEGER NOT NULL,
            role             TEXT NOT NULL CHECK (role IN ('user', 'assistant', 'summary', 'tools')),
            content          TEXT NOT NULL,
            event_id         TEXT UNIQUE,
            sender           TEXT,
            ts               BIGINT NOT NULL,
            tokens           INTEGER,
            PRIMARY KEY (platform_chat_id, seq)
        )"""
    )
    await conn.execute(
        "INSERT INTO messages_v4 (platform_chat_id, seq, role, content, event_id, sender, ts, tokens)"
        " SELECT platform_chat_id, seq, role, content, event_id, sender, ts, tokens FROM messages"
    )
    await conn.execute("DROP TABLE messages")
    await conn.execute("ALTER TABLE messages_v4 RENAME TO messages")


@upgrade_table.register(description="usage_entries: the token ledger; usage_notices: quota told")
async def upgrade_v5(conn: Connection) -> None:
    # One row per answer or summary, keyed by the Matrix event carrying its usage, so a rebuild
    # from the timeline adds each once; totals are sums over (user, agent, day).
    await conn.execute(
        """CREATE TABLE usage_entries (
            entry_id          TEXT PRIMARY KEY,
            user_id           TEXT NOT NULL,
            agent             TEXT NOT NULL,
            day               TEXT NOT NULL,
            prompt_tokens     BIGINT NOT NULL,
            completion_tokens BIGINT NOT NULL,
            estimated         BOOLEAN NOT NULL DEFAULT false,
            ts                BIGINT NOT NULL
        )"""
    )
    await conn.execute("CREATE INDEX usage_day_user_idx ON usage_entries (day, user_id)")
    await conn.execute(
        """CREATE TABLE usage_notices (
            room_id TEXT NOT NULL,
            day     TEXT NOT NULL,
            PRIMARY KEY (room_id, day)
        )"""
    )


@upgrade_table.register(description="messages.attachment: the media a user turn refers to")
async def upgrade_v6(conn: Connection) -> None:
    # JSON of layout.Attachment (mxc URI or encrypted file, name, type); never the bytes.
    await conn.execute("ALTER TABLE messages ADD COLUMN attachment TEXT")


@upgrade_table.register(description="rooms.voice: answers also spoken in this room (`!ai voice`)")
async def upgrade_voice(conn: Connection) -> None:
    # The binding's optional `voice` flag; NULL when the binding never set it.
    await conn.execute("ALTER TABLE rooms ADD COLUMN voice BOOLEAN")


@upgrade_table.register(description="rooms.stream: the room's `!ai stream on|off` (NULL: default)")
async def upgrade_stream(conn: Connection) -> None:
    # Mirrors the binding's optional `stream`, so the cache carries what Matrix says.
    await conn.execute("ALTER TABLE rooms ADD COLUMN stream BOOLEAN")
