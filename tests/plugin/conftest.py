"""Plugin tests: the real Surfaces service on a real database, with a recording Matrix client."""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from mautrix.util.async_db import Database
from ruamel.yaml import YAML

from devtools.mcp_server import McpTestServer
from surfaces_plugin.app import Surfaces
from surfaces_plugin.config import parse_settings

from .fakes import FakeClient

BASE_CONFIG = YAML(typ="safe").load((Path(__file__).parents[2] / "base-config.yaml").read_text())


def config_with(**overrides: Any) -> dict[str, Any]:
    """The shipped base config with top-level keys replaced (sections merged one level deep)."""
    data = copy.deepcopy(BASE_CONFIG)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


class Harness:
    """A running Surfaces with helpers to act as a user and to read what the user would see."""

    def __init__(self, app: Surfaces, client: FakeClient) -> None:
        self.app = app
        self.client = client

    async def say(self, room_id: str, sender: str, body: str) -> None:
        await self.app.on_message(self.client.user_message(room_id, sender, body))
        await self.settle()

    async def redact(self, room_id: str, sender: str, event_id: str) -> None:
        await self.app.on_redaction(self.client.redaction(room_id, sender, event_id))
        await self.settle()

    async def edit(self, room_id: str, sender: str, target: str, body: str) -> None:
        await self.app.on_message(self.client.edit(room_id, sender, target, body))
        await self.settle()

    async def react(self, room_id: str, sender: str, target: str, key: str) -> None:
        await self.app.on_reaction(self.client.reaction(room_id, sender, target, key))
        await self.settle()

    async def settle(self, timeout: float = 60) -> None:
        """Let background tasks (commands, room workers) run until none is left (or time out)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            pending = self.app.io.running_tasks()
            if not pending:
                await asyncio.sleep(0.01)  # a finishing task may have spawned another
                if not self.app.io.running_tasks():
                    return
                continue
            await asyncio.wait(pending, timeout=deadline - loop.time())
        raise TimeoutError("background tasks still running after the test's timeout")

    def last_reply(self, room_id: str) -> str:
        return self.client.bodies(room_id)[-1]

    def dm(self, user: str) -> str:
        return self.client.add_room(user, {user: "join", str(self.client.mxid): "join"})


@pytest_asyncio.fixture
async def make_surfaces(db: Database) -> AsyncIterator[Callable[..., Any]]:
    started: list[Surfaces] = []

    async def make(
        client: FakeClient | None = None, *, settle: bool = True, **overrides: Any
    ) -> Harness:
        client = client or FakeClient()
        settings = parse_settings(config_with(**overrides))
        app = Surfaces(
            client=client,  # type: ignore[arg-type]
            database=db,
            settings=settings,
            log=logging.getLogger("surfaces.test"),
        )
        await app.start(early_events=[])
        started.append(app)
        harness = Harness(app, client)
        if settle:
            await harness.settle()  # start-up work (catch-up) runs in the background
        return harness

    yield make
    for app in started:
        await app.stop()


@pytest.fixture(scope="module")
def mcp_tools() -> Iterator[McpTestServer]:
    """A real MCP server (devtools/mcp_server.py) on loopback, shared by a module's tests."""
    with McpTestServer() as running:
        yield running


async def until(condition: Callable[[], bool], what: str, timeout: float = 10) -> None:
    """Wait for something another thread or task makes true (a positive signal, not a sleep)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"gave up waiting for {what}"
        await asyncio.sleep(0.01)
