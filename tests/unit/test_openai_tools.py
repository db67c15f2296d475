"""Chat-completions tool calls against a real local server (devtools.fake_openai)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
import pytest_asyncio

from devtools.fake_openai import FakeOpenAI
from surfaces_plugin.backends import (
    BackendError,
    ChatMessage,
    Chunk,
    ErrorKind,
    GenerationRequest,
    OpenAIBackend,
    ToolCall,
    ToolSpec,
)
from surfaces_plugin.config import BackendSpec

CLOCK = ToolSpec(
    "now",
    "The current time",
    {"type": "object", "properties": {"tz": {"type": "string"}}, "required": []},
)
ASK = GenerationRequest(
    model="gpt-test",
    messages=[
        ChatMessage("system", "You can tell the time."),
        ChatMessage("user", 'What time is it?\ncall now {"tz": "Europe/Paris"}'),
    ],
    tools=(CLOCK,),
)


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as server:
        yield server


def make(fake: FakeOpenAI) -> OpenAIBackend:
    spec = BackendSpec(id="oa", type="openai", base_url=fake.base_url, api_key="sk-x-123456789")
    return OpenAIBackend(spec, backoff_base_s=0.01)


async def collect(backend: OpenAIBackend, request: GenerationRequest) -> list[Chunk]:
    try:
        return [chunk async for chunk in backend.stream(request)]
    finally:
        await backend.close()


async def test_the_tools_are_offered_as_functions(fake: FakeOpenAI) -> None:
    await collect(make(fake), ASK)
    assert fake.bodies[0]["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "now",
                "description": "The current time",
                "parameters": CLOCK.parameters,
            },
        }
    ]


async def test_a_streamed_call_comes_back_whole_with_its_arguments(fake: FakeOpenAI) -> None:
    chunks = await collect(make(fake), ASK)
    calls = [c for chunk in chunks for c in chunk.tool_calls]
    assert [(c.name, c.arguments) for c in calls] == [("now", {"tz": "Europe/Paris"})]
    assert calls[0].id.startswith("call_")
    assert not "".join(chunk.text for chunk in chunks)  # no words before the call
    assert chunks[-1].usage is not None  # usage still comes last


async def test_the_results_go_back_paired_with_the_call_and_the_model_answers(
    fake: FakeOpenAI,
) -> None:
    call = ToolCall("call_abc", "now", {"tz": "Europe/Paris"})
    follow_up = replace(
        ASK,
        messages=[
            *ASK.messages,
            ChatMessage("assistant", "", tool_calls=(call,)),
            ChatMessage("tool", "15:04 CET", tool_call_id="call_abc", tool_name="now"),
        ],
    )
    chunks = await collect(make(fake), follow_up)
    assert "".join(c.text for c in chunks) == "Using the tools: 15:04 CET"
    sent = fake.bodies[0]["messages"][-2:]
    assert sent == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_abc",
                    "type": "function",
                    "function": {"name": "now", "arguments": '{"tz": "Europe/Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_abc", "content": "15:04 CET"},
    ]


async def test_a_result_that_answers_no_call_is_refused_by_the_server(fake: FakeOpenAI) -> None:
    orphan = replace(
        ASK, messages=[*ASK.messages, ChatMessage("tool", "x", tool_call_id="call_nobody")]
    )
    with pytest.raises(BackendError) as raised:
        await collect(make(fake), orphan)
    assert raised.value.kind is ErrorKind.BAD_REQUEST
    assert "tool_calls" in raised.value.detail


async def test_a_non_streamed_answer_with_calls_is_read_too(fake: FakeOpenAI) -> None:
    fake.set_mode("json")
    chunks = await collect(make(fake), ASK)
    assert [(c.name, c.arguments) for ch in chunks for c in ch.tool_calls] == [
        ("now", {"tz": "Europe/Paris"})
    ]


async def test_without_tools_offered_the_model_just_answers(fake: FakeOpenAI) -> None:
    chunks = await collect(make(fake), replace(ASK, tools=()))
    assert not any(chunk.tool_calls for chunk in chunks)
    assert "tools" not in fake.bodies[0]
    assert "".join(c.text for c in chunks).startswith("Fake model says:")


async def test_a_failed_call_is_marked_as_an_error_for_the_model(fake: FakeOpenAI) -> None:
    call = ToolCall("call_x", "now", {})
    failed = replace(
        ASK,
        messages=[
            *ASK.messages,
            ChatMessage("assistant", "", tool_calls=(call,)),
            ChatMessage("tool", "clock unavailable", tool_call_id="call_x", is_error=True),
        ],
    )
    await collect(make(fake), failed)
    assert fake.bodies[0]["messages"][-1]["content"] == "Error: clock unavailable"
