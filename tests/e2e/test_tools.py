"""Tool calls on a real Synapse and maubot: the bot process calls a real MCP server on loopback.

The model is the in-process FakeOpenAI (it asks for a tool when the user's message has a line
`call <tool> <json>`, and quotes the results it gets back); the tools are the MCP test server's
(devtools/mcp_server.py, the reference SDK). What the user sees is read from Matrix, what the
model was sent from the fake's request log.
"""

from __future__ import annotations

from typing import Any

import pytest

from devtools.e2e import BotFactory, MakeUser
from devtools.fake_openai import FakeOpenAI
from devtools.matrix_user import is_message
from devtools.mcp_server import McpTestServer
from surfaces_plugin import layout
from tests.e2e.test_context import finished, latest_content, onboard, say

pytestmark = pytest.mark.e2e

QUESTION = 'What is 19 + 23?\ncall add {"a": 19, "b": 23}'


def bot_config(model: FakeOpenAI, mcp: McpTestServer) -> dict[str, Any]:
    return {
        "backends": [
            {
                "id": "fake",
                "type": "openai",
                "base_url": model.base_url,
                "api_key": "sk-test",
                "timeout_s": 15,
                "max_retries": 0,
            }
        ],
        "mcp_servers": [{"id": "calc", "url": mcp.url, "allow": ["add"], "timeout_s": 10}],
        "agents": [
            {
                "id": "helper",
                "name": "Helper",
                "description": "Adds numbers with an MCP tool.",
                "backend": "fake",
                "model": "fake-model",
                "tools": ["calc"],
            }
        ],
        "default_agent": "helper",
        "streaming": {"enabled": True, "edit_interval_ms": 200},
    }


async def test_a_tool_call_shows_in_the_room_and_outlives_the_plugin_database(
    bot_factory: BotFactory, make_user: MakeUser
) -> None:
    with McpTestServer() as mcp:
        async with FakeOpenAI() as model:
            bot = bot_factory(bot_config(model, mcp))
            s = await onboard(bot, make_user)

            answer = await finished(s, await say(s, QUESTION))
            assert answer == "Using the tools: 42.0"  # the MCP server's sum, quoted
            notice = s.alice.find(
                s.room,
                lambda e: is_message(e, bot.user_id, "m.notice") and layout.TOOLS_KEY in e["content"],
            )
            assert notice is not None, "no tool notice in the room"

            def ended() -> dict[str, Any] | None:
                content = latest_content(s.alice, s.room, notice)
                marker = layout.parse_tools_marker(content)
                return content if marker is not None and marker.done else None

            final = await s.alice.wait_until(ended, timeout=10, what="the tool notice's end")
            assert s.alice.edits(s.room, notice), "the notice was never edited"
            assert final["msgtype"] == "m.notice"
            assert final["body"] == "🔧 `add`(a: 19, b: 23) → 42.0"
            [[step]] = final[layout.TOOLS_KEY]["steps"]
            assert (step["name"], step["arguments"], step["result"]) == (
                "add",
                {"a": 19, "b": 23},
                "42.0",
            )
            before = model.bodies[-1]  # the follow-up that carried the tool's result
            assert before["messages"][-1]["role"] == "tool"

            bot.stop()
            dropped = bot.drop_plugin_tables()
            assert {"rooms", "messages", "chats"} <= set(dropped), dropped
            bot.start()

            requests_before = len(model.bodies)
            await finished(s, await say(s, "What did the tool say?"))
            assert len(model.bodies) == requests_before + 1, "old messages were answered again"
            # Rebuilt from the room alone: the call (same id) and its result, then the answer.
            assert model.bodies[-1]["messages"] == [
                *before["messages"],
                {"role": "assistant", "content": answer},
                {"role": "user", "content": "What did the tool say?"},
            ]
