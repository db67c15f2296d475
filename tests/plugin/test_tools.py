"""Tool calls in a working room: the loop, what the room shows, the history, cancel, the bound.

Everything is real but Matrix: the model is the local OpenAI-compatible server
(devtools.fake_openai, which calls tools like a model when a message has a line
`call <tool> <json>`), and the tools come from the real MCP test server (devtools/mcp_server.py)
through the app's ToolBox, wired from the config's `mcp_servers` and the agent's `tools`.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest_asyncio

from devtools.fake_openai import FakeOpenAI
from devtools.mcp_server import McpTestServer
from surfaces_plugin import layout
from surfaces_plugin.config import parse_settings

from .conftest import config_with, until

ALICE = "@alice:localhost"


@pytest_asyncio.fixture
async def model() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as server:
        yield server


def tool_config(
    model: FakeOpenAI,
    mcp: McpTestServer,
    *,
    timeout_s: float = 10,
    max_steps: int = 6,
    agent_tools: tuple[str, ...] = ("clock",),
) -> dict[str, Any]:
    return dict(
        streaming={"edit_interval_ms": 0},
        backends=[{"id": "oa", "type": "openai", "base_url": model.base_url}],
        mcp_servers=[
            {
                "id": "clock",
                "url": mcp.url,
                "allow": ["add", "fail", "slow"],
                "timeout_s": timeout_s,
            }
        ],
        agents=[{"id": "helper", "name": "Helper", "backend": "oa", "tools": list(agent_tools)}],
        default_agent="helper",
        tools={"max_steps": max_steps},
    )


async def tool_room(make_surfaces, config: dict[str, Any]):
    h = await make_surfaces(**config)
    await h.say(h.dm(ALICE), ALICE, "!ai start")
    [room] = h.app.rooms.all_rooms()
    return h, room.room_id


class ServerLog:
    """What the MCP server went through since this test began (the server is module-shared)."""

    def __init__(self, server: McpTestServer) -> None:
        self.server = server
        self.start = len(server.seen)

    def __call__(self) -> list[str]:
        return self.server.seen[self.start :]


def tool_notices(h, room: str) -> list[dict]:
    """Each tool notice's latest content (edits applied)."""
    latest: dict[str, dict] = {}
    for event in h.client.messages(room):
        content = event["content"]
        relates = content.get("m.relates_to") or {}
        if relates.get("rel_type") == "m.replace":
            if relates["event_id"] in latest:
                latest[relates["event_id"]] = content["m.new_content"]
        elif layout.TOOLS_KEY in content:
            latest[event["event_id"]] = content
    return list(latest.values())


def edits_of_tool_notices(h, room: str) -> int:
    notices = {e["event_id"] for e in h.client.messages(room) if layout.TOOLS_KEY in e["content"]}
    return sum(
        1
        for e in h.client.messages(room)
        if (e["content"].get("m.relates_to") or {}).get("event_id") in notices
    )


async def test_the_model_calls_a_tool_and_answers_with_its_result(
    make_surfaces, model, mcp_tools
) -> None:
    h, room = await tool_room(make_surfaces, tool_config(model, mcp_tools))
    await h.say(room, ALICE, 'What is 19 + 23?\ncall add {"a": 19, "b": 23}')

    assert h.last_reply(room) == "Using the tools: 42.0"  # the server's sum, quoted by the model
    offered = [t["function"]["name"] for t in model.bodies[0]["tools"]]
    assert offered == ["add", "fail", "slow"]  # the allow-list, in the server's order
    [notice] = tool_notices(h, room)
    assert notice["msgtype"] == "m.notice"  # a notice: no notification for each call
    assert notice["body"] == "🔧 `add`(a: 19, b: 23) → 42.0"
    assert edits_of_tool_notices(h, room) >= 1  # posted while running, edited with the outcome
    marker = layout.parse_tools_marker(notice)
    assert marker is not None and marker.done
    [[step]] = marker.steps
    assert (step["name"], step["arguments"], step["result"]) == ("add", {"a": 19, "b": 23}, "42.0")
    # The follow-up request paired the result with the call.
    call, result = model.bodies[-1]["messages"][-2:]
    [asked] = call["tool_calls"]
    assert asked["function"]["name"] == "add"
    assert json.loads(asked["function"]["arguments"]) == {"a": 19, "b": 23}
    assert result == {"role": "tool", "tool_call_id": asked["id"], "content": "42.0"}


async def test_a_failing_tool_is_reported_to_the_model_not_a_crash(
    make_surfaces, model, mcp_tools
) -> None:
    h, room = await tool_room(make_surfaces, tool_config(model, mcp_tools))
    await h.say(room, ALICE, 'call fail {"reason": "the disk is full"}')
    said = "Error executing tool fail: the disk is full"  # the server's error result
    # The model is told it is an error (chat completions has no flag for it).
    assert model.bodies[-1]["messages"][-1]["content"] == f"Error: {said}"
    assert h.last_reply(room) == f"Using the tools: Error: {said}"
    [notice] = tool_notices(h, room)
    assert notice["body"] == f'🔧 `fail`(reason: "the disk is full") → ⚠️ {said}'
    assert layout.parse_tools_marker(notice).steps[0][0]["is_error"] is True


async def test_a_tool_slower_than_its_timeout_is_a_timed_out_result(
    make_surfaces, model, mcp_tools
) -> None:
    h, room = await tool_room(make_surfaces, tool_config(model, mcp_tools, timeout_s=1))
    server = ServerLog(mcp_tools)
    started = time.monotonic()
    await h.say(room, ALICE, 'call slow {"seconds": 30}')
    assert time.monotonic() - started < 10  # the turn did not wait for the tool's 30 s
    timed_out = "The tool `slow` timed out after 1 s."
    assert model.bodies[-1]["messages"][-1]["content"] == f"Error: {timed_out}"
    assert h.last_reply(room) == f"Using the tools: Error: {timed_out}"
    [notice] = tool_notices(h, room)
    assert notice["body"] == f"🔧 `slow`(seconds: 30) → ⚠️ {timed_out}"
    # The call the client gave up on was cancelled on the server too, not left running.
    await until(lambda: "slow cancelled" in server(), "the server to see the call cancelled")


async def test_a_turn_stops_after_the_step_bound_and_says_so(
    make_surfaces, model, mcp_tools
) -> None:
    h, room = await tool_room(make_surfaces, tool_config(model, mcp_tools, max_steps=2))
    await h.say(room, ALICE, 'loop add {"a": 1, "b": 1}')
    assert len(model.bodies) == 3  # two rounds of calls, then the model is not obeyed again
    assert "stopped: the agent wanted more than 2 rounds of tool calls" in h.last_reply(room)
    [notice] = tool_notices(h, room)
    assert notice["body"].split("\n") == [
        "🔧 `add`(a: 1, b: 1) → 2.0",
        "🔧 `add`(a: 1, b: 1) → 2.0",
        "*stopped: more than 2 rounds of tool calls in one turn*",
    ]
    await h.say(room, ALICE, "still there?")  # the room goes on
    assert h.last_reply(room) == "Fake model says: still there?"


async def test_cancel_during_a_call_ends_the_turn_and_the_room_goes_on(
    make_surfaces, model, mcp_tools
) -> None:
    h, room = await tool_room(make_surfaces, tool_config(model, mcp_tools, timeout_s=60))
    server = ServerLog(mcp_tools)
    await h.app.on_message(h.client.user_message(room, ALICE, 'call slow {"seconds": 30}'))
    await until(lambda: "slow started" in server(), "the slow tool to start on the server")
    started = time.monotonic()
    await h.say(room, ALICE, "!ai cancel")  # returns once every task of the room has ended
    assert time.monotonic() - started < 5
    [notice] = tool_notices(h, room)
    assert notice["body"] == "🔧 `slow`(seconds: 30) → not finished\n*cancelled*"
    assert layout.parse_tools_marker(notice).done
    await until(lambda: "slow cancelled" in server(), "the server to see the call cancelled")
    assert len(model.bodies) == 1  # the model was not asked again
    await h.say(room, ALICE, "hello")
    assert h.last_reply(room) == "Fake model says: hello"


async def test_an_agent_whose_tools_are_gone_gets_earlier_calls_as_text(
    make_surfaces, model, mcp_tools
) -> None:
    config = tool_config(model, mcp_tools)
    h, room = await tool_room(make_surfaces, config)
    await h.say(room, ALICE, 'call add {"a": 19, "b": 23}')
    # The operator takes the agent's tools away; the conversation keeps what they returned.
    gone = tool_config(model, mcp_tools, agent_tools=())
    h.app.apply_settings(parse_settings(config_with(**gone)))
    await h.say(room, ALICE, "next")
    sent = model.bodies[-1]["messages"]
    assert "tools" not in model.bodies[-1]
    assert all(m["role"] != "tool" and "tool_calls" not in m for m in sent)
    assert any("[tool add(a: 19, b: 23) → 42.0]" in (m["content"] or "") for m in sent)
    assert h.last_reply(room) == "Fake model says: next"


async def restarted(make_surfaces, h, config: dict[str, Any]):
    """A second Surfaces on the same homeserver and database (its own ToolBox, same server)."""
    h2 = await make_surfaces(h.client, settle=False, **config)
    await h2.settle()
    return h2


async def test_the_history_rebuilt_after_a_database_loss_has_the_tool_exchange(
    make_surfaces, model, mcp_tools
) -> None:
    config = tool_config(model, mcp_tools)
    h, room = await tool_room(make_surfaces, config)
    await h.say(room, ALICE, 'call add {"a": 19, "b": 23}')
    chat_id = h.app.rooms.room(room).platform_chat_id
    await h.app.stop()
    await h.app.stores.db.execute("DELETE FROM messages WHERE platform_chat_id=$1", chat_id)

    h2 = await restarted(make_surfaces, h, config)
    await h2.say(room, ALICE, "what did it say?")
    sent = model.bodies[-1]["messages"]
    assert [m["role"] for m in sent[-5:]] == ["user", "assistant", "tool", "assistant", "user"]
    [call] = sent[-4]["tool_calls"]
    assert call["function"]["name"] == "add"
    assert json.loads(call["function"]["arguments"]) == {"a": 19, "b": 23}
    assert sent[-3] == {"role": "tool", "tool_call_id": call["id"], "content": "42.0"}
    assert sent[-2]["content"] == "Using the tools: 42.0"
    stored = await h2.app.stores.messages.history(chat_id)
    assert [m.role for m in stored] == ["user", "tools", "assistant", "user", "assistant"]


async def test_a_tool_run_cut_off_by_a_crash_is_told_not_run_again(
    make_surfaces, model, mcp_tools
) -> None:
    config = tool_config(model, mcp_tools)
    h, room = await tool_room(make_surfaces, config)
    chat_id = h.app.rooms.room(room).platform_chat_id
    await h.app.stop()
    server = ServerLog(mcp_tools)
    # What a crash during a tool call leaves: the message, the tool notice still running.
    asked = h.client.user_message(room, ALICE, 'call slow {"seconds": 0}')
    marker = layout.tools_marker(chat_id, "helper", [], answers=asked.event_id, done=False)
    await h.client.send_message_event(
        room, "m.room.message", {"msgtype": "m.notice", "body": "🔧 `slow`(seconds: 0) …", **marker}
    )
    h2 = await restarted(make_surfaces, h, config)

    [notice] = tool_notices(h2, room)
    assert "interrupted by a restart" in notice["body"] and "`!ai retry`" in notice["body"]
    assert layout.parse_tools_marker(notice).done
    assert server() == [] and model.bodies == []  # nothing re-run silently
    await h2.say(room, ALICE, "!ai retry")
    assert server() == ["slow started"]  # the retry ran it, once
    assert h2.last_reply(room) == "Using the tools: waited 0 s"

    h3 = await restarted(make_surfaces, h2, config)  # a second restart: nothing again
    await h3.say(room, ALICE, "hello")
    assert h3.last_reply(room) == "Fake model says: hello"
    assert server() == ["slow started"]
    assert len([b for b in h3.client.bodies(room) if "interrupted by a restart" in b]) == 1
