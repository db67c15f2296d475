"""OpenAI's Responses API (OpenAI, Ollama, vLLM, LiteLLM …), streamed.

`state: replay` sends the whole transcript every turn and asks the platform not to store it.
`state: server` continues a conversation the platform keeps (Conversations API): the room's
`platform_chat_id` is the conversation id, and each request carries only what the platform has
not seen, i.e. the messages after the last assistant one (the new user turn, or the tool results
of a tool loop). System messages are always sent as `instructions`, which the platform never
carries from one response to the next; for the same reason `create_chat` leaves the seed's system
messages out of the conversation (they come back as instructions on every turn).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
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
    ToolSpec,
    Usage,
)
from .http import HttpBackend, event_payloads, int_or_none, one_line
from .think import ThinkFilter

# The Conversations API takes at most this many items per call (create, then add the rest).
ITEMS_PER_CALL = 20


def unseen_messages(messages: Sequence[ChatMessage]) -> list[ChatMessage]:
    """What a platform-held conversation has not seen: the messages after the last assistant one
    (its answers and tool calls are stored by the platform as it produces them)."""
    last = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=-1)
    return [m for m in messages[last + 1 :] if m.role != "system"]


def input_items(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """Chat messages as Responses input items (system messages travel as `instructions`)."""
    items: list[dict[str, Any]] = []
    for message in messages:
        if message.role == "system":
            continue
        if message.role == "tool":
            # The API has no error flag on a tool result, so the model is told in the text.
            output = f"Error: {message.content}" if message.is_error else message.content
            items.append(
                {"type": "function_call_output", "call_id": message.tool_call_id, "output": output}
            )
            continue
        if message.role == "user" and message.images:
            items.append({"role": "user", "content": input_parts(message)})
        elif message.content or not message.tool_calls:
            items.append({"role": message.role, "content": message.content})
        items += [
            {
                "type": "function_call",
                "call_id": call.id,
                "name": call.name,
                "arguments": json.dumps(call.arguments),
            }
            for call in message.tool_calls
        ]
    return items


def input_parts(message: ChatMessage) -> list[dict[str, Any]]:
    """A user message with images: its text (if any), then one input_image each."""
    parts: list[dict[str, Any]] = []
    if message.content.strip():
        parts.append({"type": "input_text", "text": message.content})
    parts += [
        {"type": "input_image", "image_url": image.data_url, "detail": "auto"}
        for image in message.images
    ]
    return parts


def tool_definitions(tools: Sequence[ToolSpec]) -> list[dict[str, Any]]:
    # strict defaults to true on this API, which rejects most MCP schemas (optional properties).
    return [
        {
            "type": "function",
            "name": tool.name,
            "description": tool.description,
            "parameters": tool.parameters,
            "strict": False,
        }
        for tool in tools
    ]


def names_conversation(error: Any) -> bool:
    """An API error saying the conversation does not exist (any more)."""
    if not isinstance(error, dict):
        return False
    message = str(error.get("message") or "").lower()
    return (
        error.get("param") == "conversation"
        or "conversation_not_found" in str(error.get("code") or "")
        or ("conversation" in message and "not found" in message)
    )


class _StreamFailed(Exception):
    """An `error` event or a failed response, carrying the API's error object."""

    def __init__(self, error: Any) -> None:
        super().__init__("error in the stream")
        self.error = error if isinstance(error, dict) else {"message": str(error)}


class _Answer:
    """What one response has delivered: visible text, the function calls it assembled, usage."""

    def __init__(self) -> None:
        self.think = ThinkFilter()
        self.calls: dict[str, dict[str, Any]] = {}  # by item id, in output order
        self.usage: Usage | None = None
        self.finished = False  # response.completed or response.incomplete arrived
        self.saw_text = False

    def apply(self, event: Any) -> str:
        """Take one decoded event; return its visible text."""
        if not isinstance(event, dict):
            raise ValueError("event is not a JSON object")
        kind = event.get("type")
        if kind in ("response.output_text.delta", "response.refusal.delta"):
            delta = event.get("delta")
            if not isinstance(delta, str):
                raise ValueError(f"{kind} without a text delta")
            self.saw_text = True
            return self.think.feed(delta)
        if kind in ("response.output_item.added", "response.output_item.done"):
            self._call_item(event.get("item"))
        elif kind == "response.function_call_arguments.delta":
            call = self.calls.get(str(event.get("item_id")))
            if call is not None and isinstance(event.get("delta"), str):
                call["arguments"] += event["delta"]
        elif kind == "response.function_call_arguments.done":
            call = self.calls.get(str(event.get("item_id")))
            if call is not None and isinstance(event.get("arguments"), str):
                call["arguments"] = event["arguments"]
        elif kind in ("response.completed", "response.incomplete"):
            return self.finish(event.get("response"))
        elif kind == "response.failed":
            response = event.get("response")
            raise _StreamFailed(response.get("error") if isinstance(response, dict) else None)
        elif kind == "error":
            raise _StreamFailed(event)
        # Everything else (created, in_progress, reasoning summaries, content parts) shows nothing.
        return ""

    def finish(self, response: Any) -> str:
        """The final response object: usage, and any output the stream did not deliver."""
        if not isinstance(response, dict):
            raise ValueError("the final event has no response object")
        self.finished = True
        usage = response.get("usage")
        if isinstance(usage, dict):
            self.usage = Usage(
                prompt_tokens=int_or_none(usage.get("input_tokens")),
                completion_tokens=int_or_none(usage.get("output_tokens")),
            )
        output = response.get("output")
        if not isinstance(output, list):
            return ""
        for item in output:
            self._call_item(item)
        if self.saw_text:
            return ""
        # A server that sent no text deltas (or a non-streamed answer): the text is here.
        texts = [
            part.get("text") or part.get("refusal") or ""
            for item in output
            if isinstance(item, dict) and item.get("type") == "message"
            for part in item.get("content") or []
            if isinstance(part, dict)
        ]
        return self.think.feed("".join(t for t in texts if isinstance(t, str)))

    def _call_item(self, item: Any) -> None:
        if not isinstance(item, dict) or item.get("type") != "function_call":
            return
        key = str(item.get("id") or item.get("call_id"))
        call = self.calls.setdefault(key, {"call_id": "", "name": "", "arguments": ""})
        for field in ("call_id", "name", "arguments"):
            if isinstance(item.get(field), str) and item[field]:
                call[field] = item[field]

    def tool_calls(self) -> tuple[ToolCall, ...]:
        calls: list[ToolCall] = []
        for call in self.calls.values():
            if not call["call_id"] or not call["name"]:
                raise ValueError("a function call came without its call_id or name")
            try:
                arguments = json.loads(call["arguments"] or "{}")
            except ValueError:
                raise ValueError(f"the arguments for {call['name']} are not JSON") from None
            if not isinstance(arguments, dict):
                raise ValueError(f"the arguments for {call['name']} are not a JSON object")
            calls.append(ToolCall(call["call_id"], call["name"], arguments))
        return tuple(calls)


class ResponsesBackend(HttpBackend):
    """POST {base_url}/responses with stream=true; retries only before any text is out."""

    def __init__(
        self, spec: BackendSpec, http: aiohttp.ClientSession | None = None, **options: Any
    ) -> None:
        super().__init__(spec, http, **options)
        self.server_state = spec.state == "server"
        self.features = Features(streaming=True, tools=True, server_state=self.server_state)

    @property
    def base_url(self) -> str:
        return self.spec.base_url.rstrip("/")

    @property
    def url(self) -> str:
        return f"{self.base_url}/responses"

    # ---- conversations held by the platform

    async def create_chat(self, seed: Sequence[ChatMessage] = ()) -> str:
        """Replay: a local id. Server: a new platform conversation holding `seed` (without its
        system messages, which every request sends as instructions)."""
        if not self.server_state:
            return await super().create_chat(seed)
        items = input_items(seed)
        created = await self._call_json(
            f"{self.base_url}/conversations", {"items": items[:ITEMS_PER_CALL]}
        )
        conversation_id = created.get("id")
        if not isinstance(conversation_id, str) or not conversation_id:
            raise self._error(ErrorKind.MALFORMED, "the new conversation has no id")
        # The rest of a long seed in further calls (a failure leaves an unused conversation).
        for start in range(ITEMS_PER_CALL, len(items), ITEMS_PER_CALL):
            await self._call_json(
                f"{self.base_url}/conversations/{conversation_id}/items",
                {"items": items[start : start + ITEMS_PER_CALL]},
            )
        return conversation_id

    async def _call_json(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST and read a JSON object, retrying what is worth retrying."""
        return await self._call(lambda: self._post(url, body), self._json_object)

    def _error_for_body(self, response: aiohttp.ClientResponse, body: bytes) -> BackendError:
        error = super()._error_for_body(response, body)
        if response.status == 404 and names_conversation(_error_object(body)):
            return self._error(ErrorKind.CHAT_GONE, error.detail, status=404)
        return error

    # ---- one generation

    def _body(self, request: GenerationRequest) -> dict[str, Any]:
        if self.server_state and not request.chat_id:
            raise self._error(ErrorKind.CHAT_GONE, "the room has no platform conversation")
        messages = unseen_messages(request.messages) if self.server_state else request.messages
        body: dict[str, Any] = {
            "model": request.model,
            "input": input_items(messages),
            "temperature": request.temperature,
            "stream": True,
        }
        instructions = "\n\n".join(m.content for m in request.messages if m.role == "system")
        if instructions:
            body["instructions"] = instructions
        if request.max_tokens is not None:
            body["max_output_tokens"] = request.max_tokens
        if request.tools:
            body["tools"] = tool_definitions(request.tools)
        if self.server_state:
            body["conversation"] = request.chat_id
        else:
            body["store"] = False  # the transcript comes again next turn; nothing to keep
        return body

    async def _read_events(self, response: aiohttp.ClientResponse) -> AsyncIterator[Chunk]:
        answer = _Answer()
        async with aclosing(event_payloads(response)) as batches:
            async for payloads in batches:
                text = self._apply_events(answer, payloads)
                if text:
                    yield Chunk(text=text)
                if answer.finished:
                    break  # the response is complete; don't wait for the server to close
        if not answer.finished:
            raise self._error(ErrorKind.MALFORMED, "the answer stream ended before it was complete")
        async for chunk in self._ending(answer):
            yield chunk

    def _apply_events(self, answer: _Answer, payloads: list[str]) -> str:
        texts: list[str] = []
        for payload in payloads:
            if answer.finished:
                break
            for event in self._decode(payload):
                texts.append(self._apply(answer, event))
        return "".join(texts)

    def _apply(self, answer: _Answer, event: Any) -> str:
        try:
            return answer.apply(event)
        except _StreamFailed as e:
            raise self._failure(e.error) from None
        except ValueError as e:
            raise self._error(ErrorKind.MALFORMED, str(e)) from None

    def _failure(self, error: dict[str, Any]) -> BackendError:
        if names_conversation(error):
            message = error.get("message")
            detail = one_line(message) if isinstance(message, str) else "conversation not found"
            return self._error(ErrorKind.CHAT_GONE, detail)
        return self._stream_error(error)

    async def _ending(self, answer: _Answer) -> AsyncIterator[Chunk]:
        """After the last event: held-back text, the tool calls, then usage."""
        tail = answer.think.flush()
        if tail:
            yield Chunk(text=tail)
        try:
            calls = answer.tool_calls()
        except ValueError as e:
            raise self._error(ErrorKind.MALFORMED, str(e)) from None
        if calls:
            yield Chunk(tool_calls=calls)
        if answer.usage is not None:
            yield Chunk(usage=answer.usage)

    async def _read_json(self, response: aiohttp.ClientResponse) -> AsyncIterator[Chunk]:
        """A server that ignored stream=true: the whole response object at once."""
        answer = _Answer()
        try:
            data = json.loads(await response.read())
        except ValueError as e:
            raise self._error(ErrorKind.MALFORMED, f"bad JSON answer: {e}") from None
        status = data.get("status") if isinstance(data, dict) else None
        if status == "failed":
            raise self._failure(data.get("error") or {})
        if status not in ("completed", "incomplete"):
            raise self._error(ErrorKind.MALFORMED, f"the response is {status or 'not a response'}")
        text = self._apply(answer, {"type": f"response.{status}", "response": data})
        if text:
            yield Chunk(text=text)
        async for chunk in self._ending(answer):
            yield chunk


def _error_object(body: bytes) -> Any:
    """The `error` object of an API error body, if it has one."""
    try:
        data = json.loads(body.decode("utf-8", errors="replace"))
    except ValueError:
        return None
    return data.get("error") if isinstance(data, dict) else None
