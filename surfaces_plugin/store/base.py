"""Shared plumbing for the repositories: connection handling."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import overload

from mautrix.util.async_db import Connection, Database

# What a TEXT column cannot hold: NUL (PostgreSQL refuses it, SQLite keeps it) and lone
# surrogates (neither engine's driver can encode them as UTF-8).
_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")
REPLACEMENT = "\ufffd"


@overload
def storable(text: str) -> str: ...
@overload
def storable(text: None) -> None: ...
def storable(text: str | None) -> str | None:
    """`text` as both engines store it alike; every free-text value goes through here.

    Replaced, not dropped: the agent and an export still show that something stood there.
    """
    return None if text is None else _UNSTORABLE.sub(REPLACEMENT, text)


@asynccontextmanager
async def _given(conn: Connection) -> AsyncIterator[Connection]:
    yield conn


class Repository:
    """Base of the per-table classes.

    Every method takes an optional `conn` so several repositories can share one transaction:

        async with db.acquire() as conn, conn.transaction():
            await stores.messages.append(..., conn=conn)
            await stores.processed.mark(..., conn=conn)
    """

    def __init__(self, db: Database) -> None:
        self.db = db

    def _acquire(self, conn: Connection | None) -> AbstractAsyncContextManager[Connection]:
        # db.acquire() already reuses the connection held by this task, if any.
        return _given(conn) if conn is not None else self.db.acquire()

    async def _flag_missing_except(
        self, table: str, key: str, seen: Iterable[str], conn: Connection | None
    ) -> None:
        """Flag every row of `table` whose `key` is not in `seen` as missing (kept, not deleted)."""
        seen_ids = set(seen)
        async with self._acquire(conn) as c:
            rows = await c.fetch(f"SELECT {key} FROM {table} WHERE missing=false")
            gone = sorted(r[key] for r in rows if r[key] not in seen_ids)
            if gone:
                await c.executemany(
                    f"UPDATE {table} SET missing=true WHERE {key}=$1", [(k,) for k in gone]
                )
