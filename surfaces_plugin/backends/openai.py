"""OpenAI-compatible chat completions (OpenAI, vLLM, llama.cpp, Ollama, LiteLLM …), streamed."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from ..config import BackendSpec
from .base import BackendError, Chunk, ErrorKind, GenerationRequest, Usage
from .http import HttpBackend, int_or_none
from .http import parse_retry_after as parse_retry_after  # re-exported: callers and tests use it
from .http import provider_message as provider_message
from .sse import SSEDecoder
from .think import ThinkFilter


class _Answer:
    """What one response has delivered so far: visible text, usage, and whether it finished."""

    def __init__(self) -> None:
        self.think = ThinkFilter()
        self.usage: Usage | None = None
        self.finish_reason: str | None = None
        self.done = False

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
        content = part.get("content") if isinstance(part, dict) else None
        if content is None:
            return ""
        if not isinstance(content, str):
            raise ValueError("content is not a string")
        return self.think.feed(content)


class _StreamError(Exception):
    def __init__(self, error: Any) -> None:
        super().__init__("error event")
        self.error = error if isinstance(error, dict) else {"message": str(error)}


class OpenAIBackend(HttpBackend):
    """POST {base_url}/chat/completions with stream=true; retries only before any text is out."""

    def __init__(
        self,
        spec: BackendSpec,
        http: aiohttp.ClientSession | None = None,
        **options: Any,
    ) -> None:
        super().__init__(spec, http, **options)
        self._send_stream_options = True  # dropped once if the server rejects the field

    @property
    def url(self) -> str:
        return f"{self.spec.base_url.rstrip('/')}/chat/completions"

    def _retry_adapted(self, error: BackendError) -> bool:
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
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            "temperature": request.temperature,
            "stream": True,
        }
        if self._send_stream_options:
            body["stream_options"] = {"include_usage": True}
        return body

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
        if answer.usage is not None:
            yield Chunk(usage=answer.usage)

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
        if answer.finish_reason is None and not text:
            raise self._error(ErrorKind.MALFORMED, "the JSON answer had no message")
        if text:
            yield Chunk(text=text)
        if answer.usage is not None:
            yield Chunk(usage=answer.usage)
