"""The e2e harness's `drop_plugin_tables()` (standalone maubot keeps the plugin's tables next to
maubot's own) must never drop a table of mautrix's crypto store: the bot would lose its device
identity and every room key. Checked against the schema mautrix really creates."""

from __future__ import annotations

from pathlib import Path

from mautrix.crypto import PgCryptoStateStore, PgCryptoStore
from mautrix.util.async_db import Database

from devtools.maubot_standalone import plugin_tables


async def test_plugin_tables_and_crypto_store_tables_are_disjoint(tmp_path: Path) -> None:
    db = Database.create(f"sqlite:{tmp_path / 'crypto.db'}")
    await db.start()
    try:
        await PgCryptoStore.upgrade_table.upgrade(db)
        await PgCryptoStateStore.upgrade_table.upgrade(db)
        rows = await db.fetch("SELECT name FROM sqlite_master WHERE type='table'")
        crypto_tables = {row["name"] for row in rows}  # what standalone maubot creates
    finally:
        await db.stop()

    assert "crypto_account" in crypto_tables  # the device identity
    assert not set(plugin_tables()) & crypto_tables
