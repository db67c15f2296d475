"""OpenAI-compatible chat completions (OpenAI, vLLM, llama.cpp, Ollama, LiteLLM …), streamed."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import aiohttp

from ..config import BackendSpec
from .base import (
    BackendError,
    ChatMessage,
    Chunk,
    ErrorKind,
    Features,
    GenerationRequest,
    ToolCall,
    Usage,
)
from .http import HttpBackend, event_payloads, int_or_none, parse_retry_after
from .think import ThinkFilter

__all__ = ["OpenAIBackend", "parse_retry_after"]


class _ToolCallParts:
    """One tool call as its streamed pieces arrive (id and name first, arguments in fragments)."""

    def __init__(self) -> None:
        self.id = ""
        self.name = ""
        self.arguments = ""

    def add(self, part: dict[str, Any]) -> None:
        if isinstance(part.get("id"), str):
            self.id = part["id"]
        function = part.get("function")
        if not isinstance(function, dict):
            return
        if isinstance(function.get("name"), str):
            self.name += function["name"]
        if isinstance(function.get("arguments"), str):
            self.arguments += function["arguments"]

    def call(self) -> ToolCall:
        if not self.id or not self.name:
            raise ValueError("a tool call without its id or name")
        return ToolCall(self.id, self.name, parse_arguments(self.arguments))


def parse_arguments(text: str) -> dict[str, Any]:
    """A tool call's arguments: a JSON object (an empty string means none)."""
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        raise ValueError("a tool call's arguments are not valid JSON") from None
    if not isinstance(value, dict):
        raise ValueError("a tool call's arguments are not a JSON object")
    return value


class _Answer:
    """What one response has delivered so far: visible text, tool calls, usage, and whether it
    finished."""

    def __init__(self) -> None:
        self.think = ThinkFilter()
        self.usage: Usage | None = None
        self.finish_reason: str | None = None
        self.done = False
        self._calls: dict[int, _ToolCallParts] = {}

    def tool_calls(self) -> tuple[ToolCall, ...]:
        return tuple(self._calls[index].call() for index in sorted(self._calls))

    def apply(self, data: Any, *, streamed: bool) -> str:
        """Take one decoded event (or the whole non-streamed body); return its visible text."""
        if not isinstance(data, dict):
            raise ValueError("event is not a JSON object")
        if "error" in data and data["error"]:
            raise _StreamError(data["error"])
        usage = data.get("usage")
        if isinstance(usage, dict):
            self.usage = Usage(
                prompt_tokens=int_or_none(usage.get("prompt_tokens")),
                completion_tokens=int_or_none(usage.get("completion_tokens")),
            )
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices:
            return ""  # e.g. the final usage-only event
        choice = choices[0]
        if not isinstance(choice, dict):
            raise ValueError("choice is not a JSON object")
        if choice.get("finish_reason"):
            self.finish_reason = str(choice["finish_reason"])
        # `reasoning_content` / `reasoning` fields sit next to `content` and are simply not read.
        part = choice.get("delta" if streamed else "message") or {}
        self._add_tool_calls(part.get("tool_calls") if isinstance(part, dict) else None)
        content = part.get("content") if isinstance(part, dict) else None
        if content is None:
            return ""
        if not isinstance(content, str):
            raise ValueError("content is not a string")
        return self.think.feed(content)

    def _add_tool_calls(self, calls: Any) -> None:
        if calls is None:
            return
        if not isinstance(calls, list):
            raise ValueError("tool_calls is not a list")
        for position, part in enumerate(calls):
            if not isinstance(part, dict):
                raise ValueError("a tool call is not a JSON object")
            index = part.get("index", position)  # streamed pieces say which call they extend
            key = index if isinstance(index, int) else position
            self._calls.setdefault(key, _ToolCallParts()).add(part)


def message_json(message: ChatMessage) -> dict[str, Any]:
    """A chat-completions message: tool requests as `tool_calls`, their results as role `tool`."""
    if message.role == "tool":
        # Chat completions has no error flag on a result: say it in the text, as Responses does.
        content = f"Error: {message.content}" if message.is_error else message.content
        return {"role": "tool", "tool_call_id": message.tool_call_id, "content": content}
    body: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.role == "user" and message.images:
        body["content"] = content_parts(message)
    if message.tool_calls:
        body["content"] = message.content or None
        body["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": json.dumps(call.arguments)},
            }
            for call in message.tool_calls
        ]
    return body


def content_parts(message: ChatMessage) -> list[dict[str, Any]]:
    """A user message with images: its text part (if any), then one image part each."""
    parts: list[dict[str, Any]] = []
    if message.content.strip():
        parts.append({"type": "text", "text": message.content})
    parts += [{"type": "image_url", "image_url": {"url": i.data_url}} for i in message.images]
    return parts


class _StreamError(Exception):
    def __init__(self, error: Any) -> None:
        super().__init__("error event")
        self.error = error if isinstance(error, dict) else {"message": str(error)}


class OpenAIBackend(HttpBackend):
    """POST {base_url}/chat/completions with stream=true; retries only before any text is out."""

    features = Features(streaming=True, tools=True)

    def __init__(
        self, spec: BackendSpec, http: aiohttp.ClientSession | None = None, **options: Any
    ) -> None:
        super().__init__(spec, http, **options)
        self._send_stream_options = True  # dropped once if the server rejects the field

    @property
    def url(self) -> str:
        return f"{self.spec.base_url.rstrip('/')}/chat/completions"

    def _adapt_to(self, error: BackendError) -> bool:
        """Some servers reject `stream_options`; retry once without it (usage is then unknown)."""
        if (
            self._send_stream_options
            and error.kind is ErrorKind.BAD_REQUEST
            and "stream_options" in error.detail
        ):
            self._send_stream_options = False
            self.log.info("backend %s rejects stream_options; not sending it", self.spec.id)
            return True
        return False

    def _body(self, request: GenerationRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": request.model,
            "messages": [message_json(m) for m in request.messages],
            "temperature": request.temperature,
            "stream": True,
        }
        if request.max_tokens is not None:
            body["max_tokens"] = request.max_tokens
        if request.tools:
            body["tools"] = [
                {
                    "type": "function",
                    "function": {
                        "name": tool.name,
                        "description": tool.description,
                        "parameters": tool.parameters,
                    },
                }
                for tool in request.tools
            ]
        if self._send_stream_options:
            body["stream_options"] = {"include_usage": True}
        return body

    async def _read_events(self, response: aiohttp.ClientResponse) -> AsyncIterator[Chunk]:
        answer = _Answer()
        async with aclosing(event_payloads(response)) as batches:
            async for payloads in batches:
                text = self._apply_events(answer, payloads)
                if text:
                    yield Chunk(text=text)
                if answer.done:
                    break  # after [DONE] nothing else matters; don't wait for the server to close
        tail = answer.think.flush()
        if tail:
            yield Chunk(text=tail)
        if not answer.done and answer.finish_reason is None:
            raise self._error(ErrorKind.MALFORMED, "the answer stream ended before it was complete")
        calls = self._tool_calls(answer)
        if calls:
            yield Chunk(tool_calls=calls)
        if answer.usage is not None:
            yield Chunk(usage=answer.usage)

    def _tool_calls(self, answer: _Answer) -> tuple[ToolCall, ...]:
        try:
            return answer.tool_calls()
        except ValueError as e:
            raise self._error(ErrorKind.MALFORMED, str(e)) from None

    def _apply_events(self, answer: _Answer, payloads: list[str]) -> str:
        texts: list[str] = []
        for payload in payloads:
            if answer.done:
                break
            if payload.strip() == "[DONE]":
                answer.done = True
                continue
            for data in self._decode(payload):
                try:
                    texts.append(answer.apply(data, streamed=True))
                except _StreamError as e:
                    raise self._stream_error(e.error) from None
                except ValueError as e:
                    raise self._error(ErrorKind.MALFORMED, str(e)) from None
        return "".join(texts)

    async def _read_json(self, response: aiohttp.ClientResponse) -> AsyncIterator[Chunk]:
        """A server that ignored stream=true: the whole answer in one JSON body."""
        answer = _Answer()
        try:
            text = answer.apply(json.loads(await response.read()), streamed=False)
        except _StreamError as e:
            raise self._stream_error(e.error) from None
        except ValueError as e:
            raise self._error(ErrorKind.MALFORMED, f"bad JSON answer: {e}") from None
        text += answer.think.flush()
        calls = self._tool_calls(answer)
        if answer.finish_reason is None and not text and not calls:
            raise self._error(ErrorKind.MALFORMED, "the JSON answer had no message")
        if text:
            yield Chunk(text=text)
        if calls:
            yield Chunk(tool_calls=calls)
        if answer.usage is not None:
            yield Chunk(usage=answer.usage)
