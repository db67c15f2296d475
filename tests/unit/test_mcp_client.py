"""Tools over MCP as the dispatcher and the model see them, against the reference SDK's server
(devtools/mcp_server.py: streamable HTTP on loopback)."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

import aiohttp
import pytest

from devtools.mcp_server import NOW_FORMAT, McpTestServer
from devtools.procs import free_port
from surfaces_plugin.backends.base import ToolCall
from surfaces_plugin.config import AgentSpec, Settings, parse_settings
from surfaces_plugin.mcp import McpClient, McpError
from surfaces_plugin.toolbox import MAX_RESULT_CHARS, ToolBox, model_names, tool_result

ALLOWED = ["now", "clock.zones", "add", "fail", "slow", "big"]  # not secret_admin
TOKEN = "s3cret-mcp-token-1234"
LOG_NAME = "surfaces.test.tools"
# The test server's `slow` sends a log notification (deprecated only from protocol 2026-07-28).
pytestmark = pytest.mark.filterwarnings("ignore::mcp.shared.exceptions.MCPDeprecationWarning")


@pytest.fixture(scope="module")
def server() -> Iterator[McpTestServer]:
    with McpTestServer() as running:
        yield running


@pytest.fixture(scope="module")
def json_server() -> Iterator[McpTestServer]:
    with McpTestServer(json_response=True) as running:
        yield running


def settings_for(servers: list[dict[str, Any]], tools: list[str] | None = None) -> Settings:
    """A config with one tool-using agent `helper` whose servers are `tools` (default: all)."""
    return parse_settings(
        {
            "backends": [{"id": "llm", "type": "openai", "base_url": "http://127.0.0.1:9/v1"}],
            "agents": [
                {
                    "id": "helper",
                    "backend": "llm",
                    "tools": tools if tools is not None else [s["id"] for s in servers],
                }
            ],
            "default_agent": "helper",
            "mcp_servers": servers,
        }
    )


def entry(server_id: str, url: str, **extra: Any) -> dict[str, Any]:
    return {"id": server_id, "url": url, "allow": ALLOWED, **extra}


class Box:
    """A ToolBox on a config the test can change, and the agent of that config."""

    def __init__(self, settings: Settings, **options: Any) -> None:
        self.settings = settings
        self.toolbox = ToolBox(lambda: self.settings, logging.getLogger(LOG_NAME), **options)

    @property
    def agent(self) -> AgentSpec:
        return self.settings.agents["helper"]

    def change(self, settings: Settings) -> None:
        self.settings = settings
        self.toolbox.apply(settings)

    async def names(self) -> list[str]:
        return [tool.name for tool in await self.toolbox.tools_for(self.agent)]

    async def call(self, name: str, **arguments: Any):
        return await self.toolbox.call(self.agent, ToolCall(f"call-{name}", name, arguments))


@pytest.fixture
async def make_box() -> Any:
    boxes: list[Box] = []

    def make(*servers: dict[str, Any], **options: Any) -> Box:
        box = Box(settings_for(list(servers)), **options)
        boxes.append(box)
        return box

    yield make
    for box in boxes:
        await box.toolbox.close()


async def wait_for(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never came true"
        await asyncio.sleep(0.02)


async def test_only_allowed_tools_are_offered_under_model_safe_names(server, make_box) -> None:
    box = make_box(entry("clock", server.url))
    tools = {tool.name: tool for tool in await box.toolbox.tools_for(box.agent)}
    assert sorted(tools) == sorted(["now", "clock_zones", "add", "fail", "slow", "big"])
    assert "secret_admin" not in tools
    assert all(re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", name) for name in tools)
    assert tools["add"].description == "Adds two numbers."
    assert tools["add"].parameters["required"] == ["a", "b"]
    assert tools["add"].parameters["properties"]["a"]["type"] == "number"


@pytest.mark.parametrize("transport", ["sse", "json"])
async def test_calls_return_the_tools_answers(transport, server, json_server, make_box) -> None:
    url = server.url if transport == "sse" else json_server.url
    box = make_box(entry("clock", url))
    added = await box.call("add", a=2, b=3.5)
    assert not added.is_error and float(added.text) == 5.5
    now = await box.call("now")
    said = datetime.strptime(now.text, NOW_FORMAT).replace(tzinfo=timezone.utc)
    assert abs((datetime.now(timezone.utc) - said).total_seconds()) < 5
    berlin = await box.call("now", tz="Europe/Berlin")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+0[12]:00", berlin.text)
    # The model calls the dotted MCP name by its safe name; the server gets its own name back.
    zones = await box.call("clock_zones")
    assert "Europe/Berlin" in zones.text and not zones.is_error


async def test_notifications_before_the_result_are_skipped(server, make_box) -> None:
    box = make_box(entry("clock", server.url))
    result = await box.call("slow", seconds=0.1)  # the server logs "waiting" on the stream first
    assert result.text == "waited 0.1 s" and not result.is_error


async def test_a_failing_tool_is_an_error_result_with_its_reason(server, make_box) -> None:
    box = make_box(entry("clock", server.url))
    result = await box.call("fail", reason="the disk is full")
    assert result.is_error
    assert "the disk is full" in result.text


async def test_a_tool_outside_the_allow_list_is_refused_without_asking_the_server(
    server, make_box
) -> None:
    box = make_box(entry("clock", server.url))
    result = await box.call("secret_admin")
    assert result.is_error
    assert "no tool `secret_admin`" in result.text
    assert "admin powers" not in result.text


async def test_a_slow_tool_times_out_and_the_server_is_told_to_stop(server, make_box) -> None:
    box = make_box(entry("clock", server.url, timeout_s=1))
    server.seen.clear()
    started = time.monotonic()
    result = await box.call("slow", seconds=30)
    assert time.monotonic() - started < 5
    assert result.is_error and result.text == "The tool `slow` timed out after 1 s."
    await wait_for(lambda: "slow cancelled" in server.seen)  # notifications/cancelled arrived


async def test_cancelling_a_call_abandons_it_at_once(server, make_box) -> None:
    box = make_box(entry("clock", server.url))
    server.seen.clear()
    call = asyncio.create_task(box.call("slow", seconds=30))
    await wait_for(lambda: "slow started" in server.seen)
    started = time.monotonic()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert time.monotonic() - started < 1
    await wait_for(lambda: "slow cancelled" in server.seen)
    # The session is still good for the next call.
    assert (await box.call("add", a=1, b=1)).text == "2.0"


async def test_a_long_result_is_cut_with_a_marker(server, make_box) -> None:
    box = make_box(entry("clock", server.url))
    result = await box.call("big", chars=50_000)
    assert not result.is_error
    assert result.text.startswith("The quick brown fox")
    assert len(result.text) < MAX_RESULT_CHARS + 200
    assert result.text.endswith(
        "[truncated: the tool returned 50,000 characters; only the first 16,000 are shown]"
    )


async def test_the_configured_headers_reach_the_server(make_box) -> None:
    with McpTestServer(token=TOKEN) as guarded:
        box = make_box(entry("clock", guarded.url, headers={"Authorization": f"Bearer {TOKEN}"}))
        assert (await box.call("add", a=1, b=2)).text == "3.0"


async def test_refused_credentials_name_the_server_and_never_the_token(
    make_box, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "Bearer wrong-token-98765"
    caplog.set_level(logging.DEBUG)
    with McpTestServer(token=TOKEN) as guarded:
        box = make_box(entry("clock", guarded.url, headers={"Authorization": wrong}))
        assert await box.names() == []
        [line] = await box.toolbox.describe(box.agent)
        result = await box.call("add", a=1, b=2)
        async with aiohttp.ClientSession() as http:
            spec = box.settings.mcp_servers["clock"]
            client = McpClient(spec, http, logging.getLogger(LOG_NAME))
            with pytest.raises(McpError) as raised:
                await client.call_tool("add", {"a": 1, "b": 2})
    assert "`clock`" in line and "HTTP 401" in line
    assert "`clock`" in str(raised.value) and "HTTP 401" in str(raised.value)
    assert result.is_error
    # The server echoes the token it refused back in its error body; none of it gets through.
    for text in (line, str(raised.value), result.text, caplog.text):
        assert "wrong-token-98765" not in text


async def test_an_expired_session_is_renewed_and_the_call_goes_through(make_box) -> None:
    with McpTestServer() as restarting:
        box = make_box(entry("clock", restarting.url))
        assert (await box.call("add", a=1, b=1)).text == "2.0"
        restarting.restart()  # same port; the session the client holds is unknown now (404)
        assert (await box.call("add", a=2, b=2)).text == "4.0"


async def test_an_unreachable_server_is_left_out_and_logged_once(
    server, make_box, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    down = f"http://127.0.0.1:{port}/mcp"
    box = make_box(entry("clock", server.url), entry("later", down), down_retry_s=0)
    caplog.set_level(logging.INFO, logger=LOG_NAME)
    for _ in range(3):
        assert "now" in await box.names()  # the reachable server's tools are still offered
    warnings = [r for r in caplog.records if "Leaving out the tools of MCP server later" in r.message]
    assert len(warnings) == 1
    lines = await box.toolbox.describe(box.agent)
    assert any("`later`" in line and "cannot connect" in line for line in lines)
    with McpTestServer(port=port):
        names = await box.names()
    assert "later_now" in names and "clock_now" in names  # both servers offer `now` now
    assert any("MCP server later is reachable again" in r.message for r in caplog.records)


async def test_a_down_server_is_not_asked_again_on_every_turn(make_box) -> None:
    port = free_port()
    box = make_box(entry("later", f"http://127.0.0.1:{port}/mcp"))  # retried after 30 s
    assert await box.names() == []
    with McpTestServer(port=port):
        assert await box.names() == []  # still within the wait: not asked


async def test_tools_clashing_between_servers_get_prefixed_names(server, make_box) -> None:
    box = make_box(entry("one", server.url), entry("two", server.url))
    names = await box.names()
    assert "one_add" in names and "two_add" in names and "add" not in names
    assert (await box.call("two_add", a=4, b=4)).text == "8.0"


async def test_a_config_change_relists_the_changed_server(server, make_box) -> None:
    box = make_box(entry("clock", server.url))
    assert "add" in await box.names()
    box.change(settings_for([{"id": "clock", "url": server.url, "allow": ["now"]}]))
    assert await box.names() == ["now"]
    assert (await box.call("add", a=1, b=1)).is_error


def test_model_names_are_safe_unique_and_short() -> None:
    long_name = "x" * 80
    names = model_names(
        [("a", "get.weather"), ("a", long_name), ("b", long_name), ("a", "ok-name_1"), ("a", "é")]
    )
    assert names[0] == "get_weather"
    assert names[1] != names[2]
    assert names[3] == "ok-name_1"
    assert all(re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", name) for name in names)
    assert len(set(names)) == len(names)
    # Two names that only become equal once cleaned still get two names.
    clash = model_names([("s", "a.b"), ("s", "a/b")])
    assert len(set(clash)) == 2


def test_non_text_content_is_summarised() -> None:
    png = "A" * 16_384  # 12 KB once decoded
    result = tool_result(
        {
            "content": [
                {"type": "text", "text": "Here is the chart."},
                {"type": "image", "data": png, "mimeType": "image/png"},
                {"type": "resource", "resource": {"uri": "file:///a.txt", "text": "inside"}},
                {"type": "resource_link", "uri": "file:///b.pdf", "name": "b.pdf"},
            ],
            "isError": False,
        }
    )
    assert result.text.splitlines() == [
        "Here is the chart.",
        "[image: image/png, 12 KB]",
        "inside",
        "[resource link: b.pdf file:///b.pdf]",
    ]
    only_structured = tool_result({"content": [], "structuredContent": {"temp": 21}})
    assert only_structured.text == '{"temp": 21}'
    assert tool_result({"isError": True}).is_error
