"""One tool exchange through every API style: chat completions, Anthropic Messages, and the
Responses API with the conversation replayed or held by the platform.

The user asks, the model asks for `add`, the plugin runs it on the real MCP test server, the
model answers with what it received; then the next turn. Each provider is its real local
server; what it received is read back from its own request log and put in one neutral shape
(`("user", text)`, `("assistant", text)`, `("call", id, name, arguments)`, `("result", id,
text)`), so one scenario checks all four.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio

from devtools import fake_anthropic, fake_responses
from devtools.fake_anthropic import FakeAnthropic
from devtools.fake_openai import FakeOpenAI
from devtools.fake_responses import FakeResponses
from surfaces_plugin import layout

ALICE = "@alice:localhost"
QUESTION = 'What is 19 + 23?\ncall add {"a": 19, "b": 23}'  # the line the chat fake acts on
FOLLOW_UP = "And what did the tool say?"
ARGUMENTS = {"a": 19, "b": 23}
SUM = "42.0"  # what the MCP server's `add` returns for them

Entry = tuple[Any, ...]


def _text(content: Any) -> str:
    """Text of a string or a list of text parts / blocks."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content or [])


def chat_entries(body: dict[str, Any]) -> list[Entry]:
    out: list[Entry] = []
    for m in body["messages"]:
        if m["role"] == "tool":
            out.append(("result", m["tool_call_id"], m["content"]))
            continue
        if m["role"] != "system" and m.get("content"):
            out.append((m["role"], m["content"]))
        for call in m.get("tool_calls") or []:
            f = call["function"]
            out.append(("call", call["id"], f["name"], json.loads(f["arguments"])))
    return out


def anthropic_entries(body: dict[str, Any]) -> list[Entry]:
    out: list[Entry] = []
    for m in body["messages"]:
        blocks = m["content"] if isinstance(m["content"], list) else [_text_block(m["content"])]
        for b in blocks:
            if b["type"] == "text":
                out.append((m["role"], b["text"]))
            elif b["type"] == "tool_use":
                out.append(("call", b["id"], b["name"], b["input"]))
            elif b["type"] == "tool_result":
                out.append(("result", b["tool_use_id"], _text(b.get("content", ""))))
    return out


def _text_block(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def responses_entries(items: list[dict[str, Any]]) -> list[Entry]:
    """Input items as sent, or items as the platform stores them (typed, content as parts)."""
    out: list[Entry] = []
    for item in items:
        kind = item.get("type", "message")
        if kind == "function_call":
            arguments = json.loads(item["arguments"])
            out.append(("call", item["call_id"], item["name"], arguments))
        elif kind == "function_call_output":
            out.append(("result", item["call_id"], item["output"]))
        elif kind == "message":
            out.append((item["role"], _text(item["content"])))
    return out


def answer_from_results(results: list[str]) -> str:
    """What every fake model says once tool results came back: it quotes them."""
    return "Using the tools: " + "; ".join(results)


def claude_reply(messages: list[dict[str, Any]]) -> str:
    last = messages[-1]["content"]
    results = [_text(b.get("content", "")) for b in last if b.get("type") == "tool_result"]
    if isinstance(last, list) and results:
        return answer_from_results(results)
    return fake_anthropic.default_reply(messages)


def responses_answer(items: list[dict[str, Any]]) -> str:
    if items and items[-1]["type"] == "function_call_output":
        trailing = [i["output"] for i in items if i["type"] == "function_call_output"]
        return answer_from_results(trailing[-1:])
    return fake_responses.default_answer(items)


@dataclass
class Provider:
    """One API style: its backend config, how to make its model ask for `add`, what it got."""

    style: str
    backend: dict[str, Any]
    # The model's next answer: `text` (none by default), then a call of add(19, 23).
    ask_for_add: Callable[[str], None]
    requests: Callable[[], list[dict[str, Any]]]  # the generation requests, oldest first
    entries: Callable[[dict[str, Any]], list[Entry]]
    offered: Callable[[dict[str, Any]], list[str]]  # tool names a request offers
    held: Callable[[str], list[Entry]] | None = None  # what the platform holds for a chat id


@pytest_asyncio.fixture(
    params=["chat", "anthropic", "responses-replay", "responses-server"]
)
async def provider(request: pytest.FixtureRequest) -> AsyncIterator[Provider]:
    style = request.param
    if style == "chat":
        async with FakeOpenAI() as chat:
            yield Provider(
                style,
                {"type": "openai", "base_url": chat.base_url},
                lambda text: None,  # the `call` line of the question is enough (never text)
                lambda: chat.bodies,
                chat_entries,
                lambda body: [t["function"]["name"] for t in body["tools"]],
            )
    elif style == "anthropic":
        async with FakeAnthropic(reply_fn=claude_reply) as claude:
            yield Provider(
                style,
                {"type": "anthropic", "base_url": claude.base_url, "api_key": "sk-ant-test"},
                lambda text: claude.script(
                    fake_anthropic.Turn(text=text, tool_uses=[("add", ARGUMENTS)])
                ),
                lambda: claude.bodies,
                anthropic_entries,
                lambda body: [t["name"] for t in body["tools"]],
            )
    else:
        state = style.removeprefix("responses-")
        async with FakeResponses(answer=responses_answer) as platform:
            yield Provider(
                style,
                {
                    "type": "openai",
                    "api": "responses",
                    "state": state,
                    "base_url": platform.base_url,
                    "api_key": "sk-test",
                },
                lambda text: platform.script(
                    fake_responses.Turn(text=text, calls=[("add", ARGUMENTS)])
                ),
                lambda: platform.bodies,
                lambda body: responses_entries(body["input"]),
                lambda body: [t["name"] for t in body["tools"]],
                (lambda chat_id: responses_entries(platform.items(chat_id)))
                if state == "server"
                else None,
            )


def answers(h: Any, room: str) -> list[str]:
    """The agent's answers in the room as the user now sees them (edits applied), in order."""
    shown: dict[str, str] = {}
    for event in h.client.messages(room):
        content = event["content"]
        relates = content.get("m.relates_to") or {}
        if relates.get("rel_type") == "m.replace" and relates["event_id"] in shown:
            shown[relates["event_id"]] = content["m.new_content"]["body"]
        elif layout.TURN_KEY in content:
            shown[event["event_id"]] = content["body"]
    return list(shown.values())


async def working_room(make_surfaces, mcp_tools, provider: Provider) -> tuple[Any, str, str]:
    h = await make_surfaces(
        streaming={"edit_interval_ms": 0},
        backends=[{"id": "llm", "max_retries": 0, **provider.backend}],
        mcp_servers=[{"id": "calc", "url": mcp_tools.url, "allow": ["add"]}],
        agents=[
            {"id": "helper", "name": "Helper", "backend": "llm", "model": "m1", "tools": ["calc"]}
        ],
        default_agent="helper",
    )
    await h.say(h.dm(ALICE), ALICE, "!ai start")
    [working] = h.app.rooms.all_rooms()
    return h, working.room_id, working.platform_chat_id


async def test_a_tool_exchange_reaches_the_provider_in_its_own_api_style(
    make_surfaces, mcp_tools, provider: Provider
) -> None:
    h, room, chat_id = await working_room(make_surfaces, mcp_tools, provider)
    provider.ask_for_add("")
    await h.say(room, ALICE, QUESTION)
    answer = answer_from_results([SUM])
    assert h.last_reply(room) == answer  # the model quoted what the MCP server computed
    asked, followed_up = provider.requests()
    assert provider.offered(asked) == ["add"]
    # The follow-up pairs the model's call with its result under the provider's call id.
    call_id = next(e[1] for e in provider.entries(followed_up) if e[0] == "result")
    call = ("call", call_id, "add", ARGUMENTS)
    result = ("result", call_id, SUM)
    exchange = [("user", QUESTION), call, result]
    if provider.held is None:  # the transcript is sent every time
        assert provider.entries(followed_up) == exchange
    else:  # the platform holds the conversation: only the tool output is new
        assert provider.entries(followed_up) == [result]

    await h.say(room, ALICE, FOLLOW_UP)
    assert len(provider.requests()) == 3
    latest = provider.entries(provider.requests()[-1])
    if provider.held is None:
        assert latest == [*exchange, ("assistant", answer), ("user", FOLLOW_UP)]
    else:
        assert latest == [("user", FOLLOW_UP)]
        second = ("assistant", h.last_reply(room))
        held = provider.held(chat_id)
        assert held == [*exchange, ("assistant", answer), ("user", FOLLOW_UP), second]


@pytest.mark.parametrize(
    "provider", ["anthropic", "responses-replay", "responses-server"], indirect=True
)
async def test_what_the_model_says_before_a_call_stays_apart_from_its_answer(
    make_surfaces, mcp_tools, provider: Provider
) -> None:
    h, room, chat_id = await working_room(make_surfaces, mcp_tools, provider)
    provider.ask_for_add("Let me add them.")
    await h.say(room, ALICE, QUESTION)
    assert answers(h, room) == ["Let me add them.\n\nUsing the tools: 42.0"]
    _, followed_up = provider.requests()
    call_id = next(e[1] for e in provider.entries(followed_up) if e[0] == "result")
    # The words before the call went back with the call, as the model said them.
    said = [("user", QUESTION), ("assistant", "Let me add them."), ("call", call_id, "add", ARGUMENTS)]
    if provider.held is None:
        assert provider.entries(followed_up)[:3] == said
    else:
        assert provider.held(chat_id)[:3] == said
