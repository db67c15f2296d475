"""Anthropic's Messages API (Claude), streamed, with tool use."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from .base import (
    BackendError,
    ChatMessage,
    Chunk,
    ErrorKind,
    Features,
    GenerationRequest,
    ImagePart,
    ToolCall,
    Usage,
)
from .http import HttpBackend, event_payloads, one_line
from .think import ThinkFilter

API_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096  # the API insists on a cap; an agent's `max_tokens` overrides it
# Stands in for the question when the context window starts at an answer: the API wants a user first.
EARLIER_LEFT_OUT = "(Earlier messages of this conversation are left out.)"

# `error.type` of an error event inside a 200 stream (the same names as in error bodies).
_STREAM_ERROR_KINDS = {
    "overloaded_error": ErrorKind.SERVER,
    "api_error": ErrorKind.SERVER,
    "rate_limit_error": ErrorKind.RATE_LIMITED,
    "authentication_error": ErrorKind.AUTH,
    "permission_error": ErrorKind.AUTH,
    "invalid_request_error": ErrorKind.BAD_REQUEST,
    "request_too_large": ErrorKind.BAD_REQUEST,
    "not_found_error": ErrorKind.BAD_REQUEST,
}
_INPUT_TOKEN_FIELDS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


def to_anthropic(messages: Sequence[ChatMessage]) -> tuple[str, list[dict[str, Any]]]:
    """The top-level system text and the turns the API accepts: user first, roles alternating
    (consecutive same-role messages merged), tool results answering the preceding tool uses."""
    system = "\n\n".join(m.content for m in messages if m.role == "system" and m.content.strip())
    turns: list[dict[str, Any]] = []
    for message in messages:
        if message.role == "system":
            continue
        role = "assistant" if message.role == "assistant" else "user"
        blocks = _blocks(message)
        if not blocks:
            continue  # the API rejects empty content
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] = _results_first(turns[-1]["content"] + blocks)
        else:
            turns.append({"role": role, "content": blocks})
    if not turns or turns[0]["role"] != "user":
        turns.insert(0, {"role": "user", "content": [_text(EARLIER_LEFT_OUT)]})
    return system, turns


def _blocks(message: ChatMessage) -> list[dict[str, Any]]:
    if message.role == "tool":
        result: dict[str, Any] = {"type": "tool_result", "tool_use_id": message.tool_call_id}
        if message.content:
            result["content"] = message.content
        result["is_error"] = message.is_error
        return [result]
    blocks = [_text(message.content)] if message.content.strip() else []
    if message.role == "user":
        # Images first: Anthropic's advice, the question then reads as about them.
        blocks = [_image(image) for image in message.images] + blocks
    if message.role == "assistant":
        blocks += [
            {"type": "tool_use", "id": call.id, "name": call.name, "input": call.arguments}
            for call in message.tool_calls
        ]
    return blocks


def _text(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def _image(image: ImagePart) -> dict[str, Any]:
    source = {"type": "base64", "media_type": image.mime, "data": image.base64}
    return {"type": "image", "source": source}


def _results_first(blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The API wants a user message's tool results before any text in it."""
    return sorted(blocks, key=lambda block: block["type"] != "tool_result")


@dataclass
class _ToolUse:
    id: str
    name: str
    start_input: Any
    json_parts: list[str] = field(default_factory=list)

    def call(self) -> ToolCall:
        raw = "".join(self.json_parts)
        arguments = json.loads(raw) if raw.strip() else (self.start_input or {})
        if not isinstance(arguments, dict):
            raise ValueError(f"the input of tool {self.name!r} is not a JSON object")
        return ToolCall(self.id, self.name, arguments)


class _Message:
    """What one streamed message has delivered so far. Thinking blocks are never read."""

    def __init__(self) -> None:
        self.think = ThinkFilter()  # some models behind Anthropic-style APIs inline <think>
        self.tool_uses: dict[int, _ToolUse] = {}
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None
        self.done = False

    def apply(self, event: dict[str, Any]) -> str:
        """Take one decoded event; return its visible text."""
        kind = event.get("type")
        if kind == "message_start":
            self._count(_dict(_dict(event, "message"), "usage"))
        elif kind == "message_delta":
            self._count(_dict(event, "usage"))
        elif kind == "message_stop":
            self.done = True
        elif kind == "content_block_start":
            block = _dict(event, "content_block")
            if block.get("type") == "tool_use":
                self.tool_uses[_index(event)] = _ToolUse(
                    str(block.get("id", "")), str(block.get("name", "")), block.get("input")
                )
            elif block.get("type") == "text":
                return self.think.feed(_str(block, "text"))
        elif kind == "content_block_delta":
            delta = _dict(event, "delta")
            if delta.get("type") == "text_delta":
                return self.think.feed(_str(delta, "text"))
            if delta.get("type") == "input_json_delta":
                tool_use = self.tool_uses.get(_index(event))
                if tool_use is None:
                    raise ValueError("input_json_delta outside a tool_use block")
                tool_use.json_parts.append(_str(delta, "partial_json"))
        # ping, content_block_stop, thinking/signature deltas and unknown (newer) events: nothing.
        return ""

    def _count(self, usage: dict[str, Any]) -> None:
        present = [usage[key] for key in _INPUT_TOKEN_FIELDS if _is_int(usage.get(key))]
        if present:
            self.input_tokens = sum(present)  # cached prompt tokens were read all the same
        if _is_int(usage.get("output_tokens")):
            self.output_tokens = usage["output_tokens"]  # cumulative: the last report wins

    def tool_calls(self) -> tuple[ToolCall, ...]:
        return tuple(self.tool_uses[i].call() for i in sorted(self.tool_uses))

    def usage(self) -> Usage | None:
        if self.input_tokens is None and self.output_tokens is None:
            return None
        return Usage(prompt_tokens=self.input_tokens, completion_tokens=self.output_tokens)


def _dict(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        raise ValueError(f"{key} is not a JSON object")
    return value


def _str(data: dict[str, Any], key: str) -> str:
    value = data.get(key) or ""
    if not isinstance(value, str):
        raise ValueError(f"{key} is not a string")
    return value


def _index(event: dict[str, Any]) -> int:
    index = event.get("index")
    if not _is_int(index):
        raise ValueError("a content block event has no index")
    return index


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class AnthropicBackend(HttpBackend):
    """POST {base_url}/messages with stream=true; retries only before any text is out."""

    features = Features(streaming=True, tools=True, server_state=False)

    @property
    def url(self) -> str:
        return f"{self.spec.base_url.rstrip('/')}/messages"

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "text/event-stream", "anthropic-version": API_VERSION}
        if self.spec.api_key:
            headers["x-api-key"] = self.spec.api_key
        return headers

    def _body(self, request: GenerationRequest) -> dict[str, Any]:
        system, messages = to_anthropic(request.messages)
        body: dict[str, Any] = {
            "model": request.model,
            "max_tokens": request.max_tokens or DEFAULT_MAX_TOKENS,
            "messages": messages,
            "temperature": request.temperature,
            "stream": True,
        }
        if system:
            body["system"] = system
        if request.tools:
            body["tools"] = [
                {"name": t.name, "description": t.description, "input_schema": t.parameters}
                for t in request.tools
            ]
        return body

    async def _read_events(self, response: aiohttp.ClientResponse) -> AsyncIterator[Chunk]:
        message = _Message()
        async with aclosing(event_payloads(response)) as batches:
            async for payloads in batches:
                text = self._apply_events(message, payloads)
                if text:
                    yield Chunk(text=text)
                if message.done:
                    break  # after message_stop nothing else matters
        tail = message.think.flush()
        if tail:
            yield Chunk(text=tail)
        if not message.done:
            raise self._error(ErrorKind.MALFORMED, "the answer stream ended before it was complete")
        try:
            calls = message.tool_calls()
        except ValueError as e:
            raise self._error(ErrorKind.MALFORMED, f"bad tool input: {e}") from None
        if calls:
            yield Chunk(tool_calls=calls)
        usage = message.usage()
        if usage is not None:
            yield Chunk(usage=usage)

    def _apply_events(self, message: _Message, payloads: list[str]) -> str:
        texts: list[str] = []
        for payload in payloads:
            if message.done:
                break
            try:
                event = json.loads(payload)
            except ValueError:
                raise self._error(ErrorKind.MALFORMED, "an event was not valid JSON") from None
            if not isinstance(event, dict):
                raise self._error(ErrorKind.MALFORMED, "an event is not a JSON object")
            if event.get("type") == "error":
                raise self._stream_error(event.get("error"))
            try:
                texts.append(message.apply(event))
            except ValueError as e:
                raise self._error(ErrorKind.MALFORMED, str(e)) from None
        return "".join(texts)

    def _stream_error(self, error: Any) -> BackendError:
        error = error if isinstance(error, dict) else {}
        message = error.get("message")
        detail = one_line(message) if isinstance(message, str) else "error event in the stream"
        kind = _STREAM_ERROR_KINDS.get(str(error.get("type")), ErrorKind.SERVER)
        return self._error(kind, detail)
