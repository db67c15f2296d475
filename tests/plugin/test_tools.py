"""Tool calls in a working room: the loop, what the room shows, the history, cancel, the bound.

The model is the real local OpenAI-compatible server (devtools.fake_openai, which calls tools
like a model); the tools come from a small in-test tool source with the ToolBox's interface.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest_asyncio

from devtools.fake_openai import FakeOpenAI
from surfaces_plugin import layout
from surfaces_plugin.backends import ToolCall, ToolSpec
from surfaces_plugin.config import AgentSpec

ALICE = "@alice:localhost"
NO_ARGS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class Result:
    text: str
    is_error: bool = False


class Tools:
    """`now` answers, `fail` fails, `slow` waits until released (or cancelled)."""

    def __init__(self) -> None:
        self.calls: list[ToolCall] = []
        self.release = asyncio.Event()
        self.slow_started = asyncio.Event()

    async def tools_for(self, agent: AgentSpec) -> list[ToolSpec]:
        return [ToolSpec(name, f"the {name} tool", NO_ARGS) for name in ("now", "fail", "slow")]

    async def call(self, agent: AgentSpec, call: ToolCall) -> Result:
        self.calls.append(call)
        if call.name == "fail":
            return Result("the tool broke", is_error=True)
        if call.name == "slow":
            self.slow_started.set()
            await self.release.wait()
        return Result(f"15:04 UTC in {call.arguments.get('tz', 'UTC')}")


@pytest_asyncio.fixture
async def model() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as server:
        yield server


async def tool_room(make_surfaces, model: FakeOpenAI, **tools):
    h = await make_surfaces(
        streaming={"edit_interval_ms": 0},
        backends=[{"id": "oa", "type": "openai", "base_url": model.base_url}],
        mcp_servers=[{"id": "clock", "url": "http://127.0.0.1:9/mcp", "allow": ["now"]}],
        agents=[{"id": "helper", "name": "Helper", "backend": "oa", "tools": ["clock"]}],
        default_agent="helper",
        tools=tools or {"max_steps": 6},
    )
    source = Tools()
    h.app.dispatcher.tools = source
    dm = h.dm(ALICE)
    await h.say(dm, ALICE, "!ai start")
    [room] = h.app.rooms.all_rooms()
    return h, room.room_id, source


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


async def test_the_model_calls_a_tool_and_answers_with_its_result(make_surfaces, model) -> None:
    h, room, tools = await tool_room(make_surfaces, model)
    await h.say(room, ALICE, 'What time is it in Paris?\ncall now {"tz": "Europe/Paris"}')

    assert h.last_reply(room) == "Using the tools: 15:04 UTC in Europe/Paris"
    assert [(c.name, c.arguments) for c in tools.calls] == [("now", {"tz": "Europe/Paris"})]
    [notice] = tool_notices(h, room)
    assert notice["msgtype"] == "m.notice"  # a notice: no notification for each call
    assert notice["body"] == '🔧 `now`(tz: "Europe/Paris") → 15:04 UTC in Europe/Paris'
    marker = layout.parse_tools_marker(notice)
    assert marker is not None and marker.done
    # The follow-up request paired the result with the call.
    follow_up = model.bodies[-1]["messages"]
    assert follow_up[-1]["role"] == "tool" and follow_up[-1]["content"].startswith("15:04")
    assert follow_up[-2]["tool_calls"][0]["function"]["name"] == "now"


async def test_the_next_turn_still_carries_the_tool_exchange(make_surfaces, model) -> None:
    h, room, _ = await tool_room(make_surfaces, model)
    await h.say(room, ALICE, "call now {}")
    await h.say(room, ALICE, "and what did the tool say?")
    sent = model.bodies[-1]["messages"]
    roles = [m["role"] for m in sent]
    assert roles[-5:] == ["user", "assistant", "tool", "assistant", "user"]
    assert sent[-3]["content"] == "15:04 UTC in UTC"
    assert sent[-2]["content"] == "Using the tools: 15:04 UTC in UTC"


async def test_a_failing_tool_is_reported_to_the_model_not_a_crash(make_surfaces, model) -> None:
    h, room, _ = await tool_room(make_surfaces, model)
    await h.say(room, ALICE, "call fail {}")
    assert h.last_reply(room) == "Using the tools: the tool broke"
    assert model.bodies[-1]["messages"][-1]["content"] == "the tool broke"
    [notice] = tool_notices(h, room)
    assert "⚠️ the tool broke" in notice["body"]


async def test_a_turn_stops_after_the_step_bound_and_says_so(make_surfaces, model) -> None:
    h, room, tools = await tool_room(make_surfaces, model, max_steps=2)
    await h.say(room, ALICE, "loop now {}")
    assert len(tools.calls) == 2
    assert len(model.bodies) == 3  # two rounds of calls, then the model is not obeyed again
    assert "stopped: the agent wanted more than 2 rounds of tool calls" in h.last_reply(room)
    [notice] = tool_notices(h, room)
    assert notice["body"].count("🔧") == 2 and "stopped" in notice["body"]
    await h.say(room, ALICE, "still there?")  # the room goes on
    assert h.last_reply(room) == "Fake model says: still there?"


async def test_cancel_during_a_call_ends_the_turn_and_the_room_goes_on(
    make_surfaces, model
) -> None:
    h, room, tools = await tool_room(make_surfaces, model)
    await h.app.on_message(h.client.user_message(room, ALICE, "call slow {}"))
    await asyncio.wait_for(tools.slow_started.wait(), 10)
    await h.say(room, ALICE, "!ai cancel")
    [notice] = tool_notices(h, room)
    assert notice["body"].endswith("*cancelled*")
    assert layout.parse_tools_marker(notice).done
    assert len(model.bodies) == 1  # the model was not asked again
    await h.say(room, ALICE, "hello")
    assert h.last_reply(room) == "Fake model says: hello"


async def test_an_agent_whose_tools_are_gone_gets_earlier_calls_as_text(
    make_surfaces, model
) -> None:
    h, room, _ = await tool_room(make_surfaces, model)
    await h.say(room, ALICE, "call now {}")
    h.app.dispatcher.tools = None  # e.g. the MCP server left the config
    await h.say(room, ALICE, "next")
    sent = model.bodies[-1]["messages"]
    assert "tools" not in model.bodies[-1]
    assert all(m["role"] != "tool" and "tool_calls" not in m for m in sent)
    assert any("[tool now() → 15:04 UTC in UTC]" in (m["content"] or "") for m in sent)


TOOL_CONFIG = dict(
    streaming={"edit_interval_ms": 0},
    mcp_servers=[{"id": "clock", "url": "http://127.0.0.1:9/mcp", "allow": ["now"]}],
    default_agent="helper",
)


async def restarted(make_surfaces, h, model: FakeOpenAI):
    """A second Surfaces on the same homeserver and database, with the same tool source."""
    h2 = await make_surfaces(
        h.client,
        settle=False,
        backends=[{"id": "oa", "type": "openai", "base_url": model.base_url}],
        agents=[{"id": "helper", "name": "Helper", "backend": "oa", "tools": ["clock"]}],
        **TOOL_CONFIG,
    )
    source = Tools()
    h2.app.dispatcher.tools = source
    await h2.settle()
    return h2, source


async def test_the_history_rebuilt_after_a_database_loss_has_the_tool_exchange(
    make_surfaces, model
) -> None:
    h, room, _ = await tool_room(make_surfaces, model)
    await h.say(room, ALICE, "call now {}")
    chat_id = h.app.rooms.room(room).platform_chat_id
    await h.app.stop()
    await h.app.stores.db.execute("DELETE FROM messages WHERE platform_chat_id=$1", chat_id)

    h2, _ = await restarted(make_surfaces, h, model)
    await h2.say(room, ALICE, "what did it say?")
    sent = model.bodies[-1]["messages"]
    assert [m["role"] for m in sent[-5:]] == ["user", "assistant", "tool", "assistant", "user"]
    assert sent[-4]["tool_calls"][0]["function"]["name"] == "now"
    assert sent[-3]["content"] == "15:04 UTC in UTC"
    stored = await h2.app.stores.messages.history(chat_id)
    assert [m.role for m in stored] == ["user", "tools", "assistant", "user", "assistant"]


async def test_a_tool_run_cut_off_by_a_crash_is_told_not_run_again(make_surfaces, model) -> None:
    h, room, _ = await tool_room(make_surfaces, model)
    chat_id = h.app.rooms.room(room).platform_chat_id
    await h.app.stop()
    # What a crash during a tool call leaves: the message, the tool notice still running.
    asked = h.client.user_message(room, ALICE, "call now {}")
    marker = layout.tools_marker(chat_id, "helper", [], answers=asked.event_id, done=False)
    await h.client.send_message_event(
        room, "m.room.message", {"msgtype": "m.notice", "body": "🔧 `now`() …", **marker}
    )
    h2, tools = await restarted(make_surfaces, h, model)

    [notice] = tool_notices(h2, room)
    assert "interrupted by a restart" in notice["body"] and "`!ai retry`" in notice["body"]
    assert layout.parse_tools_marker(notice).done
    assert tools.calls == [] and model.bodies == []  # nothing re-run silently
    await h2.say(room, ALICE, "!ai retry")
    assert [c.name for c in tools.calls] == ["now"]
    assert h2.last_reply(room) == "Using the tools: 15:04 UTC in UTC"

    h3, tools3 = await restarted(make_surfaces, h2, model)  # a second restart: nothing again
    await h3.say(room, ALICE, "hello")
    assert h3.last_reply(room) == "Fake model says: hello"
    assert tools3.calls == []
    assert len([b for b in h3.client.bodies(room) if "interrupted by a restart" in b]) == 1
