"""The full maubot server (`python -m maubot`) plus a client for its management API.

This is the real deployment path: a .mbp uploaded over `/_matrix/maubot/v1`, a client and an
instance created there, config edits through the API (which call `on_external_config_update`).
Synchronous (subprocess + urllib), like SynapseServer.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ruamel.yaml import YAML

from devtools.configs import logging_config
from devtools.maubot_standalone import SYNC_DONE, WAKE_TYPE
from devtools.procs import (
    LogCursor,
    ServerProcess,
    free_port,
    kill_process,
    spawn,
    stop_process,
)
from devtools.synapse import SynapseServer

API = "/_matrix/maubot/v1"


class MaubotError(RuntimeError):
    """maubot failed to start, or a management API call failed."""

    def __init__(self, message: str, status: int = 0, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class MaubotServer(ServerProcess):
    """One full maubot server with its own data dir, admin account and management API token."""

    def __init__(
        self,
        synapse: SynapseServer,
        data_dir: Path | None = None,
        *,
        postgres_url: str | None = None,
        admin_user: str = "admin",
        admin_password: str | None = None,
    ) -> None:
        self.synapse = synapse
        self.data_dir = (
            Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="surfaces-maubot-"))
        )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_user = admin_user
        self.admin_password = admin_password or secrets.token_hex(12)
        self.log_path = self.data_dir / "maubot.log"
        self.config_path = self.data_dir / "config.yaml"
        self.postgres_url = postgres_url
        self.token: str | None = None
        self.bot_tokens: dict[str, str] = {}  # mxid -> access token, to wake syncs
        self._proc: subprocess.Popen[bytes] | None = None
        self._write_config()

    def _write_config(self) -> None:
        """The packaged example config with paths, port, homeserver and admin set (platform-facts)."""
        yaml = YAML()
        config = yaml.load(resources.files("maubot").joinpath("example-config.yaml").read_text())
        for folder in ("plugins", "trash", "plugin-dbs"):
            (self.data_dir / folder).mkdir(exist_ok=True)
        config["database"] = f"sqlite:{self.data_dir / 'maubot.db'}"
        config["plugin_directories"]["upload"] = str(self.data_dir / "plugins")
        config["plugin_directories"]["load"] = [str(self.data_dir / "plugins")]
        config["plugin_directories"]["trash"] = str(self.data_dir / "trash")
        config["plugin_databases"]["sqlite"] = str(self.data_dir / "plugin-dbs")
        config["plugin_databases"]["postgres"] = self.postgres_url
        config["server"]["hostname"] = "127.0.0.1"
        config["server"]["port"] = self.port
        config["server"]["public_url"] = self.url
        config["server"]["unshared_secret"] = "generate"
        config["homeservers"] = {
            self.synapse.server_name: {
                "url": self.synapse.url,
                "secret": self.synapse.shared_secret,
            }
        }
        config["admins"] = {self.admin_user: self.admin_password}  # hashed in place at first start
        config["logging"] = logging_config(self.log_path)
        with self.config_path.open("w") as f:
            yaml.dump(config, f)

    # -- process -----------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 60.0) -> MaubotServer:
        """Start maubot, wait for the API, and log in as the admin."""
        if self.running:
            return self
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAUBOT_")}
        self._proc = spawn(
            [sys.executable, "-m", "maubot", "-c", str(self.config_path)],
            cwd=self.data_dir,
            log_path=self.data_dir / "stdout.log",
            env=env,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise MaubotError(f"maubot exited with {self._proc.returncode}\n{self._tails()}")
            try:
                with urllib.request.urlopen(self.url + "/_matrix/maubot/paths.json", timeout=2):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.1)
        else:
            self.kill()
            raise MaubotError(f"maubot not ready after {timeout:.0f}s\n{self._tails()}")
        self.token = None
        self.login()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after a bounded wait. Stop maubot before Synapse."""
        stop_process(self._proc, timeout)
        self._proc = None

    def kill(self) -> None:
        kill_process(self._proc)
        self._proc = None

    def restart(self, timeout: float = 60.0) -> MaubotServer:
        """Restart and wait until every known bot client has synced again."""
        self.stop()
        cursor = LogCursor(self.log_path)
        self.start(timeout)
        for mxid in self.bot_tokens:
            self._wait_synced(mxid, cursor, timeout)
        return self

    # -- management API ----------------------------------------------------------------------------

    def api(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        auth: bool = True,
    ) -> tuple[int, Any]:
        """One management API call; raises MaubotError on >=300."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + API + path, data=data, method=method)
        req.add_header("Content-Type", "application/zip" if raw is not None else "application/json")
        if auth and self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                text = resp.read()
                status = resp.status
        except urllib.error.HTTPError as err:
            text, status = err.read(), err.code
        try:
            parsed = json.loads(text) if text else None
        except json.JSONDecodeError:
            parsed = text.decode(errors="replace")
        if status >= 300:
            raise MaubotError(f"{method} {API}{path} -> {status}: {parsed}", status, parsed)
        return status, parsed

    def login(self) -> str:
        _, data = self.api(
            "POST",
            "/auth/login",
            {"username": self.admin_user, "password": self.admin_password},
            auth=False,
        )
        self.token = str(data["token"])
        return self.token

    def upload_plugin(self, mbp_path: Path) -> dict[str, Any]:
        """Upload (or replace) a .mbp; running instances of it restart on the new code."""
        _, data = self.api(
            "POST", "/plugins/upload?allow_override=true", raw=Path(mbp_path).read_bytes()
        )
        return dict(data)

    def create_client(
        self,
        mxid: str,
        homeserver_url: str,
        access_token: str,
        wait_synced: bool = True,
        timeout: float = 60.0,
        device_id: str | None = None,
    ) -> dict[str, Any]:
        """Add a bot account; by default wait until its first sync (always dropped) is over.

        With `device_id` (the access token's own device) maubot enables encryption for the
        client; waiting then also covers the upload of the device's keys."""
        cursor = LogCursor(self.log_path)
        body: dict[str, Any] = {
            "homeserver": homeserver_url,
            "access_token": access_token,
            "enabled": True,
            "sync": True,
            "autojoin": True,
        }
        if device_id:
            body["device_id"] = device_id
        _, data = self.api("PUT", f"/client/{quote(mxid)}", body)
        self.bot_tokens[mxid] = access_token
        if wait_synced:
            self._wait_synced(mxid, cursor, timeout)
            if device_id:
                self._wait_device_keys(mxid, device_id, timeout)
        return dict(data)

    def device_keys(self, mxid: str, device_id: str) -> dict[str, Any] | None:
        """A bot device's keys as `/keys/query` shows them to others, or None."""
        status, data = self.synapse.request(
            "POST",
            "/_matrix/client/v3/keys/query",
            {"device_keys": {mxid: []}},
            token=self.bot_tokens[mxid],
        )
        if status != 200:
            raise MaubotError(f"keys/query -> {status}: {data}")
        device = data.get("device_keys", {}).get(mxid, {}).get(device_id)
        return device if device and device.get("keys") else None

    def _wait_device_keys(self, mxid: str, device_id: str, timeout: float) -> None:
        """mautrix uploads keys when a sync reports the one-time key count, and maubot drops the
        first sync: wake the next one until the keys are on the server."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.device_keys(mxid, device_id) is not None:
                return
            self._wake(mxid)
            time.sleep(0.5)
        raise MaubotError(f"{mxid}/{device_id} uploaded no keys in {timeout:.0f}s\n{self._tails()}")

    def register_bot(
        self,
        localpart: str | None = None,
        timeout: float = 60.0,
        device_id: str | None = None,
    ) -> str:
        """Register a fresh bot account on Synapse (rate limit overridden) and add it as a client;
        with `device_id`, logged in as that device with encryption on (see `create_client`)."""
        localpart = localpart or f"bot-{secrets.token_hex(4)}"
        password = secrets.token_hex(12)
        token = self.synapse.register_user(localpart, password)
        if device_id:
            token = self.synapse.login(localpart, password, device_id)
        mxid = self.synapse.user_id(localpart)
        self.synapse.override_ratelimit(mxid)
        self.create_client(mxid, self.synapse.url, token, timeout=timeout, device_id=device_id)
        return mxid

    def _wait_synced(self, mxid: str, cursor: LogCursor, timeout: float) -> None:
        """Wait for a completed /sync logged by this client (nudging a long poll with account data)."""
        marker = f"@maubot.client.{mxid}] req #"
        deadline = time.monotonic() + timeout
        woken = 0.0
        while time.monotonic() < deadline:
            if any(marker in line and SYNC_DONE in line for line in cursor.new_text().splitlines()):
                return
            if not self.running:
                raise MaubotError(
                    f"maubot exited while waiting for {mxid} to sync\n{self._tails()}"
                )
            if time.monotonic() - woken > 3.0:
                self._wake(mxid)
                woken = time.monotonic()
            time.sleep(0.05)
        raise MaubotError(f"{mxid} did not sync within {timeout:.0f}s\n{self._tails()}")

    def _wake(self, mxid: str) -> None:
        token = self.bot_tokens.get(mxid)
        if token:
            path = f"/_matrix/client/v3/user/{quote(mxid)}/account_data/{WAKE_TYPE}"
            self.synapse.request("PUT", path, {"ts": time.time()}, token=token)

    def create_instance(
        self,
        instance_id: str,
        primary_user: str,
        plugin_type: str = "org.surfaces.bot",
        config_yaml: str | None = None,
        wait_started: bool = True,
        timeout: float = 60.0,
    ) -> dict[str, Any]:
        """Create an enabled instance; by default wait until the plugin's start() finished."""
        cursor = LogCursor(self.log_path)
        body: dict[str, Any] = {"primary_user": primary_user, "type": plugin_type, "enabled": True}
        if config_yaml is not None:
            body["config"] = config_yaml
        _, data = self.api("PUT", f"/instance/{quote(instance_id)}", body)
        if wait_started:
            self.wait_instance_started(instance_id, cursor, timeout)
        return dict(data)

    def wait_instance_started(
        self, instance_id: str, cursor: LogCursor, timeout: float = 60.0
    ) -> None:
        """Wait for maubot's 'Started instance' line for this instance (or fail on its error)."""
        logger = f"@maubot.instance.{instance_id}]"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in cursor.new_text().splitlines():
                if logger in line and "Started instance" in line:
                    return
                if logger in line and "Failed to start instance" in line:
                    raise MaubotError(f"instance {instance_id} failed to start\n{self._tails()}")
            time.sleep(0.05)
        raise MaubotError(
            f"instance {instance_id} not started within {timeout:.0f}s\n{self._tails()}"
        )

    def get_instance(self, instance_id: str) -> dict[str, Any]:
        return dict(self.api("GET", f"/instance/{quote(instance_id)}")[1])

    def set_instance_config(self, instance_id: str, yaml_text: str) -> dict[str, Any]:
        """Save instance config like the web UI does (calls on_external_config_update when changed)."""
        _, data = self.api("PUT", f"/instance/{quote(instance_id)}", {"config": yaml_text})
        return dict(data)

    def set_instance_enabled(self, instance_id: str, enabled: bool) -> dict[str, Any]:
        _, data = self.api("PUT", f"/instance/{quote(instance_id)}", {"enabled": enabled})
        return dict(data)

    def delete_instance(self, instance_id: str) -> None:
        self.api("DELETE", f"/instance/{quote(instance_id)}")

    def get_client(self, mxid: str) -> dict[str, Any]:
        return dict(self.api("GET", f"/client/{quote(mxid)}")[1])

    def list_plugins(self) -> list[dict[str, Any]]:
        return list(self.api("GET", "/plugins")[1])
