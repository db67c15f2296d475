"""End-to-end fixtures: a real Synapse (once per session), test users, the plugin in maubot.

- `synapse` (session, sync): a `SynapseServer` on a free loopback port.
- `make_user(localpart=None) -> MatrixUser` (async factory): a fresh registered user, syncing.
- `make_e2ee_user(localpart=None, password="password", device_id=None) -> E2EEUser` (async
  factory): a fresh user on a matrix-nio device with E2EE (store under tmp_path), syncing, its
  device keys uploaded. Pair it with `bot_factory(encryption=True)`.
- `bot_factory(config_overrides=None, **kwargs) -> StandaloneBot` (sync factory): the repo's
  plugin in standalone maubot as a fresh bot account, started and ready for invites;
  `encryption=True` gives it a crypto-enabled device whose keys are uploaded before it returns.
- `standalone_bot`: `bot_factory()` with the plugin's base config.
- `postgres_database_url`: a fresh Postgres database for `bot_factory(database_url=...)`, so the
  bot (maubot and the plugin database alike) runs on Postgres; skipped when PostgreSQL does not
  answer at `SURFACES_POSTGRES_URL`, failed instead when `SURFACES_REQUIRE_POSTGRES=1`. Request
  it before `bot_factory`: the bot is stopped before its database is dropped.
- `surfaces_mbp` (session): the .mbp built by ./build.sh.
- `maubot_server`: a started full maubot server (`MaubotServer`), admin logged in.

`SURFACES_E2E_PLUGIN_DIR` runs the suite against another plugin checkout (default: this repo).

Bots and servers are stopped at teardown (bots before Synapse); when a test fails, the tails of
their logs are attached to its report.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from devtools import REPO_ROOT as _ROOT
from devtools.e2e import BotFactory, MakeE2EEUser, MakeUser
from devtools.e2ee_user import E2EEUser
from devtools.matrix_user import MatrixUser
from devtools.maubot_server import MaubotServer
from devtools.maubot_standalone import StandaloneBot
from devtools.procs import log_tail
from devtools.synapse import SynapseServer
from tests.conftest import fresh_postgres_database

PLUGIN_DIR = Path(os.environ.get("SURFACES_E2E_PLUGIN_DIR", _ROOT)).resolve()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/e2e is e2e, marked or not (so `-m "not e2e"` skips it all)."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.e2e)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
    """On failure, attach the tails of the bot/maubot logs this test used to its report."""
    report = yield
    if report.failed and report.when in ("setup", "call"):
        for name, path in getattr(item, "_e2e_logs", []):
            report.sections.append((f"{name} log tail ({path})", log_tail(path, 80)))
    return report


def watched(request: pytest.FixtureRequest, bot: StandaloneBot) -> StandaloneBot:
    """A (module-shared) bot whose log tail goes into this test's failure report."""
    _watch_log(request, f"bot {bot.user_id}", bot.log_path)
    return bot


def _watch_log(request: pytest.FixtureRequest, name: str, path: Path) -> None:
    """Register a log file to show in this test's failure report."""
    logs = getattr(request.node, "_e2e_logs", [])
    logs.append((name, path))
    request.node._e2e_logs = logs  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def synapse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SynapseServer]:
    """One Synapse for the whole session (a plain sync fixture: no event-loop scoping issues)."""
    server = SynapseServer(tmp_path_factory.mktemp("synapse")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest_asyncio.fixture
async def make_user(synapse: SynapseServer) -> AsyncIterator[MakeUser]:
    """Register fresh users (unique localparts) and return them started; closed at teardown."""
    users: list[MatrixUser] = []

    async def make(localpart: str | None = None, password: str = "password") -> MatrixUser:
        localpart = localpart or f"user-{secrets.token_hex(4)}"
        token = synapse.register_user(localpart, password)
        user = MatrixUser(synapse.url, synapse.user_id(localpart), token)
        users.append(user)
        return await user.start()

    yield make
    for user in users:
        await user.close()


@pytest_asyncio.fixture
async def make_e2ee_user(synapse: SynapseServer, tmp_path: Path) -> AsyncIterator[MakeE2EEUser]:
    """Register fresh E2EE users (matrix-nio, own crypto store each); closed at teardown."""
    users: list[E2EEUser] = []

    async def make(
        localpart: str | None = None, password: str = "password", device_id: str | None = None
    ) -> E2EEUser:
        store = tmp_path / f"nio-store{len(users)}"
        user = await E2EEUser.register(synapse, store, localpart, password, device_id)
        users.append(user)
        return user

    yield make
    for user in users:
        await user.close()


@pytest.fixture
def bot_factory(
    synapse: SynapseServer, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[BotFactory]:
    """Start the plugin in standalone maubot with config overrides (deep-merged over base-config).

    kwargs go to StandaloneBot (localpart, database_url, ignore_first_sync, ...).
    """
    bots: list[StandaloneBot] = []

    def make(config_overrides: dict[str, Any] | None = None, **kwargs: Any) -> StandaloneBot:
        kwargs.setdefault("data_dir", tmp_path / f"bot{len(bots)}")
        kwargs.setdefault("repo_root", PLUGIN_DIR)
        bot = StandaloneBot(synapse, config_overrides, **kwargs)
        bots.append(bot)
        _watch_log(request, f"bot {bot.user_id}", bot.log_path)
        return bot.start()

    yield make
    for bot in bots:
        bot.stop()


@pytest_asyncio.fixture
async def postgres_database_url() -> AsyncIterator[str]:
    """A new Postgres database of its own for one bot, dropped at teardown."""
    async with fresh_postgres_database("surfaces_e2e") as url:
        yield url


@pytest.fixture
def standalone_bot(bot_factory: BotFactory) -> StandaloneBot:
    """The plugin with its base config, in standalone maubot."""
    return bot_factory()


@pytest.fixture(scope="session")
def surfaces_mbp() -> Path:
    """Build the .mbp once per session with the repo's build.sh (the path it prints)."""
    args = [str(_ROOT / "build.sh")]
    if PLUGIN_DIR != _ROOT:
        args += ["--repo", str(PLUGIN_DIR), "--out", str(PLUGIN_DIR / "build")]
    result = subprocess.run(
        args, cwd=_ROOT, capture_output=True, text=True, check=True, timeout=120
    )
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path.is_file(), result
    return path


@pytest.fixture
def maubot_server(
    synapse: SynapseServer, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[MaubotServer]:
    """A started full maubot server with the admin logged in; add clients/instances via its API."""
    server = MaubotServer(synapse, tmp_path / "maubot")
    _watch_log(request, "maubot", server.log_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()
