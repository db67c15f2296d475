"""The Responses API backend against a real local server (devtools.fake_responses)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from devtools.fake_responses import REASONING, FakeResponses, Turn, item_text
from surfaces_plugin.backends import (
    BackendError,
    ChatMessage,
    Chunk,
    ErrorKind,
    GenerationRequest,
    ResponsesBackend,
    ToolSpec,
    build_backend,
)
from surfaces_plugin.config import BackendSpec

KEY = "sk-test-SECRET-0123456789abcdef"
SYSTEM = "You are a geography tutor."
HISTORY = [
    ChatMessage("system", SYSTEM),
    ChatMessage("user", "Hi"),
    ChatMessage("assistant", "Hello! Ask me anything."),
    ChatMessage("user", "What is the capital of France?"),
]
LOOKUP = ToolSpec(
    name="lookup",
    description="Looks a city up",
    parameters={"type": "object", "properties": {"city": {"type": "string"}}},
)


def seen(items: list[dict[str, Any]]) -> str:
    """An answer that proves what the model was given: how many items, and the last user text."""
    users = [i for i in items if i.get("role") == "user"]
    return f"I saw {len(items)} items; you said {item_text(users[-1]) if users else 'nothing'}"


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeResponses]:
    async with FakeResponses(answer=seen) as server:
        yield server


def make(
    fake: FakeResponses | str,
    *,
    state: str = "replay",
    key: str = KEY,
    timeout_s: float = 5,
    max_retries: int = 2,
    **kw: Any,
) -> ResponsesBackend:
    spec = BackendSpec(
        id="resp",
        type="openai",
        base_url=fake if isinstance(fake, str) else fake.base_url,
        api_key=key,
        timeout_s=timeout_s,
        max_retries=max_retries,
        api="responses",
        state=state,  # type: ignore[arg-type]
    )
    kw.setdefault("backoff_base_s", 0.01)
    return ResponsesBackend(spec, **kw)


def request(messages: list[ChatMessage], chat_id: str = "", **kw: Any) -> GenerationRequest:
    return GenerationRequest(
        model="gpt-test", messages=messages, temperature=0.3, chat_id=chat_id, **kw
    )


async def collect(backend: ResponsesBackend, req: GenerationRequest) -> list[Chunk]:
    return [chunk async for chunk in backend.stream(req)]


def text_of(chunks: list[Chunk]) -> str:
    return "".join(c.text for c in chunks)


async def failure(backend: ResponsesBackend, req: GenerationRequest) -> BackendError:
    with pytest.raises(BackendError) as caught:
        await collect(backend, req)
    await backend.close()
    error = caught.value
    assert KEY not in str(error) and KEY not in error.user_message("gpt")
    return error


# ---- replay: the whole transcript every turn


async def test_replay_sends_the_transcript_with_instructions_and_no_storage(fake) -> None:
    fake.script(Turn(delay_s=0.005))
    backend = make(fake)
    chunks = await collect(backend, request(HISTORY, max_tokens=300))
    await backend.close()
    assert text_of(chunks) == "I saw 3 items; you said What is the capital of France?"
    assert len([c for c in chunks if c.text]) > 3  # streamed, not in one piece
    [sent] = fake.requests
    assert sent["path"] == "/v1/responses" and sent["authorization"] == f"Bearer {KEY}"
    assert sent["body"] == {
        "model": "gpt-test",
        "instructions": SYSTEM,
        "input": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! Ask me anything."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        "temperature": 0.3,
        "max_output_tokens": 300,
        "stream": True,
        "store": False,
    }
    assert fake.conversations == {}


async def test_replay_create_chat_is_local_and_calls_nothing(fake) -> None:
    backend = make(fake)
    chat_id = await backend.create_chat([ChatMessage("user", "earlier")])
    assert chat_id.startswith("resp-") and fake.requests == []
    assert backend.features.server_state is False and backend.features.tools is True


async def test_usage_is_reported_last(fake) -> None:
    backend = make(fake)
    chunks = await collect(backend, request(HISTORY))
    await backend.close()
    usage = chunks[-1].usage
    assert usage is not None and not chunks[-1].text
    # The fake counts ~4 characters a token over instructions and the items the model saw.
    text = SYSTEM + "Hi" + "Hello! Ask me anything." + "What is the capital of France?"
    assert usage.prompt_tokens is not None and abs(usage.prompt_tokens - len(text) / 4) <= 4
    assert usage.completion_tokens == (len(text_of(chunks)) + 3) // 4


async def test_reasoning_summary_is_not_shown(fake) -> None:
    fake.script(Turn(text="Paris.", reasoning=True))
    backend = make(fake)
    chunks = await collect(backend, request(HISTORY))
    await backend.close()
    assert text_of(chunks) == "Paris."
    assert REASONING.split()[0] not in text_of(chunks)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 2  # type: ignore[operator]


async def test_think_tags_in_output_text_are_hidden(fake) -> None:
    fake.script(Turn(text="<think>ponder ponder</think>\n\nParis it is."))
    backend = make(fake)
    assert await backend.complete(request(HISTORY)) == "Paris it is."
    await backend.close()


async def test_a_server_that_ignores_stream_true_answers_in_json(fake) -> None:
    fake.script(Turn(ignore_stream=True, calls=[("lookup", {"city": "Oslo"})]))
    async with aiohttp.ClientSession() as http:
        backend = ResponsesBackend(make(fake).spec, http)
        chunks = await collect(backend, request(HISTORY, tools=(LOOKUP,)))
        assert text_of(chunks).startswith("I saw 3 items")
        [asked] = [c for c in chunks if c.tool_calls]
        assert asked.tool_calls[0].arguments == {"city": "Oslo"}
        assert chunks[-1].usage is not None
        assert not http.closed  # a shared session is left open


def test_build_backend_picks_the_responses_api() -> None:
    spec = BackendSpec(
        id="r", type="openai", base_url="http://x/v1", api="responses", state="server"
    )
    backend = build_backend(spec)
    assert isinstance(backend, ResponsesBackend) and backend.features.server_state is True
    chat = BackendSpec(id="c", type="openai", base_url="http://x/v1")
    assert not isinstance(build_backend(chat), ResponsesBackend)


# ---- server state: the platform holds the conversation


async def test_server_state_creates_a_conversation_holding_the_seed(fake) -> None:
    backend = make(fake, state="server")
    chat_id = await backend.create_chat(HISTORY[:3])
    await backend.close()
    assert chat_id.startswith("conv_") and chat_id in fake.conversations
    stored = fake.items(chat_id)
    # The system message is left out: it travels as instructions with every request.
    assert [(i["role"], item_text(i)) for i in stored] == [
        ("user", "Hi"),
        ("assistant", "Hello! Ask me anything."),
    ]


async def test_a_long_seed_is_stored_in_batches_the_api_accepts(fake) -> None:
    backend = make(fake, state="server")
    seed = [ChatMessage("user" if i % 2 == 0 else "assistant", f"turn {i}") for i in range(45)]
    chat_id = await backend.create_chat(seed)
    await backend.close()
    assert [item_text(i) for i in fake.items(chat_id)] == [f"turn {i}" for i in range(45)]
    assert all(len(r["body"]["items"]) <= 20 for r in fake.requests)


async def test_server_state_sends_only_the_new_turn_and_the_platform_remembers(fake) -> None:
    backend = make(fake, state="server")
    chat_id = await backend.create_chat()
    first = [ChatMessage("system", SYSTEM), ChatMessage("user", "Hi")]
    answer = await backend.complete(request(first, chat_id))
    assert answer == "I saw 1 items; you said Hi"
    second = [*first, ChatMessage("assistant", answer), ChatMessage("user", "And Spain?")]
    answer = await backend.complete(request(second, chat_id))
    await backend.close()
    # Three items seen: the first turn and its answer came from the platform, not from us.
    assert answer == "I saw 3 items; you said And Spain?"
    body = fake.bodies[-1]
    assert body["input"] == [{"role": "user", "content": "And Spain?"}]
    assert body["conversation"] == chat_id and body["instructions"] == SYSTEM
    assert "store" not in body and "previous_response_id" not in body
    assert [i["role"] for i in fake.items(chat_id)] == ["user", "assistant"] * 2


async def test_a_deleted_conversation_is_chat_gone_and_not_retried(fake) -> None:
    backend = make(fake, state="server")
    chat_id = await backend.create_chat()
    fake.delete_conversation(chat_id)
    error = await failure(backend, request([ChatMessage("user", "Hi")], chat_id))
    await backend.close()
    assert error.kind is ErrorKind.CHAT_GONE and chat_id in error.detail
    assert len(fake.bodies) == 1
    assert "no longer has this conversation" in error.user_message("gpt")


async def test_an_unknown_model_404_is_not_chat_gone(fake) -> None:
    fake.script(
        Turn(status=404, message="The model `gpt-nope` does not exist", code="model_not_found")
    )
    backend = make(fake, state="server")
    chat_id = await backend.create_chat()
    error = await failure(backend, request([ChatMessage("user", "Hi")], chat_id))
    await backend.close()
    assert error.kind is ErrorKind.BAD_REQUEST and error.status == 404


async def test_server_state_without_a_conversation_id_is_chat_gone(fake) -> None:
    backend = make(fake, state="server")
    error = await failure(backend, request([ChatMessage("user", "Hi")]))
    assert error.kind is ErrorKind.CHAT_GONE and fake.requests == []


async def test_create_chat_failures_have_the_usual_kinds(fake) -> None:
    backend = make("http://127.0.0.1:1/v1", state="server", max_retries=0)
    with pytest.raises(BackendError) as caught:
        await backend.create_chat()
    await backend.close()
    assert caught.value.kind is ErrorKind.UNREACHABLE
    async with FakeResponses(require_key="sk-right-one-000000") as guarded:
        backend = make(guarded, state="server")
        with pytest.raises(BackendError) as caught:
            await backend.create_chat()
        await backend.close()
        assert caught.value.kind is ErrorKind.AUTH and KEY not in str(caught.value)
        assert len(guarded.requests) == 1  # a refused key is not retried


# ---- tools


async def test_function_call_round_trip_in_replay(fake) -> None:
    fake.script(Turn(text="Let me look.", calls=[("lookup", {"city": "Paris"})]))
    backend = make(fake)
    messages = [*HISTORY]
    chunks = await collect(backend, request(messages, tools=(LOOKUP,)))
    assert fake.bodies[0]["tools"] == [
        {
            "type": "function",
            "name": "lookup",
            "description": "Looks a city up",
            "parameters": LOOKUP.parameters,
            "strict": False,
        }
    ]
    assert text_of(chunks) == "Let me look."
    [asked] = [c for c in chunks if c.tool_calls]
    [call] = asked.tool_calls
    assert call.name == "lookup" and call.arguments == {"city": "Paris"}
    assert chunks[-1].usage is not None and chunks.index(asked) == len(chunks) - 2
    messages += [
        ChatMessage("assistant", "Let me look.", tool_calls=asked.tool_calls),
        ChatMessage("tool", "Paris: 2.1 million people", tool_call_id=call.id, tool_name="lookup"),
    ]
    answer = await backend.complete(request(messages, tools=(LOOKUP,)))
    await backend.close()
    assert answer.startswith("I saw 6 items")  # the fake rejects outputs with no matching call
    assert fake.bodies[1]["input"][-3:] == [
        {"role": "assistant", "content": "Let me look."},
        {
            "type": "function_call",
            "call_id": call.id,
            "name": "lookup",
            "arguments": json.dumps({"city": "Paris"}),
        },
        {"type": "function_call_output", "call_id": call.id, "output": "Paris: 2.1 million people"},
    ]


async def test_function_call_round_trip_in_server_state_sends_only_the_outputs(fake) -> None:
    fake.script(Turn(text="", calls=[("lookup", {"city": "Paris"}), ("lookup", {"city": "Rome"})]))
    backend = make(fake, state="server")
    chat_id = await backend.create_chat()
    messages = [ChatMessage("system", SYSTEM), ChatMessage("user", "Compare Paris and Rome")]
    chunks = await collect(backend, request(messages, chat_id, tools=(LOOKUP,)))
    assert text_of(chunks) == ""
    [asked] = [c for c in chunks if c.tool_calls]
    assert [c.arguments["city"] for c in asked.tool_calls] == ["Paris", "Rome"]
    messages.append(ChatMessage("assistant", "", tool_calls=asked.tool_calls))
    for call, result in zip(asked.tool_calls, ["2.1 M", "2.8 M"], strict=True):
        messages.append(ChatMessage("tool", result, tool_call_id=call.id, tool_name=call.name))
    messages[-1] = ChatMessage(
        "tool", "timed out", tool_call_id=asked.tool_calls[1].id, tool_name="lookup", is_error=True
    )
    answer = await backend.complete(request(messages, chat_id, tools=(LOOKUP,)))
    await backend.close()
    assert fake.bodies[1]["input"] == [
        {"type": "function_call_output", "call_id": asked.tool_calls[0].id, "output": "2.1 M"},
        {
            "type": "function_call_output",
            "call_id": asked.tool_calls[1].id,
            "output": "Error: timed out",
        },
    ]
    # user, two calls, two outputs: the platform kept the calls it produced.
    assert answer.startswith("I saw 5 items")
    kinds = [i["type"] for i in fake.items(chat_id)]
    assert kinds == ["message", "function_call", "function_call", "function_call_output",
                     "function_call_output", "message"]  # fmt: skip


async def test_a_function_call_with_arguments_that_are_not_json_is_malformed(fake) -> None:
    fake.script(Turn(text="", calls=[("lookup", '{"city": "Par')]))  # a model cut short
    error = await failure(make(fake), request(HISTORY, tools=(LOOKUP,)))
    assert error.kind is ErrorKind.MALFORMED and "lookup" in error.detail


# ---- errors and retries


async def test_bad_key_is_auth_and_the_key_never_leaks() -> None:
    async with FakeResponses(require_key="sk-the-right-key-123456") as guarded:
        error = await failure(make(guarded), request(HISTORY))
        assert error.kind is ErrorKind.AUTH and error.status == 401
        assert len(guarded.requests) == 1


async def test_rate_limit_retry_after_is_honoured_then_the_answer_comes_once(fake) -> None:
    fake.script(Turn(status=429, message="Rate limit reached", retry_after="1"))
    backend = make(fake)
    loop = asyncio.get_running_loop()
    started = loop.time()
    chunks = await collect(backend, request(HISTORY))
    await backend.close()
    assert loop.time() - started >= 0.9
    assert text_of(chunks).startswith("I saw 3 items") and len(fake.bodies) == 2


async def test_rate_limited_beyond_the_retries_reports_the_wait(fake) -> None:
    fake.script(*[Turn(status=429, message="Rate limit reached", retry_after="0")] * 3)
    error = await failure(make(fake, max_retries=2), request(HISTORY))
    assert error.kind is ErrorKind.RATE_LIMITED and len(fake.bodies) == 3


async def test_server_error_is_retried_then_reported(fake) -> None:
    fake.script(*[Turn(status=500, message="boom")] * 3)
    error = await failure(make(fake, max_retries=2), request(HISTORY))
    assert error.kind is ErrorKind.SERVER and error.status == 500 and "boom" in error.detail
    assert len(fake.bodies) == 3


async def test_a_failed_response_before_any_text_is_retried(fake) -> None:
    fake.script(Turn(text="", fail="failed", message="The server had an error"))
    backend = make(fake)
    answer = await backend.complete(request(HISTORY))
    await backend.close()
    assert answer.startswith("I saw 3 items") and len(fake.bodies) == 2


async def test_a_failed_response_is_reported_with_its_message(fake) -> None:
    fake.script(Turn(fail="failed", code="rate_limit_exceeded", message="Too many tokens"))
    error = await failure(make(fake, max_retries=0), request(HISTORY))
    assert error.kind is ErrorKind.RATE_LIMITED and error.detail == "Too many tokens"


async def test_an_error_event_is_reported(fake) -> None:
    fake.script(Turn(fail="error"))
    error = await failure(make(fake, max_retries=0), request(HISTORY))
    assert error.kind is ErrorKind.SERVER and "overloaded" in error.detail


async def test_an_error_after_text_is_not_retried(fake) -> None:
    fake.script(Turn(text="one two three four five", fail="cut"))
    shown: list[str] = []
    backend = make(fake)
    with pytest.raises(BackendError) as caught:
        async for chunk in backend.stream(request(HISTORY)):
            shown.append(chunk.text)
    await backend.close()
    assert "".join(shown) == "one two " and len(fake.bodies) == 1
    assert caught.value.kind is ErrorKind.SERVER


async def test_a_stream_without_a_terminal_event_is_malformed(fake) -> None:
    fake.script(Turn(text="one two three four", fail="truncate"))
    error = await failure(make(fake), request(HISTORY))
    assert error.kind is ErrorKind.MALFORMED and len(fake.bodies) == 1


async def test_an_incomplete_response_keeps_what_was_said(fake) -> None:
    fake.script(Turn(text="A long answer cut", fail="incomplete"))
    backend = make(fake)
    chunks = await collect(backend, request(HISTORY, max_tokens=5))
    await backend.close()
    assert text_of(chunks) == "A long answer cut" and chunks[-1].usage is not None


async def test_no_answer_times_out(fake) -> None:
    fake.script(Turn(fail="hang"))
    error = await failure(make(fake, timeout_s=1, max_retries=0), request(HISTORY))
    assert error.kind is ErrorKind.TIMEOUT and "1 s" in error.user_message("gpt")


async def test_unreachable_server() -> None:
    error = await failure(make("http://127.0.0.1:1/v1", max_retries=0), request(HISTORY))
    assert error.kind is ErrorKind.UNREACHABLE


# ---- cancellation


async def test_cancelling_mid_answer_closes_the_connection(fake) -> None:
    fake.script(Turn(text="one two three four five", fail="hang_mid"))
    backend = make(fake, timeout_s=30)
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in backend.stream(request(HISTORY)):
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 5)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await asyncio.wait_for(fake.disconnected.wait(), 2)  # the server saw the hang-up
    await backend.close()


async def test_cancelling_create_chat_closes_the_connection() -> None:
    async with FakeResponses() as slow:
        slow.conversation_gate = asyncio.Event()
        backend = make(slow, state="server", timeout_s=30)
        task = asyncio.create_task(backend.create_chat())
        await asyncio.wait_for(slow.received.wait(), 5)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await asyncio.wait_for(slow.disconnected.wait(), 2)
        await backend.close()
