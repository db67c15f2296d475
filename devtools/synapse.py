"""A real Synapse on loopback: SQLite, relaxed rate limits, shared-secret registration.

Synchronous on purpose (subprocess + urllib) so pytest can hold it in a plain session fixture
without event-loop scoping trouble; async callers can wrap calls in `asyncio.to_thread`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import signedjson.key

from devtools.procs import ServerProcess, free_port, spawn, stop_process

SERVER_NAME = "localhost"
# Generous enough that no test or benchmark ever meets a limit.
_RELAXED = {"per_second": 10000, "burst_count": 100000}


class SynapseError(RuntimeError):
    """Synapse failed to start or answered an admin call with an error."""


def _rate_limits() -> dict[str, Any]:
    """Every rc_* limit Synapse 1.163 knows, raised so tests never see a 429."""
    return {
        "rc_message": _RELAXED,
        "rc_registration": _RELAXED,
        "rc_registration_token_validity": _RELAXED,
        "rc_login": {
            "address": _RELAXED,
            "account": _RELAXED,
            "failed_attempts": _RELAXED,
        },
        "rc_joins": {"local": _RELAXED, "remote": _RELAXED},
        "rc_joins_per_room": _RELAXED,
        "rc_invites": {"per_room": _RELAXED, "per_user": _RELAXED, "per_issuer": _RELAXED},
        "rc_room_creation": _RELAXED,
        "rc_profile": _RELAXED,
        "rc_admin_redaction": _RELAXED,
        "rc_3pid_validation": _RELAXED,
        "rc_key_requests": _RELAXED,
        "rc_third_party_invite": _RELAXED,
        "rc_media_create": _RELAXED,
        "rc_federation": {"window_size": 1000, "sleep_limit": 10000, "reject_limit": 10000},
    }


class SynapseServer(ServerProcess):
    """One Synapse process with its data dir; `start()`/`stop()` may be repeated (restart keeps data)."""

    def __init__(self, data_dir: Path | None = None, port: int | None = None) -> None:
        self.data_dir = (
            Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="surfaces-synapse-"))
        )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server_name = SERVER_NAME
        self.log_path = self.data_dir / "homeserver.log"
        self.config_path = self.data_dir / "homeserver.yaml"
        self.shared_secret = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._admin_token: str | None = None
        self._write_config_once()

    # -- configuration ---------------------------------------------------------------------------

    def _write_config_once(self) -> None:
        """Write config, log config and signing key unless a previous run left them (restart)."""
        secrets_path = self.data_dir / "secrets.json"
        if secrets_path.exists():
            saved = json.loads(secrets_path.read_text())
        else:
            saved = {k: secrets.token_hex(24) for k in ("registration", "macaroon", "form")}
            secrets_path.write_text(json.dumps(saved))
        self.shared_secret = saved["registration"]
        key_path = self.data_dir / "signing.key"
        if not key_path.exists():
            # In-process key generation saves a second Synapse start (`--generate-keys`).
            with key_path.open("w") as f:
                signedjson.key.write_signing_keys(f, [signedjson.key.generate_signing_key("a_dev")])
        log_config = {
            "version": 1,
            "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
            "handlers": {
                "file": {
                    "class": "logging.FileHandler",
                    "filename": str(self.log_path),
                    "formatter": "plain",
                }
            },
            "root": {"level": "INFO", "handlers": ["file"]},
            "disable_existing_loggers": False,
        }
        (self.data_dir / "log.yaml").write_text(json.dumps(log_config, indent=2))
        config = {
            "server_name": self.server_name,
            "public_baseurl": self.url + "/",
            "pid_file": str(self.data_dir / "homeserver.pid"),
            "listeners": [
                {
                    "port": self.port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "tls": False,
                    "x_forwarded": False,
                    "resources": [{"names": ["client"], "compress": False}],
                }
            ],
            "database": {
                "name": "sqlite3",
                "args": {"database": str(self.data_dir / "homeserver.db")},
            },
            "media_store_path": str(self.data_dir / "media"),
            "signing_key_path": str(key_path),
            "log_config": str(self.data_dir / "log.yaml"),
            "report_stats": False,
            "enable_metrics": False,
            "registration_shared_secret": saved["registration"],
            "macaroon_secret_key": saved["macaroon"],
            "form_secret": saved["form"],
            "trusted_key_servers": [],
            "suppress_key_server_warning": True,
            "federation_domain_whitelist": [],
            "presence": {"enabled": False},
            "url_preview_enabled": False,
            **_rate_limits(),
        }
        # JSON is valid YAML: no YAML writer needed.
        self.config_path.write_text(json.dumps(config, indent=2))

    # -- process ---------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 60.0) -> SynapseServer:
        """Start Synapse and block until the client API answers."""
        if self.running:
            return self
        self._proc = spawn(
            [sys.executable, "-m", "synapse.app.homeserver", "-c", str(self.config_path)],
            cwd=self.data_dir,
            log_path=self.data_dir / "stdout.log",
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise SynapseError(f"Synapse exited with {self._proc.returncode}\n{self._tails()}")
            try:
                with urllib.request.urlopen(self.url + "/_matrix/client/versions", timeout=2):
                    return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.1)
        self.stop()
        raise SynapseError(f"Synapse not ready after {timeout:.0f}s\n{self._tails()}")

    def stop(self, timeout: float = 15.0) -> None:
        """Terminate, then SIGKILL after a bounded wait. The data dir is kept for `start()`."""
        stop_process(self._proc, timeout)
        self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    # -- HTTP --------------------------------------------------------------------------------------

    def request(
        self, method: str, path: str, body: dict[str, Any] | None = None, token: str | None = None
    ) -> tuple[int, dict[str, Any]]:
        """One JSON request to the homeserver; returns (status, body) without raising on 4xx/5xx."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                return err.code, json.loads(raw or b"{}")
            except json.JSONDecodeError:
                return err.code, {"raw": raw.decode(errors="replace")}

    def _ok(
        self, method: str, path: str, body: dict[str, Any] | None = None, token: str | None = None
    ) -> dict[str, Any]:
        status, data = self.request(method, path, body, token)
        if status >= 300:
            raise SynapseError(f"{method} {path} -> {status}: {data}")
        return data

    # -- users -------------------------------------------------------------------------------------

    def user_id(self, localpart: str) -> str:
        return f"@{localpart}:{self.server_name}"

    def register_user(self, localpart: str, password: str, admin: bool = False) -> str:
        """Create a user with the shared-secret admin API, then log in; returns an access token."""
        nonce = self._ok("GET", "/_synapse/admin/v1/register")["nonce"]
        # The HMAC covers nonce, user, password and admin flag joined by NUL (no trailing NUL).
        mac = hmac.new(
            self.shared_secret.encode(),
            "\x00".join([nonce, localpart, password, "admin" if admin else "notadmin"]).encode(),
            hashlib.sha1,
        )
        status, data = self.request(
            "POST",
            "/_synapse/admin/v1/register",
            {
                "nonce": nonce,
                "username": localpart,
                "password": password,
                "admin": admin,
                "mac": mac.hexdigest(),
                "inhibit_login": True,
            },
        )
        if status >= 300 and data.get("errcode") != "M_USER_IN_USE":
            raise SynapseError(f"register {localpart} -> {status}: {data}")
        return self.login(localpart, password)

    def login(self, localpart: str, password: str, device_id: str | None = None) -> str:
        """A fresh access token for an existing user (each call is a new device)."""
        body: dict[str, Any] = {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": localpart},
            "password": password,
        }
        if device_id:
            body["device_id"] = device_id
        return str(self._ok("POST", "/_matrix/client/v3/login", body)["access_token"])

    @property
    def admin_token(self) -> str:
        """Token of a server admin created on first use (for admin API calls)."""
        if self._admin_token is None:
            self._admin_token = self.register_user(
                "devtools-admin", "devtools-admin-pw", admin=True
            )
        return self._admin_token

    def override_ratelimit(self, user_id: str) -> None:
        """Exempt a user (the bot) from message rate limits entirely."""
        path = f"/_synapse/admin/v1/users/{urllib.parse.quote(user_id)}/override_ratelimit"
        self._ok("POST", path, {"messages_per_second": 0, "burst_count": 0}, token=self.admin_token)

    def joined_rooms(self, token: str) -> list[str]:
        """Rooms the token's user is joined to now (`/state` can be stale after a kick)."""
        return list(self._ok("GET", "/_matrix/client/v3/joined_rooms", token=token)["joined_rooms"])
