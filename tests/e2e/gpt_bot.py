"""One bot per test module whose `gpt` agent is each test's own FakeOpenAI on a fixed port
(import the fixtures into a test module to use them)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio

from devtools.e2e import MakeUser
from devtools.fake_openai import FakeOpenAI
from devtools.maubot_standalone import StandaloneBot
from devtools.procs import free_port
from devtools.synapse import SynapseServer
from tests.e2e.conftest import PLUGIN_DIR, watched
from tests.e2e.test_conversations import API_KEY, Chat, bot_config, command, onboard


@pytest.fixture(scope="module")
def module_bot(
    synapse: SynapseServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[StandaloneBot, int]]:
    """One bot for the module; its `fake` backend is each test's FakeOpenAI on this port."""
    port = free_port()
    data_dir = tmp_path_factory.mktemp("gpt-bot")
    with StandaloneBot(synapse, bot_config(port), data_dir=data_dir, repo_root=PLUGIN_DIR) as bot:
        yield bot, port


@pytest.fixture
def bot(module_bot: tuple[StandaloneBot, int], request: pytest.FixtureRequest) -> StandaloneBot:
    return watched(request, module_bot[0])


@pytest_asyncio.fixture
async def fake(module_bot: tuple[StandaloneBot, int]) -> AsyncIterator[FakeOpenAI]:
    server = FakeOpenAI(port=module_bot[1], require_key=API_KEY)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def gpt_chat(bot: StandaloneBot, make_user: MakeUser) -> Chat:
    chat = await onboard(await make_user(), bot)
    await command(chat, "!ai agent gpt")
    return chat


def conversation(body: dict[str, Any]) -> list[tuple[str, str]]:
    """A request's messages after the system prompt, as (role, content)."""
    return [(m["role"], m["content"]) for m in body["messages"][1:]]
