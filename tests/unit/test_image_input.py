"""Images shown to the model, in each API style, against the real local fake servers (which
check image parts as the APIs do and say what they saw in the image's header)."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from devtools.fake_anthropic import FakeAnthropic
from devtools.fake_openai import FakeOpenAI
from devtools.fake_responses import FakeResponses
from devtools.images import make_png, png_size
from surfaces_plugin.backends import (
    AnthropicBackend,
    Backend,
    BackendError,
    ChatMessage,
    ErrorKind,
    GenerationRequest,
    ImagePart,
    OpenAIBackend,
    ResponsesBackend,
)
from surfaces_plugin.config import BackendSpec
from surfaces_plugin.context_window import IMAGE_TOKENS, message_tokens

KEY = "sk-test-SECRET-0123456789abcdef"
PNG = make_png(7, 5, (10, 200, 30))
WIDE = make_png(64, 2, (0, 0, 255))


@dataclass
class Provider:
    """A fake provider and a backend speaking its API style."""

    name: str
    fake: Any
    backend: Backend
    last_user_content: Callable[[], Any]  # the content the fake received in the newest user turn

    async def answer(self, *messages: ChatMessage) -> str:
        request = GenerationRequest(model="vision-test", messages=list(messages))
        return await self.backend.complete(request)

    async def failure(self, *messages: ChatMessage) -> BackendError:
        with pytest.raises(BackendError) as caught:
            await self.answer(*messages)
        assert KEY not in str(caught.value)
        return caught.value


def spec(name: str, base_url: str) -> BackendSpec:
    kind = "anthropic" if name == "anthropic" else "openai"
    api = "responses" if name == "responses" else "chat"
    return BackendSpec(
        id=name,
        type=kind,
        base_url=base_url,
        api_key=KEY,
        max_retries=0,
        api=api,  # type: ignore[arg-type]
    )


@pytest_asyncio.fixture(params=["chat", "anthropic", "responses"])
async def provider(request: pytest.FixtureRequest) -> AsyncIterator[Provider]:
    name = request.param
    async with AsyncExitStack() as stack:
        if name == "chat":
            fake: Any = await stack.enter_async_context(FakeOpenAI())
            backend: Backend = OpenAIBackend(spec(name, fake.base_url))
            last = lambda: fake.bodies[-1]["messages"][-1]["content"]  # noqa: E731
        elif name == "anthropic":
            fake = await stack.enter_async_context(FakeAnthropic())
            backend = AnthropicBackend(spec(name, fake.base_url))
            last = lambda: fake.bodies[-1]["messages"][-1]["content"]  # noqa: E731
        else:
            fake = await stack.enter_async_context(FakeResponses())
            backend = ResponsesBackend(spec(name, fake.base_url))
            last = lambda: fake.bodies[-1]["input"][-1]["content"]  # noqa: E731
        stack.push_async_callback(backend.close)
        yield Provider(name, fake, backend, last)


def seen(data: bytes) -> str:
    """What the fakes say about a PNG: its type, size and the dimensions in its header."""
    width, height = png_size(data)
    return f"I see an image (image/png, {len(data)} bytes, {width}x{height})."


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


# ---- images arrive


async def test_a_captioned_image_reaches_the_model(provider: Provider) -> None:
    answer = await provider.answer(
        ChatMessage("system", "You describe pictures."),
        ChatMessage("user", "What is in this picture?", images=(ImagePart("image/png", PNG),)),
    )
    assert "What is in this picture?" in answer
    assert seen(PNG) in answer


async def test_the_wire_shape_of_each_api_style(provider: Provider) -> None:
    await provider.answer(ChatMessage("user", "Look", images=(ImagePart("image/png", PNG),)))
    content = provider.last_user_content()
    encoded = base64.b64encode(PNG).decode()
    if provider.name == "chat":
        assert content == [
            {"type": "text", "text": "Look"},
            {"type": "image_url", "image_url": {"url": data_url(PNG)}},
        ]
    elif provider.name == "anthropic":  # images before the text
        source = {"type": "base64", "media_type": "image/png", "data": encoded}
        assert content == [{"type": "image", "source": source}, {"type": "text", "text": "Look"}]
    else:
        assert content == [
            {"type": "input_text", "text": "Look"},
            {"type": "input_image", "image_url": data_url(PNG), "detail": "auto"},
        ]


async def test_an_image_without_caption_and_two_images(provider: Provider) -> None:
    alone = await provider.answer(ChatMessage("user", "", images=(ImagePart("image/png", PNG),)))
    assert seen(PNG) in alone
    both = await provider.answer(
        ChatMessage(
            "user", "Compare", images=(ImagePart("image/png", PNG), ImagePart("image/png", WIDE))
        )
    )
    assert seen(PNG) in both and seen(WIDE) in both
    assert both.index(seen(PNG)) < both.index(seen(WIDE))  # in the order the user sent them


async def test_an_image_in_earlier_history_is_sent_again(provider: Provider) -> None:
    answer = await provider.answer(
        ChatMessage("user", "Here is a chart", images=(ImagePart("image/png", WIDE),)),
        ChatMessage("assistant", "A blue strip."),
        ChatMessage("user", "And now?"),
    )
    assert answer.endswith("And now?")  # nothing seen in the newest turn
    if provider.name == "chat":
        sent = provider.fake.bodies[-1]["messages"][0]["content"]
    elif provider.name == "anthropic":
        sent = provider.fake.bodies[-1]["messages"][0]["content"]
    else:
        sent = provider.fake.bodies[-1]["input"][0]["content"]
    assert data_url(WIDE) in str(sent) or base64.b64encode(WIDE).decode() in str(sent)


async def test_messages_without_images_stay_plain_strings(provider: Provider) -> None:
    await provider.answer(ChatMessage("user", "Just text"))
    content = provider.last_user_content()
    if provider.name == "responses":  # the fake stores what it was sent as given
        assert provider.fake.bodies[-1]["input"][-1] == {"role": "user", "content": "Just text"}
    elif provider.name == "chat":
        assert content == "Just text"
    else:
        assert content == [{"type": "text", "text": "Just text"}]


async def test_a_server_held_conversation_keeps_the_image() -> None:
    async with FakeResponses() as fake:
        backend = ResponsesBackend(
            BackendSpec(
                id="conv", type="openai", base_url=fake.base_url, api="responses", state="server"
            )
        )
        try:
            chat_id = await backend.create_chat()
            request = GenerationRequest(
                model="m",
                messages=[ChatMessage("user", "See", images=(ImagePart("image/png", PNG),))],
                chat_id=chat_id,
            )
            assert seen(PNG) in await backend.complete(request)
        finally:
            await backend.close()
        stored = fake.items(chat_id)[0]["content"]
        assert {"type": "input_image", "image_url": data_url(PNG), "detail": "auto"} in stored


# ---- what the APIs refuse, as each says it


async def test_bytes_that_are_no_image_are_a_bad_request(provider: Provider) -> None:
    corrupt = ImagePart("image/png", b"this is not a picture at all")
    error = await provider.failure(ChatMessage("user", "?", images=(corrupt,)))
    assert error.kind is ErrorKind.BAD_REQUEST and error.status == 400
    assert "image" in error.detail


async def test_a_png_with_a_broken_header_is_a_bad_request(provider: Provider) -> None:
    broken = PNG[:20] + bytes([PNG[20] ^ 0xFF]) + PNG[21:]  # the IHDR CRC no longer matches
    error = await provider.failure(
        ChatMessage("user", "?", images=(ImagePart("image/png", broken),))
    )
    assert error.kind is ErrorKind.BAD_REQUEST and "corrupt" in error.detail


async def test_an_unsupported_image_type_is_a_bad_request(provider: Provider) -> None:
    bitmap = b"BM" + bytes(60)  # a BMP header: no API takes BMP
    error = await provider.failure(
        ChatMessage("user", "?", images=(ImagePart("image/bmp", bitmap),))
    )
    assert error.kind is ErrorKind.BAD_REQUEST and error.status == 400


async def test_anthropic_refuses_an_image_declared_as_another_type() -> None:
    async with FakeAnthropic() as fake:
        backend = AnthropicBackend(spec("anthropic", fake.base_url))
        try:
            jpeg_as_png = ImagePart("image/png", b"\xff\xd8\xff\xe0" + bytes(40))
            with pytest.raises(BackendError) as caught:
                await backend.complete(
                    GenerationRequest(
                        model="m", messages=[ChatMessage("user", "?", images=(jpeg_as_png,))]
                    )
                )
        finally:
            await backend.close()
    assert "appears to be a image/jpeg image" in caught.value.detail


@pytest.mark.parametrize(
    "payload",
    [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@not base64@@"}},
        {"type": "image_url", "image_url": {"url": "data:image/png," + PNG.hex()}},
        {"type": "image_url", "image_url": {}},
        {"type": "picture", "data": "x"},
    ],
)
async def test_the_chat_fake_refuses_malformed_parts(payload: dict[str, Any]) -> None:
    async with FakeOpenAI() as fake, aiohttp.ClientSession() as http:
        body = {"model": "m", "messages": [{"role": "user", "content": [payload]}]}
        async with http.post(f"{fake.base_url}/chat/completions", json=body) as response:
            assert response.status == 400
            assert (await response.json())["error"]["message"]


async def test_the_fakes_refuse_images_from_the_assistant() -> None:
    image_part = {"type": "image_url", "image_url": {"url": data_url(PNG)}}
    async with FakeOpenAI() as chat, FakeResponses() as responses, aiohttp.ClientSession() as http:
        body = {"model": "m", "messages": [{"role": "assistant", "content": [image_part]}]}
        async with http.post(f"{chat.base_url}/chat/completions", json=body) as response:
            assert response.status == 400
        item = {
            "role": "assistant",
            "content": [{"type": "input_image", "image_url": data_url(PNG)}],
        }
        async with http.post(
            f"{responses.base_url}/responses", json={"model": "m", "input": [item]}
        ) as response:
            assert response.status == 400
            assert "input_image" in (await response.json())["error"]["message"]


async def test_the_anthropic_fake_refuses_bad_base64() -> None:
    source = {"type": "base64", "media_type": "image/png", "data": "%%%%"}
    body = {
        "model": "m",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": [{"type": "image", "source": source}]}],
    }
    headers = {"anthropic-version": "2023-06-01"}
    async with FakeAnthropic() as fake, aiohttp.ClientSession() as http:
        async with http.post(f"{fake.base_url}/messages", json=body, headers=headers) as response:
            assert response.status == 400
            assert "base64" in (await response.json())["error"]["message"]


# ---- what an image costs in the context window


def test_an_image_costs_a_fixed_estimate_in_the_window() -> None:
    text = ChatMessage("user", "What is this?")
    one = ChatMessage("user", "What is this?", images=(ImagePart("image/png", PNG),))
    two = ChatMessage("user", "What is this?", images=(ImagePart("image/png", PNG),) * 2)
    assert message_tokens(one) - message_tokens(text) == IMAGE_TOKENS
    assert message_tokens(two) - message_tokens(text) == 2 * IMAGE_TOKENS
    # The cost does not depend on the file size: providers bill pixels after downscaling.
    big = ChatMessage("user", "What is this?", images=(ImagePart("image/png", make_png(300, 300)),))
    assert message_tokens(big) == message_tokens(one)
