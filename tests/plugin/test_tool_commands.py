"""`!ai tools` as a user sees it, with a real MCP server (devtools/mcp_server.py) behind it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from devtools.mcp_server import McpTestServer
from devtools.procs import free_port
from surfaces_plugin.backends import Backend, Chunk, GenerationRequest
from surfaces_plugin.backends.base import Features
from surfaces_plugin.config import parse_settings

from .conftest import BASE_CONFIG, config_with

ALICE = "@alice:localhost"
TOKEN = "mcp-plugin-secret-777"


class ToolCallingBackend(Backend):
    """Stands in for a provider that can call tools (what `!ai tools` asks of a backend)."""

    features = Features(tools=True)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        yield Chunk("ok")


class WordsOnlyBackend(ToolCallingBackend):
    features = Features(tools=False)


@pytest.fixture(scope="module")
def mcp_server() -> Iterator[McpTestServer]:
    with McpTestServer(token=TOKEN) as running:
        yield running


def tool_config(url: str, agent_tools: list[str]) -> dict:
    return {
        "backends": [
            *BASE_CONFIG["backends"],
            {"id": "llm", "type": "openai", "base_url": "http://127.0.0.1:9/v1"},
        ],
        "agents": [
            *BASE_CONFIG["agents"],
            {"id": "helper", "name": "Helper", "backend": "llm", "tools": agent_tools},
        ],
        "default_agent": "helper",
        "mcp_servers": [
            {
                "id": "clock",
                "url": url,
                "allow": ["now", "add"],
                "headers": {"Authorization": f"Bearer {TOKEN}"},
            },
            {"id": "down", "url": f"http://127.0.0.1:{free_port()}/mcp", "allow": ["now"]},
        ],
    }


async def working_room(make_surfaces, config: dict, backend: type[Backend]):
    h = await make_surfaces(**config)
    await h.say(h.dm(ALICE), ALICE, "!ai start")
    [room] = h.app.rooms.all_rooms()
    h.app.backends.put(backend(h.app.settings.backends["llm"]))
    return h, room.room_id


async def test_tools_lists_the_agents_tools_and_the_servers_it_cannot_reach(
    make_surfaces, mcp_server
) -> None:
    h, room = await working_room(
        make_surfaces, tool_config(mcp_server.url, ["clock", "down"]), ToolCallingBackend
    )
    await h.say(room, ALICE, "!ai tools")
    reply = h.last_reply(room)
    assert reply.startswith("**Tools of `helper`**")
    assert "- `now` (clock): The current time." in reply
    assert "- `add` (clock): Adds two numbers." in reply
    assert "secret_admin" not in reply and "clock.zones" not in reply  # not in the allow-list
    assert "`down`" in reply and "cannot connect" in reply
    assert TOKEN not in reply


async def test_tools_says_when_the_agent_has_none(make_surfaces, mcp_server) -> None:
    h, room = await working_room(make_surfaces, tool_config(mcp_server.url, []), ToolCallingBackend)
    await h.say(room, ALICE, "!ai tools")
    assert h.last_reply(room) == "The agent `helper` has no tools."


async def test_tools_says_when_the_backend_cannot_call_tools(make_surfaces, mcp_server) -> None:
    h, room = await working_room(
        make_surfaces, tool_config(mcp_server.url, ["clock"]), WordsOnlyBackend
    )
    await h.say(room, ALICE, "!ai tools")
    assert h.last_reply(room) == (
        "The agent `helper` has tools configured, but its backend `llm` cannot call tools."
    )


async def test_tools_works_only_in_a_working_room(make_surfaces, mcp_server) -> None:
    h = await make_surfaces(**tool_config(mcp_server.url, ["clock"]))
    dm = h.dm(ALICE)
    await h.say(dm, ALICE, "!ai tools")
    assert "works in one of your working rooms" in h.last_reply(dm)
    await h.say(dm, ALICE, "!ai help")
    assert "`!ai tools`: the tools this room's agent can call" in h.last_reply(dm)


async def test_a_live_config_change_reaches_the_tool_list(make_surfaces, mcp_server) -> None:
    config = tool_config(mcp_server.url, ["clock"])
    h, room = await working_room(make_surfaces, config, ToolCallingBackend)
    await h.say(room, ALICE, "!ai tools")
    assert "`now`" in h.last_reply(room)
    config["mcp_servers"][0]["allow"] = ["add"]
    h.app.apply_settings(parse_settings(config_with(**config)))
    await h.say(room, ALICE, "!ai tools")
    assert "`add`" in h.last_reply(room) and "`now`" not in h.last_reply(room)
