"""The OpenAI-compatible backend against a real local server (devtools.fake_openai)."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from devtools.fake_openai import THINKING, FakeOpenAI
from surfaces_plugin.backends import (
    BackendError,
    ChatMessage,
    Chunk,
    ErrorKind,
    GenerationRequest,
    OpenAIBackend,
    Usage,
    build_backend,
)
from surfaces_plugin.backends.openai import parse_retry_after
from surfaces_plugin.backends.sse import SSEDecoder
from surfaces_plugin.backends.think import ThinkFilter
from surfaces_plugin.config import BackendSpec

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-test-SECRET-0123456789abcdef"
REPLY = "Paris is the capital of France, and it has been for a long time."
REQUEST = GenerationRequest(
    model="gpt-test",
    messages=[
        ChatMessage("system", "You are a geography tutor."),
        ChatMessage("user", "Hi"),
        ChatMessage("assistant", "Hello! Ask me anything."),
        ChatMessage("user", "What is the capital of France?"),
    ],
    temperature=0.3,
)


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(reply_fn=lambda messages: REPLY) as server:
        yield server


def make(
    fake: FakeOpenAI | str, *, key: str = KEY, timeout_s: float = 5, max_retries: int = 2, **kw: Any
) -> OpenAIBackend:
    base_url = fake if isinstance(fake, str) else fake.base_url
    spec = BackendSpec(
        id="oa",
        type="openai",
        base_url=base_url,
        api_key=key,
        timeout_s=timeout_s,
        max_retries=max_retries,
    )
    kw.setdefault("backoff_base_s", 0.01)
    return OpenAIBackend(spec, **kw)


async def collect(backend: OpenAIBackend, request: GenerationRequest = REQUEST) -> list[Chunk]:
    try:
        return [chunk async for chunk in backend.stream(request)]
    finally:
        await backend.close()


async def failure(backend: OpenAIBackend, shown: list[str] | None = None) -> BackendError:
    """Run a request that must fail; `shown` receives the text yielded before the failure."""
    shown = [] if shown is None else shown
    with pytest.raises(BackendError) as caught:
        async for chunk in backend.stream(REQUEST):
            shown.append(chunk.text)
    await backend.close()
    error = caught.value
    assert KEY not in str(error) and KEY not in error.user_message("gpt")
    assert "Traceback" not in error.user_message("gpt")
    return error


def text_of(chunks: list[Chunk]) -> str:
    return "".join(c.text for c in chunks)


# ---- a normal answer


async def test_streams_the_answer_in_pieces_with_usage(fake: FakeOpenAI) -> None:
    fake.set_mode("normal", delay_s=0.01)
    chunks = await collect(make(fake))
    assert text_of(chunks) == REPLY
    assert len([c for c in chunks if c.text]) > 3
    assert chunks[-1] == Chunk(usage=Usage(prompt_tokens=22, completion_tokens=16))


async def test_sends_model_history_system_prompt_and_key(fake: FakeOpenAI) -> None:
    await collect(make(fake))
    [sent] = fake.requests
    assert sent["path"] == "/v1/chat/completions"
    assert sent["authorization"] == f"Bearer {KEY}"
    assert sent["body"] == {
        "model": "gpt-test",
        "messages": [{"role": m.role, "content": m.content} for m in REQUEST.messages],
        "temperature": 0.3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def test_no_key_sends_no_authorization(fake: FakeOpenAI) -> None:
    await collect(make(fake, key=""))
    assert fake.requests[0]["authorization"] is None


async def test_complete_joins_the_stream(fake: FakeOpenAI) -> None:
    backend = make(fake)
    assert await backend.complete(REQUEST) == REPLY
    await backend.close()


async def test_byte_by_byte_network_chunks_are_reassembled(fake: FakeOpenAI) -> None:
    fake.set_mode("normal", write_bytes=7, reply="héllo wörld — ✓ done")
    chunks = await collect(make(fake))
    assert text_of(chunks) == "héllo wörld — ✓ done"
    assert chunks[-1].usage is not None


async def test_non_streamed_json_answer_is_accepted(fake: FakeOpenAI) -> None:
    fake.set_mode("json")
    chunks = await collect(make(fake))
    assert text_of(chunks) == REPLY
    assert chunks[-1].usage == Usage(prompt_tokens=22, completion_tokens=16)


async def test_shared_session_is_used_and_left_open(fake: FakeOpenAI) -> None:
    async with aiohttp.ClientSession() as http:
        backend = build_backend(BackendSpec(id="oa", type="openai", base_url=fake.base_url), http)
        assert await backend.complete(REQUEST) == REPLY
        await backend.close()
        assert not http.closed
    assert (await backend.create_chat()).startswith("oa-")


# ---- SSE framing and reasoning


SSE_SAMPLE = (
    ": comment\r\n\r\n"
    'data: {"choices":[{"delta":{"content":"Zürich "}}]}\r\n\r\n'
    "event: message\nid: 7\n"
    'data:{"choices":[{"delta":{"content":"✓"}}]}\n\n'
    'data: {"a":\ndata: 1}\r\r'
    "data: [DONE]\n\n"
).encode()
SSE_EVENTS = [
    '{"choices":[{"delta":{"content":"Zürich "}}]}',
    '{"choices":[{"delta":{"content":"✓"}}]}',
    '{"a":\n1}',
    "[DONE]",
]


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13, len(SSE_SAMPLE)])
def test_sse_decoder_survives_any_chunk_split(size: int) -> None:
    decoder = SSEDecoder()
    events: list[str] = []
    for start in range(0, len(SSE_SAMPLE), size):
        events += decoder.feed(SSE_SAMPLE[start : start + size])
    assert events + decoder.finish() == SSE_EVENTS


def test_sse_decoder_every_two_way_split() -> None:
    for cut in range(len(SSE_SAMPLE) + 1):
        decoder = SSEDecoder()
        events = decoder.feed(SSE_SAMPLE[:cut]) + decoder.feed(SSE_SAMPLE[cut:])
        assert events + decoder.finish() == SSE_EVENTS, cut


def test_sse_decoder_flushes_an_unterminated_last_event() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: x") == []
    assert decoder.finish() == ["x"]


THINK_RAW = "<think>plan: answer briefly</think>\n\nThe answer is <b>42</b>. <thin"
THINK_VISIBLE = "The answer is <b>42</b>. <thin"


@pytest.mark.parametrize("size", [1, 2, 3, 4, 7, len(THINK_RAW)])
def test_think_block_hidden_across_any_split(size: int) -> None:
    think = ThinkFilter()
    shown = "".join(think.feed(THINK_RAW[i : i + size]) for i in range(0, len(THINK_RAW), size))
    assert shown + think.flush() == THINK_VISIBLE


def test_think_filter_edge_cases() -> None:
    think = ThinkFilter()
    assert think.feed("still thinking</think>Answer") == "still thinkingAnswer"  # stray close
    think = ThinkFilter()
    assert think.feed("<think>never closed") + think.flush() == ""
    think = ThinkFilter()
    assert think.feed("a <think>x</think>b") == "a b"


async def test_think_block_split_across_events_is_not_shown(fake: FakeOpenAI) -> None:
    fake.set_mode("think", chunk_chars=3)
    chunks = await collect(make(fake))
    assert text_of(chunks) == REPLY
    assert "think" not in text_of(chunks) and THINKING[:10] not in text_of(chunks)


async def test_reasoning_content_deltas_are_not_shown(fake: FakeOpenAI) -> None:
    fake.set_mode("reasoning")
    assert text_of(await collect(make(fake))) == REPLY


# ---- errors


async def test_bad_key_is_auth_and_the_key_never_leaks() -> None:
    async with FakeOpenAI(require_key="sk-the-right-one") as server:
        error = await failure(make(server))  # the server echoes the wrong key back
    assert error.kind is ErrorKind.AUTH and error.status == 401
    assert KEY not in repr(error) and KEY not in error.detail
    assert "`gpt`" in error.user_message("gpt") and "api_key" in error.user_message("gpt")
    assert len(server.requests) == 1  # auth errors are not retried


@pytest.mark.parametrize("status", [400, 404, 422])
async def test_client_errors_are_bad_request_with_the_provider_message(
    fake: FakeOpenAI, status: int
) -> None:
    fake.set_mode("status", status=status, message="The model `gpt-test` does not exist")
    error = await failure(make(fake))
    assert error.kind is ErrorKind.BAD_REQUEST and error.status == status
    assert "The model `gpt-test` does not exist" in error.user_message("gpt")
    assert len(fake.requests) == 1


async def test_403_is_auth(fake: FakeOpenAI) -> None:
    fake.set_mode("status", status=403, message="forbidden")
    assert (await failure(make(fake))).kind is ErrorKind.AUTH


async def test_server_error_is_retried_then_reported(fake: FakeOpenAI) -> None:
    fake.set_mode("status", status=503)
    error = await failure(make(fake, max_retries=2))
    assert error.kind is ErrorKind.SERVER and error.status == 503
    assert len(fake.requests) == 3
    assert "retry" in error.user_message("gpt", command_prefix="bot")
    assert "!bot retry" in error.user_message("gpt", command_prefix="bot")


async def test_server_error_once_then_success_gives_the_answer_once(fake: FakeOpenAI) -> None:
    fake.set_mode("status", status=502, times=1)
    assert text_of(await collect(make(fake))) == REPLY
    assert len(fake.requests) == 2


async def test_retry_after_is_honoured(fake: FakeOpenAI) -> None:
    fake.set_mode("rate_limit", retry_after="0.4", times=1)
    started = time.monotonic()
    assert text_of(await collect(make(fake))) == REPLY
    assert time.monotonic() - started >= 0.4
    assert len(fake.requests) == 2


async def test_rate_limited_until_retries_run_out(fake: FakeOpenAI) -> None:
    fake.set_mode("rate_limit", retry_after="0")
    error = await failure(make(fake, max_retries=1))
    assert error.kind is ErrorKind.RATE_LIMITED and len(fake.requests) == 2


async def test_long_retry_after_is_reported_not_waited(fake: FakeOpenAI) -> None:
    fake.set_mode("rate_limit", retry_after="120")
    started = time.monotonic()
    error = await failure(make(fake))
    assert time.monotonic() - started < 2
    assert error.kind is ErrorKind.RATE_LIMITED and error.retry_after == 120
    assert "Wait 120 s" in error.user_message("gpt")
    assert len(fake.requests) == 1


def test_retry_after_as_http_date() -> None:
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < (parse_retry_after(later) or 0) <= 30
    assert parse_retry_after("2.5") == 2.5
    assert parse_retry_after("soon") is None


async def test_no_answer_times_out(fake: FakeOpenAI) -> None:
    fake.set_mode("hang")
    started = time.monotonic()
    error = await failure(make(fake, timeout_s=0.3))
    assert error.kind is ErrorKind.TIMEOUT and time.monotonic() - started < 3
    assert "did not answer within" in error.user_message("gpt")
    assert len(fake.requests) == 1  # a slow provider is not asked again (the user would wait 3×)


def test_timeout_message_names_the_limit() -> None:
    error = BackendError(ErrorKind.TIMEOUT, "x", timeout_s=60)
    assert error.user_message("gpt") == (
        "The agent `gpt` did not answer within 60 s. Send `!ai retry` to try again."
    )


async def test_stalled_stream_times_out_without_retrying(fake: FakeOpenAI) -> None:
    fake.set_mode("hang_mid")
    shown: list[str] = []
    error = await failure(make(fake, timeout_s=0.3, max_retries=3), shown)
    assert error.kind is ErrorKind.TIMEOUT
    assert "".join(shown) and REPLY.startswith("".join(shown))
    assert len(fake.requests) == 1


async def test_stream_cut_midway_is_an_error_and_not_retried(fake: FakeOpenAI) -> None:
    fake.set_mode("cut", delay_s=0.01)
    shown: list[str] = []
    error = await failure(make(fake, max_retries=3), shown)
    assert error.kind in (ErrorKind.SERVER, ErrorKind.MALFORMED)
    assert "".join(shown) and "".join(shown) != REPLY
    assert len(fake.requests) == 1  # never duplicate text already shown


async def test_stream_ending_without_done_or_finish_is_malformed(fake: FakeOpenAI) -> None:
    fake.set_mode("truncate")
    assert (await failure(make(fake))).kind is ErrorKind.MALFORMED


async def test_invalid_event_json_is_malformed(fake: FakeOpenAI) -> None:
    fake.set_mode("malformed")
    assert (await failure(make(fake))).kind is ErrorKind.MALFORMED


async def test_wrong_content_type_is_malformed(fake: FakeOpenAI) -> None:
    fake.set_mode("wrong_type")
    error = await failure(make(fake))
    assert error.kind is ErrorKind.MALFORMED and "text/html" in error.user_message("gpt")


async def test_error_event_inside_the_stream_is_reported(fake: FakeOpenAI) -> None:
    fake.set_mode("error_event", delay_s=0.01)
    error = await failure(make(fake, max_retries=0))
    assert error.kind is ErrorKind.SERVER and "model overloaded" in str(error)


async def test_unreachable_server() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # free, and nobody listens once the socket closes
    error = await failure(make(f"http://127.0.0.1:{port}/v1", max_retries=1))
    assert error.kind is ErrorKind.UNREACHABLE
    assert "could not be reached" in error.user_message("gpt")


async def test_rejected_stream_options_are_dropped_once(fake: FakeOpenAI) -> None:
    fake.set_mode(
        "status", status=400, message="Unrecognized request argument: stream_options", times=1
    )
    assert text_of(await collect(make(fake, max_retries=0))) == REPLY
    assert "stream_options" in fake.requests[0]["body"]
    assert "stream_options" not in fake.requests[1]["body"]


def test_secrets_are_redacted_from_every_error_text() -> None:
    backend = make("http://127.0.0.1:1/v1")
    error = backend._error(
        ErrorKind.BAD_REQUEST, f"bad key {KEY} / Bearer abcdef123456 / sk-zzzzzzzz"
    )
    assert (
        KEY not in str(error) and "abcdef123456" not in str(error) and "zzzzzzzz" not in str(error)
    )
    for kind in ErrorKind:
        message = BackendError(
            kind, "detail", status=500, retry_after=3, timeout_s=60
        ).user_message("gpt")
        assert message.startswith("The agent `gpt`") and "\n" not in message


# ---- cancellation


async def test_cancelling_mid_answer_closes_the_connection(fake: FakeOpenAI) -> None:
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


async def test_cancelling_before_headers_closes_the_connection(fake: FakeOpenAI) -> None:
    fake.set_mode("hang")
    async with aiohttp.ClientSession() as http:  # a shared session keeps pooled connections
        backend = OpenAIBackend(
            BackendSpec(id="oa", type="openai", base_url=fake.base_url, timeout_s=30), http
        )
        task = asyncio.create_task(backend.complete(REQUEST))
        await asyncio.wait_for(fake.received.wait(), 5)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await asyncio.wait_for(fake.disconnected.wait(), 2)


async def test_closing_the_stream_early_closes_the_connection(fake: FakeOpenAI) -> None:
    fake.set_mode("normal", delay_s=0.2)
    backend = make(fake)
    async with contextlib.aclosing(backend.stream(REQUEST)) as chunks:
        async for _ in chunks:
            break
    await asyncio.wait_for(fake.disconnected.wait(), 2)
    await backend.close()


# ---- the fake as a subprocess (how end-to-end tests use it)


async def test_fake_runs_as_a_subprocess_with_a_control_endpoint() -> None:
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "devtools.fake_openai", "--port", "0", "--reply", "hi there"],
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        base_url = line.strip().rsplit(" ", 1)[-1]
        root_url = base_url.removesuffix("/v1")
        async with aiohttp.ClientSession() as http:
            backend = OpenAIBackend(
                BackendSpec(id="oa", type="openai", base_url=base_url, max_retries=0), http
            )
            assert await backend.complete(REQUEST) == "hi there"
            async with http.post(f"{root_url}/_control", json={"mode": "status", "status": 401}):
                pass
            with pytest.raises(BackendError) as caught:
                await backend.complete(REQUEST)
            assert caught.value.kind is ErrorKind.AUTH
            async with http.get(f"{root_url}/_requests") as response:
                recorded = await response.json()
            assert [r["body"]["messages"][0]["content"] for r in recorded] == [
                "You are a geography tutor."
            ] * 2
            async with http.post(f"{root_url}/_control", json={"mode": "nope"}) as response:
                assert response.status == 400
                assert "unknown mode" in json.dumps(await response.json())
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)
