"""Shared fixtures: the plugin database on SQLite and on PostgreSQL, opened the way maubot does.

- `db_factory`: opens `Database` objects on this test's own storage (call it twice to simulate
  a restart); parametrized over `sqlite` and `postgres`.
- `db`: a started database with the plugin's migrations applied.
- `stores`: `Stores(db)`.
- `fresh_postgres_database(prefix)`: a Postgres database of its own (for a bot whose whole
  database is Postgres, as in the end-to-end tests), dropped afterwards.

SQLite: a file in tmp_path, created with `Database.create("sqlite:<path>")` like
maubot.instance. PostgreSQL: maubot's own `ProxyPostgresDatabase` (a schema `mbp_<instance>` on a
shared pool), with a unique instance id per test and the schema dropped afterwards. The server is
`SURFACES_POSTGRES_URL` (default postgresql://postgres@127.0.0.1:5432/test); when it does not
answer the postgres tests are skipped, or fail if `SURFACES_REQUIRE_POSTGRES=1`.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio
from maubot.lib.plugin_db import ProxyPostgresDatabase
from mautrix.util.async_db import Database, PostgresDatabase, UpgradeTable

from surfaces_plugin.store import Stores, upgrade_table

POSTGRES_URL = os.environ.get("SURFACES_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REQUIRE_POSTGRES = os.environ.get("SURFACES_REQUIRE_POSTGRES") == "1"
# Same default as maubot's plugin_databases.postgres_max_conns_per_plugin.
PG_MAX_CONNS_PER_PLUGIN = 3

_db_log = logging.getLogger("maubot.instance_db")
_postgres_probe: dict[str, str | None] = {}


async def _postgres_unavailable() -> str | None:
    """Why PostgreSQL cannot be used, or None when it answers (probed once per session)."""
    if POSTGRES_URL not in _postgres_probe:
        try:
            conn = await asyncpg.connect(POSTGRES_URL, timeout=3)
        except Exception as e:  # refused, timed out, bad auth: all mean "not usable"
            _postgres_probe[POSTGRES_URL] = (
                f"PostgreSQL at {POSTGRES_URL} does not answer ({type(e).__name__}: {e})"
            )
        else:
            await conn.close()
            _postgres_probe[POSTGRES_URL] = None
    return _postgres_probe[POSTGRES_URL]


async def require_postgres() -> None:
    """Skip this test when PostgreSQL does not answer, or fail it if it is required."""
    reason = await _postgres_unavailable()
    if reason is not None:
        if REQUIRE_POSTGRES:
            pytest.fail(f"{reason}; SURFACES_REQUIRE_POSTGRES=1 requires it")
        pytest.skip(reason)


@asynccontextmanager
async def fresh_postgres_database(prefix: str) -> AsyncIterator[str]:
    """The URL of a new, empty database on the test server; dropped on exit."""
    await require_postgres()
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(POSTGRES_URL)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    base, _, _ = POSTGRES_URL.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        admin = await asyncpg.connect(POSTGRES_URL)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


class DatabaseFactory:
    """Opens databases on one test's storage; everything opened is closed at teardown."""

    def __init__(self, engine: str, tmp_path: Path) -> None:
        self.engine = engine
        self.instance_id = f"surfaces_test_{uuid.uuid4().hex[:12]}"
        self.sqlite_path = tmp_path / f"{self.instance_id}.db"
        self._pool: PostgresDatabase | None = None
        self._opened: list[Database] = []

    @property
    def schema_name(self) -> str:
        """The Postgres schema holding this test's tables (maubot's naming)."""
        return f"mbp_{self.instance_id}"

    async def open(
        self, *, upgrade: UpgradeTable | None = upgrade_table, start: bool = True
    ) -> Database:
        """A new Database on this test's storage; `start=True` applies `upgrade`."""
        log = _db_log.getChild(self.instance_id)
        db: Database
        if self.engine == "sqlite":
            db = Database.create(f"sqlite:{self.sqlite_path}", upgrade_table=upgrade, log=log)
        else:
            db = ProxyPostgresDatabase(
                pool=await self._postgres_pool(),
                instance_id=self.instance_id,
                max_conns=PG_MAX_CONNS_PER_PLUGIN,
                upgrade_table=upgrade,
                log=log,
            )
        self._opened.append(db)  # before start(), so a failed start is still stopped
        if start:
            await db.start()
        return db

    async def _postgres_pool(self) -> PostgresDatabase:
        if self._pool is None:
            pool = Database.create(POSTGRES_URL, db_args={"min_size": 1, "max_size": 8})
            assert isinstance(pool, PostgresDatabase)
            await pool.start()
            self._pool = pool
        return self._pool

    async def close(self) -> None:
        for db in reversed(self._opened):
            try:
                await db.stop()
            except RuntimeError:
                pass  # a SQLite pool that never started
        if self._pool is not None:
            await self._pool.execute(f'DROP SCHEMA IF EXISTS "{self.schema_name}" CASCADE')
            await self._pool.stop()


@pytest_asyncio.fixture(
    params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
)
async def db_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[DatabaseFactory]:
    engine: str = request.param
    if engine == "postgres":
        await require_postgres()
    factory = DatabaseFactory(engine, tmp_path)
    try:
        yield factory
    finally:
        await factory.close()


@pytest_asyncio.fixture
async def db(db_factory: DatabaseFactory) -> Database:
    """The plugin database with migrations applied, on SQLite or PostgreSQL."""
    return await db_factory.open()


@pytest.fixture
def stores(db: Database) -> Stores:
    return Stores(db)
