"""The Anthropic backend against a real local Messages API server (devtools.fake_anthropic)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from devtools.fake_anthropic import THINKING, FakeAnthropic, Turn
from surfaces_plugin.backends import (
    AnthropicBackend,
    BackendError,
    ChatMessage,
    Chunk,
    ErrorKind,
    Features,
    GenerationRequest,
    ToolCall,
    ToolSpec,
    Usage,
    build_backend,
)
from surfaces_plugin.backends.anthropic import EARLIER_LEFT_OUT
from surfaces_plugin.config import BackendSpec

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-ant-api03-SECRET_0123456789abcdef-XYZ"
REPLY = "Paris is the capital of France, and it has been for a very long time."
REQUEST = GenerationRequest(
    model="claude-test",
    messages=[
        ChatMessage("system", "You are a geography tutor."),
        ChatMessage("system", "Answer in one sentence."),
        ChatMessage("user", "Hi"),
        ChatMessage("assistant", "Hello! Ask me anything."),
        ChatMessage("user", "A question:"),
        ChatMessage("user", "What is the capital of France?"),
    ],
    temperature=0.3,
)
SYSTEM = "You are a geography tutor.\n\nAnswer in one sentence."
WEATHER = ToolSpec(
    "get_weather",
    "The weather in a city today",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeAnthropic]:
    async with FakeAnthropic(reply_fn=lambda messages: REPLY) as server:
        yield server


def make(
    fake: FakeAnthropic | str,
    *,
    key: str = KEY,
    timeout_s: float = 5,
    max_retries: int = 2,
    **kw: Any,
) -> AnthropicBackend:
    base_url = fake if isinstance(fake, str) else fake.base_url
    spec = BackendSpec(
        id="claude",
        type="anthropic",
        base_url=base_url,
        api_key=key,
        timeout_s=timeout_s,
        max_retries=max_retries,
    )
    kw.setdefault("backoff_base_s", 0.01)
    return AnthropicBackend(spec, **kw)


async def collect(backend: AnthropicBackend, request: GenerationRequest = REQUEST) -> list[Chunk]:
    try:
        return [chunk async for chunk in backend.stream(request)]
    finally:
        await backend.close()


async def failure(
    backend: AnthropicBackend, shown: list[str] | None = None, request: GenerationRequest = REQUEST
) -> BackendError:
    """Run a request that must fail; `shown` receives the text yielded before the failure."""
    shown = [] if shown is None else shown
    with pytest.raises(BackendError) as caught:
        async for chunk in backend.stream(request):
            shown.append(chunk.text)
    await backend.close()
    error = caught.value
    assert KEY not in str(error) and KEY not in error.user_message("claude")
    return error


def text_of(chunks: list[Chunk]) -> str:
    return "".join(c.text for c in chunks)


def tokens(text: str) -> int:
    """What the fake reports for `text` (its stand-in tokenizer)."""
    return (len(text) + 3) // 4


# ---- a normal answer


async def test_streams_the_answer_in_pieces_then_usage(fake: FakeAnthropic) -> None:
    fake.set_mode("normal", delay_s=0.01)
    chunks = await collect(make(fake))
    assert text_of(chunks) == REPLY
    assert len([c for c in chunks if c.text]) > 3
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == tokens(REPLY)
    assert usage.prompt_tokens and usage.prompt_tokens > 10


async def test_cached_prompt_tokens_count_as_prompt(fake: FakeAnthropic) -> None:
    plain = (await collect(make(fake)))[-1].usage
    fake.set_mode("normal", cache_read=1000)
    cached = (await collect(make(fake)))[-1].usage
    assert plain is not None and cached is not None and plain.prompt_tokens is not None
    assert cached == Usage(plain.prompt_tokens + 1000, plain.completion_tokens)


async def test_sends_headers_system_on_top_and_alternating_turns(fake: FakeAnthropic) -> None:
    await collect(make(fake))
    [headers] = fake.headers
    assert headers["x-api-key"] == KEY and headers["anthropic-version"] == "2023-06-01"
    assert headers["Content-Type"] == "application/json" and "Authorization" not in headers
    assert fake.requests[0]["path"] == "/v1/messages"
    assert fake.bodies[0] == {
        "model": "claude-test",
        "max_tokens": 4096,
        "system": SYSTEM,
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Hello! Ask me anything."}]},
            {
                "role": "user",  # two user messages in a row become one
                "content": [
                    {"type": "text", "text": "A question:"},
                    {"type": "text", "text": "What is the capital of France?"},
                ],
            },
        ],
        "temperature": 0.3,
        "stream": True,
    }


async def test_the_agents_max_tokens_is_sent(fake: FakeAnthropic) -> None:
    request = GenerationRequest("claude-test", [ChatMessage("user", "hi")], max_tokens=256)
    await collect(make(fake), request)
    assert fake.bodies[0]["max_tokens"] == 256 and "system" not in fake.bodies[0]


async def test_no_key_sends_no_x_api_key(fake: FakeAnthropic) -> None:
    await collect(make(fake, key=""))
    assert "x-api-key" not in fake.headers[0]


async def test_a_window_starting_at_an_answer_still_starts_with_the_user(
    fake: FakeAnthropic,
) -> None:
    request = GenerationRequest(
        "claude-test",
        [
            ChatMessage("system", "Be brief."),
            ChatMessage("assistant", "…and that is why."),
            ChatMessage("assistant", ""),  # an empty answer: the API rejects empty text
            ChatMessage("user", "Thanks. And Spain?"),
        ],
    )
    assert text_of(await collect(make(fake), request)) == REPLY  # the fake accepted it
    first, *_ = fake.bodies[0]["messages"]
    assert first == {"role": "user", "content": [{"type": "text", "text": EARLIER_LEFT_OUT}]}


async def test_complete_joins_the_stream_and_features(fake: FakeAnthropic) -> None:
    async with aiohttp.ClientSession() as http:
        backend = build_backend(
            BackendSpec(id="claude", type="anthropic", base_url=fake.base_url), http
        )
        assert isinstance(backend, AnthropicBackend)
        assert backend.features == Features(streaming=True, tools=True, server_state=False)
        assert await backend.complete(REQUEST) == REPLY
        await backend.close()
        assert not http.closed  # a shared session is left open


# ---- thinking


async def test_thinking_blocks_are_not_shown(fake: FakeAnthropic) -> None:
    fake.set_mode("thinking", chunk_chars=4)
    chunks = await collect(make(fake))
    assert text_of(chunks) == REPLY
    assert THINKING[:12] not in text_of(chunks)
    assert chunks[-1].usage is not None


async def test_think_tags_inside_text_are_not_shown(fake: FakeAnthropic) -> None:
    fake.set_mode("normal", reply="<think>plan: be brief</think>\n\nMadrid.", chunk_chars=3)
    assert text_of(await collect(make(fake))) == "Madrid."


# ---- tools


async def test_tool_use_round_trip(fake: FakeAnthropic) -> None:
    fake.script(
        Turn(
            text="Let me check.",
            tool_uses=[("get_weather", {"city": "Paris", "units": ["°C"]}), ("get_time", {})],
        ),
        Turn(text="Sunny and 21 °C; it is noon."),
    )
    backend = make(fake)
    first = GenerationRequest(
        "claude-test",
        [ChatMessage("system", "Use tools."), ChatMessage("user", "Weather and time in Paris?")],
        tools=(WEATHER, ToolSpec("get_time", "The time", {"type": "object", "properties": {}})),
    )
    chunks = [chunk async for chunk in backend.stream(first)]
    assert text_of(chunks) == "Let me check."
    [asked] = [c.tool_calls for c in chunks if c.tool_calls]
    assert [(c.name, c.arguments) for c in asked] == [
        ("get_weather", {"city": "Paris", "units": ["°C"]}),
        ("get_time", {}),
    ]
    assert all(c.id.startswith("toolu_") for c in asked)
    kinds = [("text" if c.text else "tools" if c.tool_calls else "usage") for c in chunks]
    assert kinds == ["text", "tools", "usage"]  # the calls come complete, after the text
    assert fake.bodies[0]["tools"] == [
        {
            "name": "get_weather",
            "description": "The weather in a city today",
            "input_schema": WEATHER.parameters,
        },
        {"name": "get_time", "description": "The time", "input_schema": first.tools[1].parameters},
    ]

    weather, clock = asked
    follow_up = GenerationRequest(
        "claude-test",
        first.messages
        + [
            ChatMessage("assistant", "Let me check.", tool_calls=asked),
            ChatMessage("tool", "sunny, 21", tool_call_id=weather.id, tool_name=weather.name),
            ChatMessage(
                "tool", "clock broken", tool_call_id=clock.id, tool_name=clock.name, is_error=True
            ),
        ],
        tools=first.tools,
    )
    assert text_of(await collect(backend, follow_up)) == "Sunny and 21 °C; it is noon."
    assert fake.bodies[1]["messages"][1:] == [
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me check."},
                {
                    "type": "tool_use",
                    "id": weather.id,
                    "name": "get_weather",
                    "input": {"city": "Paris", "units": ["°C"]},
                },
                {"type": "tool_use", "id": clock.id, "name": "get_time", "input": {}},
            ],
        },
        {
            "role": "user",  # both results in one message
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": weather.id,
                    "content": "sunny, 21",
                    "is_error": False,
                },
                {
                    "type": "tool_result",
                    "tool_use_id": clock.id,
                    "content": "clock broken",
                    "is_error": True,
                },
            ],
        },
    ]


@pytest.mark.parametrize("user_first", [False, True])
async def test_tool_results_go_before_user_text_and_silent_tool_turns_have_no_text(
    fake: FakeAnthropic, user_first: bool
) -> None:
    call = ToolCall("toolu_01", "get_weather", {"city": "Oslo"})
    result = ChatMessage("tool", "snow", tool_call_id=call.id, tool_name=call.name)
    said = ChatMessage("user", "And tomorrow?")  # e.g. sent while the tool ran
    request = GenerationRequest(
        "claude-test",
        [
            ChatMessage("user", "Oslo?"),
            ChatMessage("assistant", "", tool_calls=(call,)),
            *([said, result] if user_first else [result, said]),
        ],
        tools=(WEATHER,),
    )
    assert text_of(await collect(make(fake), request)) == REPLY  # the fake accepted it
    assert fake.bodies[0]["messages"][1:] == [
        {
            "role": "assistant",
            "content": [
                {
                    "type": "tool_use",
                    "id": "toolu_01",
                    "name": "get_weather",
                    "input": {"city": "Oslo"},
                }
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_01",
                    "content": "snow",
                    "is_error": False,
                },
                {"type": "text", "text": "And tomorrow?"},
            ],
        },
    ]


async def test_tool_input_cut_by_the_token_cap_is_malformed(fake: FakeAnthropic) -> None:
    fake.set_mode("max_tokens")
    fake.script(Turn(tool_uses=[("get_weather", {"city": "Paris", "detail": "hourly"})]))
    error = await failure(make(fake))
    assert error.kind is ErrorKind.MALFORMED
    assert "could not be read (bad tool input" in error.user_message("claude")
    assert len(fake.requests) == 1


# ---- the fake refuses what the real API refuses


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"max_tokens": None}, "max_tokens: Field required"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
            'multiple "user" roles in a row',
        ),
        (
            {"messages": [{"role": "assistant", "content": "a"}]},
            'first message must use the "user"',
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"},
                    {
                        "role": "user",
                        "content": [
                            {"type": "tool_result", "tool_use_id": "toolu_x", "content": "r"}
                        ],
                    },
                ]
            },
            "unexpected `tool_use_id`",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {
                        "role": "assistant",
                        "content": [
                            {"type": "tool_use", "id": "toolu_y", "name": "t", "input": {}}
                        ],
                    },
                    {"role": "user", "content": "never answered"},
                ]
            },
            "without `tool_result` blocks",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": " "}]}]},
            "non-whitespace",
        ),
        ({"tools": [{"name": "t", "description": "no schema"}]}, "input_schema"),
    ],
)
async def test_the_fake_refuses_invalid_requests_like_the_api(
    fake: FakeAnthropic, change: dict[str, Any], words: str
) -> None:
    body = {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    body.update(change)
    body = {k: v for k, v in body.items() if v is not None}
    headers = {"anthropic-version": "2023-06-01"}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{fake.base_url}/messages", json=body, headers=headers) as response:
            assert response.status == 400
            answer = await response.json()
        async with http.post(f"{fake.base_url}/messages", json=body) as response:
            assert "anthropic-version" in (await response.json())["error"]["message"]
    assert answer["type"] == "error" and answer["error"]["type"] == "invalid_request_error"
    assert words in answer["error"]["message"]


async def test_a_refused_request_is_a_bad_request_with_the_api_message(
    fake: FakeAnthropic,
) -> None:
    request = GenerationRequest("claude-test", [ChatMessage("user", "hi")], temperature=1.5)
    error = await failure(make(fake), request=request)
    assert error.kind is ErrorKind.BAD_REQUEST and error.status == 400
    assert "temperature" in error.user_message("claude")
    assert len(fake.requests) == 1


# ---- HTTP errors


async def test_bad_key_is_auth_and_the_key_never_leaks() -> None:
    async with FakeAnthropic(require_key="sk-ant-api03-the-right-one") as server:
        error = await failure(make(server))  # the server echoes the wrong key back
    assert error.kind is ErrorKind.AUTH and error.status == 401
    assert "invalid x-api-key" in error.detail and KEY not in repr(error)
    assert "api_key" in error.user_message("claude")
    assert len(server.requests) == 1  # auth errors are not retried


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, ErrorKind.BAD_REQUEST),
        (404, ErrorKind.BAD_REQUEST),
        (413, ErrorKind.BAD_REQUEST),
        (403, ErrorKind.AUTH),
    ],
)
async def test_client_errors_carry_the_provider_message(
    fake: FakeAnthropic, status: int, kind: ErrorKind
) -> None:
    fake.set_mode("status", status=status, message="model: claude-nope was not found")
    error = await failure(make(fake))
    assert error.kind is kind and error.status == status
    assert "claude-nope was not found" in error.detail
    assert len(fake.requests) == 1


async def test_overloaded_is_retried_then_the_answer_comes_once(fake: FakeAnthropic) -> None:
    fake.set_mode("overloaded", times=2)
    assert text_of(await collect(make(fake, max_retries=2))) == REPLY
    assert len(fake.requests) == 3


async def test_overloaded_until_retries_run_out(fake: FakeAnthropic) -> None:
    fake.set_mode("overloaded")
    error = await failure(make(fake, max_retries=1))
    assert error.kind is ErrorKind.SERVER and error.status == 529
    assert "provider's side (HTTP 529)" in error.user_message("claude")
    assert len(fake.requests) == 2


async def test_server_error_is_retried(fake: FakeAnthropic) -> None:
    fake.set_mode("status", status=500, times=1)
    assert text_of(await collect(make(fake))) == REPLY
    assert len(fake.requests) == 2


async def test_retry_after_is_honoured(fake: FakeAnthropic) -> None:
    fake.set_mode("rate_limit", retry_after="0.4", times=1)
    started = time.monotonic()
    assert text_of(await collect(make(fake))) == REPLY
    assert time.monotonic() - started >= 0.4
    assert len(fake.requests) == 2


async def test_long_retry_after_is_reported_not_waited(fake: FakeAnthropic) -> None:
    fake.set_mode("rate_limit", retry_after="90")
    started = time.monotonic()
    error = await failure(make(fake))
    assert time.monotonic() - started < 2
    assert error.kind is ErrorKind.RATE_LIMITED and error.retry_after == 90
    assert "Wait 90 s" in error.user_message("claude")
    assert len(fake.requests) == 1


async def test_no_answer_times_out(fake: FakeAnthropic) -> None:
    fake.set_mode("hang")
    error = await failure(make(fake, timeout_s=0.3))
    assert error.kind is ErrorKind.TIMEOUT and len(fake.requests) == 1


# ---- errors inside the stream


@pytest.mark.parametrize(
    ("error_type", "kind"),
    [
        ("overloaded_error", ErrorKind.SERVER),
        ("api_error", ErrorKind.SERVER),
        ("rate_limit_error", ErrorKind.RATE_LIMITED),
        ("authentication_error", ErrorKind.AUTH),
        ("permission_error", ErrorKind.AUTH),
        ("invalid_request_error", ErrorKind.BAD_REQUEST),
        ("request_too_large", ErrorKind.BAD_REQUEST),
    ],
)
async def test_error_events_are_mapped_by_type(
    fake: FakeAnthropic, error_type: str, kind: ErrorKind
) -> None:
    fake.set_mode("error_event", error_type=error_type, error_at=0, message="said by the API")
    error = await failure(make(fake, max_retries=0))
    assert error.kind is kind
    assert ("Overloaded" if error_type == "overloaded_error" else "said by the API") in error.detail


async def test_overloaded_event_before_any_text_is_retried(fake: FakeAnthropic) -> None:
    fake.set_mode("error_event", error_at=0, times=1)
    assert text_of(await collect(make(fake))) == REPLY
    assert len(fake.requests) == 2


async def test_no_retry_once_text_was_shown(fake: FakeAnthropic) -> None:
    fake.set_mode("error_event", delay_s=0.01)
    shown: list[str] = []
    error = await failure(make(fake, max_retries=3), shown)
    assert error.kind is ErrorKind.SERVER
    assert "".join(shown) and REPLY.startswith("".join(shown)) and "".join(shown) != REPLY
    assert len(fake.requests) == 1  # never duplicate text already shown


async def test_stream_cut_midway_is_an_error_and_not_retried(fake: FakeAnthropic) -> None:
    fake.set_mode("cut", delay_s=0.01)
    shown: list[str] = []
    error = await failure(make(fake, max_retries=3), shown)
    assert error.kind in (ErrorKind.SERVER, ErrorKind.MALFORMED)
    assert "".join(shown) and "".join(shown) != REPLY
    assert len(fake.requests) == 1


async def test_stream_ending_without_message_stop_is_malformed(fake: FakeAnthropic) -> None:
    fake.set_mode("truncate")
    error = await failure(make(fake))
    assert error.kind is ErrorKind.MALFORMED and "ended before it was complete" in error.detail


def test_anthropic_keys_are_redacted_from_every_error_text() -> None:
    backend = make("http://127.0.0.1:1/v1", key="")
    error = backend._error(ErrorKind.AUTH, f"bad key {KEY} / sk-ant-admin01-zzzzzzzzzz")
    assert KEY not in str(error) and "zzzzzzzzzz" not in str(error)
    keyed = make("http://127.0.0.1:1/v1", key="plain-custom-key-42")
    assert "plain-custom-key-42" not in str(keyed._error(ErrorKind.AUTH, "plain-custom-key-42"))


# ---- cancellation


async def test_cancelling_mid_answer_closes_the_connection(fake: FakeAnthropic) -> None:
    fake.set_mode("hang_mid")
    backend = make(fake, timeout_s=30)
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in backend.stream(REQUEST):
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 5)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await asyncio.wait_for(fake.disconnected.wait(), 2)  # the server saw the hang-up
    await backend.close()


# ---- the fake as a subprocess (how end-to-end runs and demos use it)


async def test_fake_runs_as_a_subprocess_with_a_control_endpoint() -> None:
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "devtools.fake_anthropic", "--port", "0", "--reply", "hi there"],
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        base_url = line.strip().rsplit(" ", 1)[-1]
        root_url = base_url.removesuffix("/v1")
        async with aiohttp.ClientSession() as http:
            spec = BackendSpec(id="c", type="anthropic", base_url=base_url, max_retries=0)
            backend = AnthropicBackend(spec, http)
            assert await backend.complete(REQUEST) == "hi there"
            async with http.post(f"{root_url}/_control", json={"mode": "overloaded"}):
                pass
            with pytest.raises(BackendError) as caught:
                await backend.complete(REQUEST)
            assert caught.value.kind is ErrorKind.SERVER and caught.value.status == 529
            async with http.get(f"{root_url}/_requests") as response:
                recorded = await response.json()
            assert [r["body"]["system"] for r in recorded] == [SYSTEM] * 2
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)
