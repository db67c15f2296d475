"""The echo backend: the exact answer a fresh install gives, streamed in pieces."""

from __future__ import annotations

import time

import pytest

from surfaces_plugin.backends import (
    ChatMessage,
    EchoBackend,
    GenerationRequest,
    build_backend,
)
from surfaces_plugin.config import BackendSpec

SPEC = BackendSpec(id="echo", type="echo")


def request(*texts: str) -> GenerationRequest:
    messages = [ChatMessage("system", "You are terse.")]
    for i, text in enumerate(texts):
        messages.append(ChatMessage("user" if i % 2 == 0 else "assistant", text))
    return GenerationRequest(model="", messages=messages, temperature=0.7)


async def test_answers_echo_and_the_last_user_message_exactly() -> None:
    backend = EchoBackend(SPEC, delay_s=0)
    answer = await backend.complete(request("first", "echo: first", "hello  big\nworld "))
    assert answer == "echo: hello  big\nworld "


async def test_streams_word_by_word_in_several_chunks() -> None:
    backend = EchoBackend(SPEC, delay_s=0)
    chunks = [c async for c in backend.stream(request("one two three"))]
    texts = [c.text for c in chunks if c.text]
    assert texts == ["echo: ", "one ", "two ", "three"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens


async def test_pauses_between_words_so_streaming_can_be_seen() -> None:
    backend = EchoBackend(SPEC, delay_s=0.02)
    started = time.monotonic()
    await backend.complete(request("a b c d"))
    assert time.monotonic() - started >= 0.08  # four pauses between five pieces


async def test_no_user_message_still_answers() -> None:
    backend = EchoBackend(SPEC, delay_s=0)
    assert await backend.complete(GenerationRequest("", [], 0.7)) == "echo: "


async def test_build_backend_default_and_chat_ids() -> None:
    backend = build_backend(SPEC)
    assert isinstance(backend, EchoBackend)
    first, second = await backend.create_chat(), await backend.create_chat()
    assert first != second and first.startswith("echo-")
    await backend.close()


def test_unknown_type_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown backend type"):
        build_backend(BackendSpec(id="x", type="nope"))  # type: ignore[arg-type]
