"""OpenAI-compatible chat completions (OpenAI, vLLM, llama.cpp, Ollama, LiteLLM …), streamed."""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import re
from collections.abc import AsyncIterator
from contextlib import aclosing
from datetime import datetime, timezone
from typing import Any

import aiohttp

from ..config import BackendSpec
from .base import (
    Backend,
    BackendError,
    ChatMessage,
    Chunk,
    ErrorKind,
    Features,
    GenerationRequest,
    ToolCall,
    Usage,
)
from .sse import SSEDecoder
from .think import ThinkFilter

_ERROR_BODY_LIMIT = 4096
_DETAIL_LIMIT = 200
# Things that look like credentials, in case a provider echoes one back in an error message.
_SECRET_LIKE = re.compile(r"(sk-|Bearer\s+)[A-Za-z0-9._~+/=-]{6,}", re.IGNORECASE)


def parse_retry_after(value: str | None) -> float | None:
    """`Retry-After` as seconds from now: either a number or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _DETAIL_LIMIT else text[: _DETAIL_LIMIT - 1] + "…"


def provider_message(body: bytes, content_type: str) -> str:
    """The human part of an error body (`{"error": {"message": …}}` and friends); never HTML."""
    text = body.decode("utf-8", errors="replace")
    try:
        data: Any = json.loads(text)
    except ValueError:
        return _one_line(text) if content_type.startswith("text/plain") else ""
    for key in ("error", "detail", "message"):
        value = data.get(key) if isinstance(data, dict) else None
        if isinstance(value, dict):
            value = value.get("message") or value.get("detail")
        if isinstance(value, str) and value.strip():
            return _one_line(value)
    return ""


def _kind_for_status(status: int) -> ErrorKind:
    if status in (401, 403):
        return ErrorKind.AUTH
    if status == 429:
        return ErrorKind.RATE_LIMITED
    if status == 408:
        return ErrorKind.TIMEOUT
    if status >= 500:
        return ErrorKind.SERVER
    if status >= 400:
        return ErrorKind.BAD_REQUEST
    return ErrorKind.MALFORMED  # 1xx/3xx/other 2xx surprises: not a chat completion


def _kind_for_stream_error(error: dict[str, Any]) -> ErrorKind:
    """An error sent inside a 200 stream; providers only label it with a type/code string."""
    label = f"{error.get('type', '')} {error.get('code', '')}".lower()
    if "rate" in label or "quota" in label:
        return ErrorKind.RATE_LIMITED
    if "auth" in label or "api_key" in label or "permission" in label:
        return ErrorKind.AUTH
    if "invalid" in label or "context_length" in label:
        return ErrorKind.BAD_REQUEST
    return ErrorKind.SERVER


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
                prompt_tokens=_int_or_none(usage.get("prompt_tokens")),
                completion_tokens=_int_or_none(usage.get("completion_tokens")),
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
        return {"role": "tool", "tool_call_id": message.tool_call_id, "content": message.content}
    body: dict[str, Any] = {"role": message.role, "content": message.content}
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


class _StreamError(Exception):
    def __init__(self, error: Any) -> None:
        super().__init__("error event")
        self.error = error if isinstance(error, dict) else {"message": str(error)}


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class OpenAIBackend(Backend):
    """POST {base_url}/chat/completions with stream=true; retries only before any text is out."""

    features = Features(streaming=True, tools=True)

    def __init__(
        self,
        spec: BackendSpec,
        http: aiohttp.ClientSession | None = None,
        *,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 8.0,
        max_retry_after_s: float = 30.0,
        log: logging.Logger | None = None,
    ) -> None:
        super().__init__(spec)
        self._http = http
        self._own_http: aiohttp.ClientSession | None = None
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.max_retry_after_s = max_retry_after_s
        self.log = log or logging.getLogger(__name__)
        self._send_stream_options = True  # dropped once if the server rejects the field

    @property
    def url(self) -> str:
        return f"{self.spec.base_url.rstrip('/')}/chat/completions"

    async def close(self) -> None:
        if self._own_http is not None:
            await self._own_http.close()
            self._own_http = None

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        attempt = 0
        while True:
            shown = False
            try:
                async with aclosing(self._attempt(request)) as chunks:
                    async for chunk in chunks:
                        shown = True
                        yield chunk
                return
            except BackendError as error:
                if not shown and self._drop_stream_options(error):
                    continue
                delay = None if shown else self._retry_delay(error, attempt)
                if delay is None:
                    raise
                attempt += 1
                self.log.warning(
                    "backend %s: %s; retry %d/%d in %.1f s",
                    self.spec.id,
                    error,
                    attempt,
                    self.spec.max_retries,
                    delay,
                )
                await asyncio.sleep(delay)

    def _retry_delay(self, error: BackendError, attempt: int) -> float | None:
        """Seconds to wait before the next attempt, or None to give up now."""
        if not error.retryable or attempt >= self.spec.max_retries:
            return None
        if error.retry_after is not None:
            # Waiting minutes in silence is worse than telling the user how long to wait.
            return error.retry_after if error.retry_after <= self.max_retry_after_s else None
        backoff = min(self.backoff_max_s, self.backoff_base_s * 2**attempt)
        return backoff * random.uniform(0.75, 1.0)  # jitter: rooms hit by one outage spread out

    def _drop_stream_options(self, error: BackendError) -> bool:
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

    def _error(self, kind: ErrorKind, detail: str = "", **extra: Any) -> BackendError:
        """Every BackendError leaves through here, so the API key can never be in its text."""
        if self.spec.api_key:
            detail = detail.replace(self.spec.api_key, "***")
        detail = _SECRET_LIKE.sub(lambda m: m.group(1) + "***", detail)
        return BackendError(kind, detail, timeout_s=self.spec.timeout_s, **extra)

    def _session(self) -> aiohttp.ClientSession:
        if self._http is not None:
            return self._http
        if self._own_http is None or self._own_http.closed:
            self._own_http = aiohttp.ClientSession()  # created lazily: needs a running loop
        return self._own_http

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

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "text/event-stream, application/json"}
        if self.spec.api_key:
            headers["Authorization"] = f"Bearer {self.spec.api_key}"
        return headers

    async def _attempt(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """One HTTP request. The response is closed on every way out, including cancellation."""
        limit = self.spec.timeout_s
        # sock_read bounds every wait for bytes (headers and each piece of the stream), so a
        # stalled provider times out even mid-answer; there is no cap on a steadily flowing one.
        timeout = aiohttp.ClientTimeout(total=None, connect=limit, sock_read=limit)
        try:
            response = await self._session().post(
                self.url, json=self._body(request), headers=self._headers(), timeout=timeout
            )
        except asyncio.TimeoutError:
            raise self._error(ErrorKind.TIMEOUT, f"no response within {limit:g} s") from None
        except aiohttp.ClientConnectorError as e:
            raise self._error(ErrorKind.UNREACHABLE, f"cannot connect: {e.os_error}") from None
        except aiohttp.ServerDisconnectedError:
            raise self._error(ErrorKind.SERVER, "the server closed the connection") from None
        except (aiohttp.ClientError, ValueError) as e:
            raise self._error(ErrorKind.UNREACHABLE, f"{type(e).__name__}: {e}") from None
        complete = False
        try:
            if not 200 <= response.status < 300:
                raise await self._status_error(response)
            if response.content_type == "text/event-stream":
                async for chunk in self._read_events(response):
                    yield chunk
            elif response.content_type == "application/json":
                async for chunk in self._read_json(response):
                    yield chunk
            else:
                raise self._error(
                    ErrorKind.MALFORMED, f"unexpected content type {response.content_type}"
                )
            complete = True
        except asyncio.TimeoutError:
            raise self._error(ErrorKind.TIMEOUT, f"the answer stalled for {limit:g} s") from None
        except aiohttp.ClientPayloadError:
            raise self._error(ErrorKind.SERVER, "the connection broke mid-answer") from None
        except aiohttp.ClientError as e:
            raise self._error(ErrorKind.SERVER, f"{type(e).__name__}: {e}") from None
        finally:
            if complete:
                response.release()
            else:
                response.close()  # drop the connection: the server sees the disconnect and stops

    async def _status_error(self, response: aiohttp.ClientResponse) -> BackendError:
        body = b""
        while len(body) < _ERROR_BODY_LIMIT:
            part = await response.content.read(_ERROR_BODY_LIMIT - len(body))
            if not part:
                break
            body += part
        kind = _kind_for_status(response.status)
        retry_after = None
        if kind is ErrorKind.RATE_LIMITED:
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
        detail = provider_message(body, response.content_type) or response.reason or ""
        return self._error(kind, detail, status=response.status, retry_after=retry_after)

    def _stream_error(self, error: dict[str, Any]) -> BackendError:
        message = error.get("message")
        detail = _one_line(message) if isinstance(message, str) else "error event in the stream"
        return self._error(_kind_for_stream_error(error), detail)

    async def _read_events(self, response: aiohttp.ClientResponse) -> AsyncIterator[Chunk]:
        decoder = SSEDecoder()
        answer = _Answer()
        async for raw in response.content.iter_any():
            text = self._apply_events(answer, decoder.feed(raw))
            if text:
                yield Chunk(text=text)
            if answer.done:
                break  # after [DONE] nothing else matters; don't wait for the server to close
        else:
            text = self._apply_events(answer, decoder.finish())
            if text:
                yield Chunk(text=text)
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

    def _decode(self, payload: str) -> list[Any]:
        try:
            return [json.loads(payload)]
        except ValueError:
            pass
        # Servers that omit the blank line between events get their data lines joined: split back.
        try:
            return [json.loads(line) for line in payload.split("\n") if line.strip()]
        except ValueError:
            raise self._error(ErrorKind.MALFORMED, "an event was not valid JSON") from None

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
