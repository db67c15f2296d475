"""Run the plugin from the repo with `python -m maubot.standalone` against a SynapseServer.

The bot is a freshly registered account (rate limit overridden). `start()` returns only once the
plugin has started and the bot's first sync (which maubot drops) is done, so invites sent after
it are seen.

With `encryption=True` the bot logs in as its own device (`DEVICE_ID`) and maubot runs mautrix's
OlmMachine with its crypto store in the bot's database; `start()` then also waits until the
device's keys are on the homeserver, so a user can encrypt to it at once. Device, token and crypto
store survive `restart()` and `drop_plugin_tables()`.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

from devtools import REPO_ROOT
from devtools.configs import logging_config, plugin_config
from devtools.procs import (
    LogCursor,
    ServerProcess,
    free_port,
    kill_process,
    spawn,
    stop_process,
)
from devtools.synapse import SynapseServer
from surfaces_plugin.store.migrations import CACHE_TABLES, VERSION_TABLE

# mautrix logs each finished /sync at TRACE with this text.
SYNC_DONE = "(/v3/sync) completed in"
STARTED = "Startup completed, running forever"
# Account data the harness writes as the bot to wake its long-polling first sync after a restart.
WAKE_TYPE = "dev.surfaces.devtools.wake"
# Standalone maubot logs this at DEBUG once the OlmMachine is loaded.
CRYPTO_ENABLED = "Enabled encryption support"
# The bot's device when encryption is on: fixed, so the crypto store matches it across restarts.
DEVICE_ID = "SURFACESBOT"
# Tables of mautrix's crypto store and crypto state store (all prefixed) in maubot's database.
CRYPTO_TABLE_PREFIXES = ("crypto_", "mx_")


class BotError(RuntimeError):
    """The bot process failed to start or become ready."""


class StandaloneBot(ServerProcess):
    """One standalone maubot process running the repo's plugin as a fresh bot account."""

    def __init__(
        self,
        synapse: SynapseServer,
        config_overrides: dict[str, Any] | None = None,
        *,
        localpart: str | None = None,
        password: str | None = None,
        data_dir: Path | None = None,
        database_url: str | None = None,
        ignore_first_sync: bool = True,
        displayname: str = "Surfaces",
        repo_root: Path = REPO_ROOT,
        encryption: bool = False,
        device_id: str = DEVICE_ID,
    ) -> None:
        self.synapse = synapse
        self.repo_root = Path(repo_root)
        self.localpart = localpart or f"bot-{secrets.token_hex(4)}"
        self.password = password or secrets.token_hex(12)
        self.user_id = synapse.user_id(self.localpart)
        self.data_dir = (
            Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="surfaces-bot-"))
        )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir / "bot.log"
        self.config_path = self.data_dir / "config.yaml"
        self.base_path = self.data_dir / "base.yaml"
        self.database_url = database_url or f"sqlite:{self.data_dir / 'bot.db'}"
        self.port = free_port()
        self.ignore_first_sync = ignore_first_sync
        self.displayname = displayname
        self.config_overrides = config_overrides or {}
        self.encryption = encryption
        self.device_id: str | None = device_id if encryption else None
        self.access_token = synapse.register_user(self.localpart, self.password)
        if self.device_id:
            # maubot enables crypto only when the token belongs to the configured device.
            self.access_token = synapse.login(self.localpart, self.password, self.device_id)
        synapse.override_ratelimit(self.user_id)
        self._proc: subprocess.Popen[bytes] | None = None
        self._write_base()
        self._write_config()

    # -- configuration -----------------------------------------------------------------------------

    def _write_base(self) -> None:
        """Standalone's example config with plugin_config = the plugin's base-config.yaml.

        Standalone resolves the plugin's base config from `-b`'s plugin_config; the packaged
        example has `{}` there. Text-spliced, so base-config.yaml's comments survive.
        """
        example = resources.files("maubot.standalone").joinpath("example-config.yaml").read_text()
        plugin_base = (self.repo_root / "base-config.yaml").read_text()
        indented = "".join(
            f"    {line}" if line.strip() else line for line in plugin_base.splitlines(True)
        )
        if "plugin_config: {}\n" not in example:
            raise BotError(
                "maubot's standalone example-config.yaml changed: no `plugin_config: {}`"
            )
        self.base_path.write_text(
            example.replace("plugin_config: {}\n", f"plugin_config:\n{indented}\n")
        )

    def _write_config(self) -> None:
        config = {
            "user": {
                "credentials": {
                    "id": self.user_id,
                    "homeserver": self.synapse.url,
                    "access_token": self.access_token,
                    "device_id": self.device_id,
                },
                "sync": True,
                "appservice": False,
                "hs_token": None,
                "autojoin": True,
                "displayname": self.displayname,
                "avatar_url": "disable",
                "ignore_initial_sync": True,
                "ignore_first_sync": self.ignore_first_sync,
            },
            "server": {
                "hostname": "127.0.0.1",
                "port": self.port,
                "base_path": "/",
                "public_url": f"http://127.0.0.1:{self.port}",
            },
            "database": self.database_url,
            "crypto_db_pickle_key": "mau.crypto",
            "database_opts": {"min_size": 1, "max_size": 10},
            "plugin_config": plugin_config(self.config_overrides, self.repo_root),
            "logging": logging_config(self.log_path),
        }
        # JSON is YAML; maubot rewrites the file in its own style at start.
        self.config_path.write_text(json.dumps(config, indent=2))

    def set_config_overrides(self, overrides: dict[str, Any]) -> None:
        """Replace the plugin config overrides; takes effect at the next start()/restart()."""
        self.config_overrides = overrides
        self._write_config()

    # -- process -----------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 60.0) -> StandaloneBot:
        """Start maubot and wait until the plugin started and the dropped first sync is over."""
        if self.running:
            return self
        cursor = LogCursor(self.log_path)
        # MAUBOT_* variables override config keys (as strings): never inherit stray ones.
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAUBOT_")}
        self._proc = spawn(
            [
                sys.executable,
                "-m",
                "maubot.standalone",
                "-c",
                str(self.config_path),
                "-m",
                str(self.repo_root / "maubot.yaml"),
                "-b",
                str(self.base_path),
            ],
            cwd=self.data_dir,
            log_path=self.data_dir / "stdout.log",
            env=env,
        )
        self._wait_ready(cursor, timeout)
        return self

    def device_keys(self) -> dict[str, Any] | None:
        """The bot device's signed keys as other users see them (`/keys/query`), or None."""
        if not self.device_id:
            return None
        status, data = self.synapse.request(
            "POST",
            "/_matrix/client/v3/keys/query",
            {"device_keys": {self.user_id: []}},
            token=self.access_token,
        )
        if status != 200:
            raise BotError(f"keys/query -> {status}: {data}")
        device = data.get("device_keys", {}).get(self.user_id, {}).get(self.device_id)
        return device if device and device.get("keys") else None

    def _wait_ready(self, cursor: LogCursor, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        woken = 0.0
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise BotError(f"maubot standalone exited during start\n{self._tails()}")
            text = cursor.new_text()
            if STARTED in text and SYNC_DONE in text:
                if not self.encryption:
                    return
                if CRYPTO_ENABLED not in text:
                    self.kill()
                    raise BotError(f"encryption requested but not enabled\n{self._tails()}")
                # mautrix uploads the device keys when a sync reports the one-time key count,
                # and maubot drops the first sync: wake the next one right away.
                if self.device_keys() is not None:
                    return
                if time.monotonic() - woken > 0.5:
                    self._wake()
                    woken = time.monotonic()
            if "Failed to start plugin" in text:
                self.kill()
                raise BotError(f"plugin failed to start\n{self._tails()}")
            if time.monotonic() - woken > 3.0:
                # After a restart the dropped first sync long-polls ~30 s; new account data ends it.
                self._wake()
                woken = time.monotonic()
            time.sleep(0.05)
        self.kill()
        raise BotError(f"bot not ready after {timeout:.0f}s\n{self._tails()}")

    def _wake(self) -> None:
        path = f"/_matrix/client/v3/user/{quote(self.user_id)}/account_data/{WAKE_TYPE}"
        self.synapse.request("PUT", path, {"ts": time.time()}, token=self.access_token)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after a bounded wait. Stop the bot before Synapse."""
        stop_process(self._proc, timeout)
        self._proc = None

    def drop_plugin_tables(self) -> list[str]:
        """Lose the plugin database: standalone keeps it in maubot's own SQLite file, so drop the
        plugin's tables and its schema version; maubot's tables (sync token) and the crypto store
        stay, as on a full server where each instance has its own plugin database. Returns the
        tables dropped."""
        assert not self.running, "stop the bot first"
        with sqlite3.connect(self.data_dir / "bot.db") as conn:
            existing = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            dropped = [t for t in plugin_tables() if t in existing]
            for table in dropped:
                conn.execute(f'DROP TABLE "{table}"')
        return dropped

    def kill(self) -> None:
        """SIGKILL: a crash, for tests of recovery."""
        kill_process(self._proc)
        self._proc = None

    def restart(self, timeout: float = 60.0) -> StandaloneBot:
        self.stop()
        return self.start(timeout)


def plugin_tables() -> tuple[str, ...]:
    """The tables `drop_plugin_tables` drops; never one of the crypto store's (that would lose the
    bot's device identity and every room key it holds)."""
    tables = (*CACHE_TABLES, VERSION_TABLE)
    clash = [t for t in tables if t.startswith(CRYPTO_TABLE_PREFIXES)]
    if clash:
        raise BotError(f"plugin tables named like crypto store tables: {clash}")
    return tables
