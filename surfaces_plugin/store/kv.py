"""`state_kv`: small named values, e.g. the last reconciliation report as JSON."""

from __future__ import annotations

import json
from typing import Any

from mautrix.util.async_db import Connection

from .base import Repository


class KVStore(Repository):
    async def get(self, key: str, *, conn: Connection | None = None) -> str | None:
        async with self._acquire(conn) as c:
            return await c.fetchval("SELECT value FROM state_kv WHERE key=$1", key)

    async def set(self, key: str, value: str, *, conn: Connection | None = None) -> None:
        async with self._acquire(conn) as c:
            await c.execute(
                """INSERT INTO state_kv (key, value) VALUES ($1, $2)
                ON CONFLICT (key) DO UPDATE SET value=excluded.value""",
                key,
                value,
            )

    async def get_json(self, key: str, *, conn: Connection | None = None) -> Any:
        """The decoded value, or None when the key is unset."""
        raw = await self.get(key, conn=conn)
        return None if raw is None else json.loads(raw)

    async def set_json(self, key: str, value: Any, *, conn: Connection | None = None) -> None:
        await self.set(key, json.dumps(value, ensure_ascii=False, sort_keys=True), conn=conn)

    async def delete(self, key: str, *, conn: Connection | None = None) -> None:
        async with self._acquire(conn) as c:
            await c.execute("DELETE FROM state_kv WHERE key=$1", key)
